"""The data a training run reads: the tokenized dataset (`train.data`), the sources of a mixture, the tokenizer
beside them, and their content digests (part of the run's identity). Shared by the launcher (stage.py), the
per-rank worker and the loader, none of which imports another.
"""

from __future__ import annotations

import hashlib

from stages.core import storage
from stages.core.config import PipelineConfig, StorageConfig
from stages.tokenizer.bpe import FILENAME as TOKENIZER_FILE  # (inside the dataset folder: tokenize copies it there)


def data_uri(cfg: PipelineConfig) -> str:
    """The tokenized dataset the run reads: train.data, which the train stage sets to its input's output when
    the config leaves it unset (stages/train/stage.py: resolved)."""
    if not cfg.train.data:
        raise ValueError("train.data: unset; the train stage resolves it to the tokenize stage's output first")
    return cfg.train.data.rstrip("/")


def mixture_sources(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field, dataset URI) of each source of train.mixture; a source without `data` reads the run's dataset."""
    sources = cfg.train.mixture.sources if cfg.train.mixture else []
    return [
        (f"train.mixture.sources[{i}].data", s.data.rstrip("/") if s.data else data_uri(cfg))
        for i, s in enumerate(sources)
    ]


def check_mixture(cfg: PipelineConfig) -> None:
    """Every source holds training data made with the run's tokenizer; else an error naming the source's field."""
    want = _sha256_of(tokenizer_uri(cfg), cfg)
    for field, uri in mixture_sources(cfg):
        data_digest(cfg, uri, field)
        tokenizer = storage.join(uri, TOKENIZER_FILE)
        if not storage.exists(tokenizer, cfg.storage):
            raise FileNotFoundError(f"{field}: {uri} has no {TOKENIZER_FILE}")
        if _sha256_of(tokenizer, cfg) != want:
            raise ValueError(
                f"{field}: {uri} was tokenized with another tokenizer than the run's ({tokenizer_uri(cfg)}); "
                "tokenize every source with the same one (tokenizer.path)"
            )


def _sha256_of(uri: str, cfg: PipelineConfig) -> str:
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_digest(cfg: PipelineConfig, data: str | None = None, field: str = "train.data") -> str:
    """The dataset's content digest: its tokenize manifest's, or for a dataset made elsewhere its train index's.
    `data`: another dataset than the run's (a mixture's source, named by `field` in errors)."""
    data = data or data_uri(cfg)
    manifest = storage.join(data, storage.MANIFEST)
    if storage.exists(manifest, cfg.storage):
        return storage.read_json(manifest, cfg.storage)["digest"]
    index = storage.join(data, "train", "index.json")
    if not storage.exists(index, cfg.storage):  # fail here, not after torchrun has started every rank
        where = "run the tokenize stage first" if field == "train.data" else field
        raise FileNotFoundError(f"{index}: no tokenized training data ({where})")
    with storage.open_uri(index, "rb", cfg.storage) as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def tokenizer_uri(cfg: PipelineConfig) -> str:
    return storage.join(data_uri(cfg), TOKENIZER_FILE)


def tokenizer_vocab_size(cfg: PipelineConfig) -> int:
    uri = tokenizer_uri(cfg)
    if not storage.exists(uri, cfg.storage):
        raise FileNotFoundError(f"{uri}: no tokenizer beside the training data (run the tokenize stage)")
    return tokenizer_vocab_size_at(uri, cfg.storage)


def model_vocab_size(cfg: PipelineConfig, tokens: int) -> int:
    """The model's vocabulary: the tokenizer's `tokens`, or a Hugging Face base model's (train.initial_checkpoint)
    when it is padded beyond them (rows no token id reaches, kept so that its weights load as they are)."""
    from stages.train import pretrained

    start = cfg.train.initial_checkpoint
    if not start or not pretrained.is_model_directory(start, cfg.storage):
        return tokens
    _, vocab = pretrained.read_model_config(start, cfg.storage)
    if vocab < tokens:
        raise ValueError(f"train.initial_checkpoint {start}: its vocabulary is {vocab}, the run's tokenizer has "
                         f"{tokens} (tokenizer.path: the model's own tokenizer)")  # fmt: skip
    return vocab


def tokenizer_vocab_size_at(uri: str, storage_cfg: StorageConfig | None) -> int:
    from tokenizers import Tokenizer

    with storage.open_uri(uri, "rb", storage_cfg) as f:
        return Tokenizer.from_str(f.read().decode("utf-8")).get_vocab_size()
