"""The tokenizer as a file: train a byte-level BPE, load a given tokenizer.json or Hugging Face tokenizer
directory, load a committed one, check its special tokens. The tokenize, train and evaluate stages read
tokenizers through this module (and `FILENAME`), never through the tokenizer stage's build.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from stages.core import storage
from stages.core.config import StorageConfig, TokenizerConfig
from stages.core.storage import StageOutput

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


def load(out: StageOutput):
    """The tokenizer a committed output of this stage holds."""
    from tokenizers import Tokenizer

    with storage.open_uri(out.path(FILENAME), "rb", out.storage) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def check_special_tokens(tokenizer, tc: TokenizerConfig) -> None:
    for field, token in [("eos_token", tc.eos_token)] + [("special_tokens", t) for t in tc.special_tokens]:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"tokenizer.{field}: {token!r} is not in the tokenizer's vocabulary")
