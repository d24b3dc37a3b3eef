"""Tokenizer and tokenize: exact round trips for any Unicode text, a sample spread over the corpus, loading a
Hugging Face tokenizer directory, the tokenizer's hash in the manifests, and byte-identical token shards."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.core.config import load_config
from stages.core.storage import MANIFEST
from stages.pipeline import PIPELINE
from stages.tokenizer import bpe
from stages.tokenizer import stage as tokenizer
from tests.conftest import ingest_without_filtering, out_dir


@pytest.fixture(scope="module")
def built(small_corpus, tmp_path_factory):
    """The small corpus through ingest (unfiltered), dedup, tokenizer and tokenize."""
    root = tmp_path_factory.mktemp("tokenizer")
    cfg = load_config(
        "tiny",
        {
            "storage.root": str(root),
            "ingest.inputs": [str(small_corpus["jsonl"]), str(small_corpus["parquet"])],
            "ingest.docs_per_shard": 100,
            "tokenizer.vocab_size": 1000,
            "tokenizer.max_train_chars": 300_000,
            "tokenizer.special_tokens": ["<|pad|>"],
            "tokenize.workers": 2,
        },
    )
    ingest_without_filtering(cfg)
    after_filter = PIPELINE.names[PIPELINE.names.index("filter") + 1 : PIPELINE.names.index("tokenize") + 1]
    stats = {name: PIPELINE.run(name, cfg, log=lambda _: None) for name in after_filter}
    return cfg, root, stats, bpe.load(PIPELINE.output("tokenizer", cfg))


CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
COMBINING = st.characters(min_codepoint=0x0300, max_codepoint=0x036F)
CONTROL = st.characters(min_codepoint=0x00, max_codepoint=0x1F)
ANY = st.characters(blacklist_categories=("Cs",))  # every code point but lone surrogates (not valid UTF-8)
TEXTS = st.text(st.one_of(CJK, EMOJI, COMBINING, CONTROL, ANY, st.sampled_from(" \n\t.,é")), max_size=300)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_any_unicode_text_round_trips_exactly(built, text):
    tok = built[3]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_special_tokens_sample_and_hash(built):
    cfg, root, stats, tok = built
    s = stats["tokenizer"]
    assert tok.token_to_id("<|endoftext|>") == s["eos_id"] == 0 and tok.token_to_id("<|pad|>") == 1
    assert 0 < s["train_chars"] <= cfg.tokenizer.max_train_chars
    data = (out_dir("tokenizer", cfg) / tokenizer.FILENAME).read_bytes()
    assert s["tokenizer_sha256"] == hashlib.sha256(data).hexdigest()
    assert stats["tokenize"]["tokenizer_sha256"] == s["tokenizer_sha256"]  # carried into the manifest


def test_sample_takes_an_equal_share_of_every_shard(built):
    cfg, root, _, _ = built
    upstream = PIPELINE.output("dedup", cfg)
    shards = [upstream.path(s) for s in sorted(json.loads((out_dir("dedup", cfg) / MANIFEST).read_text())["files"])
              if s.endswith(".parquet") and "/" not in s]  # fmt: skip
    assert len(shards) >= 4
    small = cfg.model_copy(deep=True)
    small.tokenizer.max_train_chars = 4000
    texts = list(tokenizer.sample_texts(small, shards))
    assert sum(len(t) for t in texts) <= 4000
    from stages.core.documents import read_docs

    firsts = {next(read_docs(uri)).text[:50] for uri in shards}
    assert firsts <= {t[:50] for t in texts}  # every shard contributed its first document


def test_hugging_face_directory_loads_through_auto_tokenizer(built, tmp_path):
    cfg, root, _, tok = built
    folder = tmp_path / "gpt2-style"
    folder.mkdir()
    tok.model.save(str(folder))  # vocab.json + merges.txt, no tokenizer.json: AutoTokenizer converts them
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "model_max_length": 1024})
    )
    loaded = tokenizer.load_given(str(folder))
    text = "Byte-level BPE, loaded from a directory: naïve café 東京 🚀"
    assert loaded.encode(text).ids == tok.encode(text).ids
    reuse = cfg.model_copy(deep=True)
    reuse.storage.root = str(tmp_path / "out")
    reuse.tokenizer.path = str(folder)
    reuse.tokenizer.special_tokens = []
    s = PIPELINE.run("tokenizer", reuse, log=lambda _: None)
    assert s["trained"] is False and s["eos_id"] == tok.token_to_id("<|endoftext|>")
    missing = reuse.model_copy(deep=True)
    missing.tokenizer.eos_token = "</s>"
    with pytest.raises(ValueError, match=r"tokenizer.eos_token: '</s>' is not in the tokenizer's vocabulary"):
        PIPELINE.run("tokenizer", missing, log=lambda _: None)


def test_same_input_and_config_give_byte_identical_shards(built, tmp_path):
    cfg, root, stats, _ = built
    again = cfg.model_copy(deep=True)
    again.storage.root = str(tmp_path)
    for stage in PIPELINE.ancestors("tokenize"):  # its inputs' outputs: their digests name its version
        shutil.copytree(root / stage.folder, tmp_path / stage.folder)
    PIPELINE.run("tokenize", again, log=lambda _: None)
    first, second = (json.loads((out_dir("tokenize", c) / MANIFEST).read_text()) for c in (cfg, again))
    assert first["files"] == second["files"] and first["counts"] == second["counts"]
    assert first["identity"] == second["identity"]
    # the worker count decides where litdata cuts chunks, so it is part of the identity: a change rebuilds
    again.tokenize.workers = 1
    assert PIPELINE.run("tokenize", again, log=lambda _: None)["skipped"] is False
    assert first["counts"]["tokens"]["train"] > 0
    assert first["counts"]["dataset"] == json.loads((out_dir("dedup", cfg) / MANIFEST).read_text())["digest"]


def test_tokenizer_round_trips_and_has_eos(data_pipeline):
    cfg, root, stats = data_pipeline
    tok = bpe.load(PIPELINE.output("tokenizer", cfg))
    assert tok.get_vocab_size() == 1000 == stats["tokenizer"]["vocab_size"]
    for text in ["Plain English.", "Größe naïve café — 東京 🚀\ttabs\nnewlines", " leading  spaces "]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(cfg.tokenizer.eos_token) == stats["tokenizer"]["eos_id"]


def test_tokenizer_stage_loads_an_existing_tokenizer(data_pipeline, tmp_path):
    cfg, root, stats = data_pipeline
    given = tmp_path / "given.json"
    given.write_text((out_dir("tokenizer", cfg) / "tokenizer.json").read_text())
    reuse = cfg.model_copy(deep=True)
    reuse.storage.root = str(tmp_path / "out")
    reuse.tokenizer.path = str(given)
    (tmp_path / "out").mkdir()
    s = PIPELINE.run("tokenizer", reuse, log=lambda _: None)
    assert s["trained"] is False and s["vocab_size"] == stats["tokenizer"]["vocab_size"]
    assert (out_dir("tokenizer", reuse) / "tokenizer.json").read_text() == given.read_text()
