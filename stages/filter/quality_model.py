"""A model-based quality filter: a fastText classifier the pipeline trains, then applies as a filter rule.

As in DCLM: positives are a reference corpus named in config (any format ingest reads), negatives are named
files or, by default, a random sample of the ingested documents (the raw pool the filter sees). Both classes are
capped at `max_examples`, 10% of each is held out, and the held-out precision and recall of the `hq` label at the
keep threshold go into the filter's stats. The threshold is either fixed (`keep_threshold`) or the score that
keeps the top `keep_top_fraction` of the raw pool (DCLM keeps its top 10%).

The model is trained in one process before the shards are filtered, then saved into the filter's output folder
under a name that carries its content digest: datatrove's FastTextClassifierFilter caches a local model by its
path, so a retrained model must never reuse a name. Training uses one thread, so the same inputs give the same
model.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.documents import read_docs

LABEL = "hq"
CACHE = Path.home() / ".cache" / "pretrain-pipeline" / "quality"


def _line(text: str) -> str:
    return " ".join(text.split())[:20_000]


def examples(uris: list[str], cfg: PipelineConfig, limit: int, rng: random.Random) -> list[str]:
    """Up to `limit` texts from raw files (read as ingest reads them), sampled uniformly by reservoir."""
    from stages.ingest.readers import Tally, read_records

    reservoir: list[str] = []
    seen = 0
    for uri in uris:
        for record in read_records(uri, cfg, Tally()):
            if record.doc is None:
                continue
            seen += 1
            if len(reservoir) < limit:
                reservoir.append(record.doc.text)
            elif (j := rng.randrange(seen)) < limit:
                reservoir[j] = record.doc.text
    return reservoir


def pool_sample(cfg: PipelineConfig, shard_uris: list[str], limit: int, rng: random.Random) -> list[str]:
    reservoir: list[str] = []
    seen = 0
    for uri in shard_uris:
        for doc in read_docs(uri, cfg.storage):
            seen += 1
            if len(reservoir) < limit:
                reservoir.append(doc.text)
            elif (j := rng.randrange(seen)) < limit:
                reservoir[j] = doc.text
    return reservoir


def train(cfg: PipelineConfig, pool_shards: list[str], out_uri: str) -> dict:
    """Train, evaluate on held-out examples, pick the threshold, save the model under `out_uri`."""
    import fasttext
    import numpy as np

    qc = cfg.filter.quality
    rng = random.Random(qc.seed)
    positives = examples(qc.positive, cfg, qc.max_examples, rng)
    pool = pool_sample(cfg, pool_shards, qc.max_examples, rng)
    negatives = examples(qc.negative, cfg, qc.max_examples, rng) if qc.negative else pool
    if not positives or not negatives:
        raise ValueError(f"filter.quality: need examples of both classes, got {len(positives)} and {len(negatives)}")
    labelled = [(f"__label__{LABEL}", t) for t in positives] + [("__label__other", t) for t in negatives]
    rng.shuffle(labelled)
    held_out = labelled[: max(1, len(labelled) // 10)]
    training = labelled[len(held_out) :]
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(f"{label} {_line(text)}\n" for label, text in training))
        model = fasttext.train_supervised(
            input=str(train_file), epoch=qc.epoch, lr=qc.lr, wordNgrams=qc.word_ngrams, dim=qc.dim, bucket=qc.buckets,
            thread=1, seed=qc.seed, verbose=0,
        )  # fmt: skip

        def score(text: str) -> float:
            labels, probs = model.predict(_line(text), k=-1)
            return float(dict(zip(labels, probs)).get(f"__label__{LABEL}", 0.0))

        if qc.keep_top_fraction is not None:
            threshold = float(np.quantile([score(t) for t in pool], 1.0 - qc.keep_top_fraction))
        else:
            threshold = qc.keep_threshold
        truth = [label == f"__label__{LABEL}" for label, _ in held_out]
        predicted = [score(text) >= threshold for _, text in held_out]
        tp = sum(t and p for t, p in zip(truth, predicted))
        model_file = Path(tmp) / "model.bin"
        model.save_model(str(model_file))
        data = model_file.read_bytes()
    name = f"quality-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    with storage.atomic_write(storage.join(out_uri, name), cfg.storage) as f:
        f.write(data)
    return {
        "model": name,
        "threshold": round(threshold, 6),
        "examples": {"positive": len(positives), "negative": len(negatives), "held_out": len(held_out)},
        "held_out_precision": round(tp / max(1, sum(predicted)), 4),
        "held_out_recall": round(tp / max(1, sum(truth)), 4),
    }


def local_copy(cfg: PipelineConfig, model_uri: str) -> str:
    """The model as a local file (a worker on another machine fetches it from the stage's output)."""
    path = CACHE / model_uri.rsplit("/", 1)[-1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with storage.open_uri(model_uri, "rb", cfg.storage) as src, storage.atomic_write(str(path)) as dst:
            dst.write(src.read())
    return str(path)
