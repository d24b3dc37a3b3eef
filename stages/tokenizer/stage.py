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

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.documents import read_docs
from stages.core.stage import Build, Stage, StageResult, committed_shards
from stages.tokenizer.bpe import FILENAME, check_special_tokens, fingerprint_given, load_given, train_bpe


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


def given(cfg: PipelineConfig) -> dict:
    """With tokenizer.path, the given tokenizer's fingerprint is what the output is a function of."""
    return {"given": fingerprint_given(cfg.tokenizer.path, cfg.storage)} if cfg.tokenizer.path else {}


def reads(cfg: PipelineConfig) -> tuple[str, ...]:
    return () if cfg.tokenizer.path else ("docs",)


def check(cfg: PipelineConfig) -> None:
    if cfg.tokenizer.path and not storage.exists(cfg.tokenizer.path, cfg.storage):
        raise FileNotFoundError(f"tokenizer.path: {cfg.tokenizer.path} does not exist")


def build(b: Build) -> StageResult:
    tc = b.cfg.tokenizer
    chars = 0
    if tc.path:
        tokenizer = load_given(tc.path, b.cfg.storage)
        b.log(f"tokenizer: loaded {tc.path}")
    else:
        docs = b.inputs["docs"]
        shard_uris = [docs.path(s) for s in committed_shards(docs)]

        def counted() -> Iterator[str]:
            nonlocal chars
            for text in sample_texts(b.cfg, shard_uris):
                chars += len(text)
                yield text

        tokenizer = train_bpe(counted(), tc.vocab_size, [tc.eos_token, *tc.special_tokens])
        b.log(f"tokenizer: trained byte-level BPE, vocab {tokenizer.get_vocab_size()}, on {chars:,} characters")
    check_special_tokens(tokenizer, tc)
    data = tokenizer.to_str().encode("utf-8")
    with storage.atomic_write(b.out.path(FILENAME), b.cfg.storage) as f:
        f.write(data)
    counts = {
        "vocab_size": tokenizer.get_vocab_size(),
        "eos_id": tokenizer.token_to_id(tc.eos_token),
        "tokenizer_sha256": hashlib.sha256(data).hexdigest(),
    }
    return StageResult([FILENAME], counts, {"trained": not tc.path, "train_chars": chars})


STAGE = Stage(
    name="tokenizer",
    folder="tokenizer",
    package=__package__,
    sections=("tokenizer",),
    build=build,
    needs=("docs",),
    reads=reads,
    fingerprints=given,
    check=check,
)
