"""Tokenizer: train a byte-level BPE on the deduplicated text with Hugging Face `tokenizers`, or load one.

Byte-level BPE (GPT-2's scheme) never meets an unknown character: any Unicode text round-trips exactly
(tests/test_tokenizer.py checks it with generated text: CJK, emoji, combining marks, control characters).

Training reads a bounded sample, `tokenizer.max_train_chars` characters spread evenly over the deduplicated
shards (each shard gives its share, documents in order), so its cost stays flat as the corpus grows and no
part of the corpus is left out, as a prefix of the first shards would be. Special tokens are the EOS token
the tokenize stage puts after every document, then `tokenizer.special_tokens`.

Loading takes a tokenizer.json, or a Hugging Face tokenizer directory through transformers' AutoTokenizer
(offline; its fast tokenizer's `tokenizers` object is what is kept), so an existing model's tokenizer can be
reused for continued pretraining.

The result is `tokenizer/tokenizer.json` under the storage root; its sha256 is the tokenizer's hash, recorded
in this stage's counts and carried into the tokenize stage's manifest and the checkpoints' lineage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from stages import storage
from stages.config import PipelineConfig, StorageConfig, TokenizerConfig
from stages.dedup import output as dedup_output
from stages.documents import read_docs
from stages.stage import (
    Force,
    Log,
    StageResult,
    committed_shards,
    run_stage,
    stage_identity,
    upstream_digest,
    versioned_output,
)
from stages.storage import StageOutput

FILENAME = "tokenizer.json"


def train_bpe(texts: Iterator[str], vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_given(path: str, cfg: StorageConfig | None = None):
    """A `tokenizers.Tokenizer` from a tokenizer.json (local or on S3) or a local Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer

    if storage.is_remote(path):
        with storage.open_uri(path, "rb", cfg) as f:
            return Tokenizer.from_str(f.read().decode("utf-8"))
    folder = Path(path)
    if not folder.is_dir():
        return Tokenizer.from_file(path)
    if (folder / FILENAME).is_file():
        return Tokenizer.from_file(str(folder / FILENAME))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not loaded.is_fast:
        raise ValueError(f"tokenizer.path: {path} has no fast (Rust) tokenizer, which the tokenize stage needs")
    return loaded.backend_tokenizer


def fingerprint_given(path: str, cfg: StorageConfig | None = None) -> dict:
    """What identifies a given tokenizer: its file, or every file of its directory."""
    if storage.is_remote(path):
        return {"path": path, "files": [storage.raw_fingerprint(path, cfg)]}
    folder = Path(path)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    return {"path": path, "files": [storage.raw_fingerprint(str(f)) for f in files]}


def sample_texts(cfg: PipelineConfig, shard_uris: list[str]) -> Iterator[str]:
    """Up to `max_train_chars` characters, an equal share from each shard, documents in order."""
    share = cfg.tokenizer.max_train_chars // max(1, len(shard_uris))
    for uri in shard_uris:
        budget = share
        for doc in read_docs(uri, cfg.storage):
            if budget <= 0:
                break
            text = doc.text[:budget]
            budget -= len(text)
            yield text


def identity(cfg: PipelineConfig, upstream: StageOutput | None = None) -> dict:
    tc = cfg.tokenizer
    if tc.path:
        source = fingerprint_given(tc.path, cfg.storage)
    else:
        source = {"trained_on": upstream_digest(upstream or dedup_output(cfg))}
    return stage_identity(__name__, cfg, "tokenizer", source)


def output(cfg: PipelineConfig, ident: dict | None = None) -> StageOutput:
    """Where the output of `ident` (default: this config's identity) lives."""
    return versioned_output("tokenizer", "tokenizer", cfg, ident or identity(cfg))


def load(cfg: PipelineConfig):
    """The committed tokenizer of this pipeline."""
    from tokenizers import Tokenizer

    with storage.open_uri(output(cfg).path(FILENAME), "rb", cfg.storage) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def check_special_tokens(tokenizer, tc: TokenizerConfig) -> None:
    for field, token in [("eos_token", tc.eos_token)] + [("special_tokens", t) for t in tc.special_tokens]:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"tokenizer.{field}: {token!r} is not in the tokenizer's vocabulary")


def run(cfg: PipelineConfig, log: Log = print, force: Force = False) -> dict:
    tc = cfg.tokenizer
    upstream = None if tc.path else dedup_output(cfg)
    ident = identity(cfg, upstream)
    out = output(cfg, ident)

    def build() -> StageResult:
        chars = 0
        if tc.path:
            tokenizer = load_given(tc.path, cfg.storage)
            log(f"tokenizer: loaded {tc.path}")
        else:
            shard_uris = [upstream.path(s) for s in committed_shards(upstream)]

            def counted() -> Iterator[str]:
                nonlocal chars
                for text in sample_texts(cfg, shard_uris):
                    chars += len(text)
                    yield text

            tokenizer = train_bpe(counted(), tc.vocab_size, [tc.eos_token, *tc.special_tokens])
            log(f"tokenizer: trained byte-level BPE, vocab {tokenizer.get_vocab_size()}, on {chars:,} characters")
        check_special_tokens(tokenizer, tc)
        data = tokenizer.to_str().encode("utf-8")
        with storage.atomic_write(out.path(FILENAME), cfg.storage) as f:
            f.write(data)
        counts = {
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": tokenizer.token_to_id(tc.eos_token),
            "tokenizer_sha256": hashlib.sha256(data).hexdigest(),
        }
        return StageResult([FILENAME], counts, {"trained": not tc.path, "train_chars": chars})

    return run_stage(out, ident, build, log, force)
