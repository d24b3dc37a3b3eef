"""Tokenizer: train a byte-level BPE on the deduplicated text with Hugging Face `tokenizers`, or load one.

Byte-level BPE (GPT-2's scheme) never meets an unknown character: any Unicode text round-trips exactly. The
trainer sees a bounded sample (`tokenizer.max_train_chars`, taken in corpus order) so its cost stays flat as
the corpus grows. The result is `tokenizer/tokenizer.json` under the storage root, committed with a manifest
whose digest is the tokenizer's identity for every later stage.
"""

from __future__ import annotations

from collections.abc import Iterator

from stages import storage
from stages.config import PipelineConfig
from stages.dedup import output as dedup_output
from stages.documents import read_docs
from stages.stage import Log, StageResult, committed_shards, run_stage, stage_identity, upstream_digest
from stages.storage import StageOutput

FILENAME = "tokenizer.json"


def train_bpe(texts: Iterator[str], vocab_size: int, eos_token: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def output(cfg: PipelineConfig) -> StageOutput:
    return StageOutput("tokenizer", storage.join(cfg.storage.root, "tokenizer"), cfg.storage)


def load(cfg: PipelineConfig):
    """The committed tokenizer of this pipeline."""
    from tokenizers import Tokenizer

    with storage.open_uri(output(cfg).path(FILENAME), "rb", cfg.storage) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def run(cfg: PipelineConfig, log: Log = print) -> dict:
    tc = cfg.tokenizer
    out = output(cfg)
    upstream = dedup_output(cfg)
    if tc.path:
        source = {"path": tc.path, "fingerprint": storage.raw_fingerprint(tc.path)}
    else:
        source = {"trained_on": upstream_digest(upstream)}
    identity = stage_identity(__name__, cfg, "tokenizer", source)

    def sample() -> Iterator[str]:
        budget = tc.max_train_chars
        for shard in committed_shards(upstream):
            for doc in read_docs(storage.join(upstream.uri, shard), cfg.storage):
                if budget <= 0:
                    return
                yield doc.text[:budget]
                budget -= len(doc.text)

    def build() -> StageResult:
        from tokenizers import Tokenizer

        if tc.path:
            tokenizer = Tokenizer.from_file(tc.path)
            log(f"tokenizer: loaded {tc.path}")
        else:
            chars = 0

            def counted() -> Iterator[str]:
                nonlocal chars
                for text in sample():
                    chars += len(text)
                    yield text

            tokenizer = train_bpe(counted(), tc.vocab_size, tc.eos_token)
            log(f"tokenizer: trained byte-level BPE, vocab {tokenizer.get_vocab_size()}, on {chars} characters")
        if tokenizer.token_to_id(tc.eos_token) is None:
            raise ValueError(f"tokenizer.eos_token: {tc.eos_token!r} is not in the tokenizer's vocabulary")
        with storage.atomic_write(out.path(FILENAME), cfg.storage, "w") as f:
            f.write(tokenizer.to_str())
        counts = {"vocab_size": tokenizer.get_vocab_size(), "eos_id": tokenizer.token_to_id(tc.eos_token)}
        return StageResult([FILENAME], counts, {"trained": not tc.path, "train_chars": 0 if tc.path else chars})

    return run_stage(out, identity, build, log)
