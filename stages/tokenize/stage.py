"""Tokenize: documents to token ids with an EOS after each, written as LitData shards with `litdata.optimize`.

Layout under `{root}/tokens/`: `train/` and `val/` (litdata chunk files plus index.json, read back by
StreamingDataset with TokensLoader), `val_docs.jsonl` (the validation documents' text, which the evaluate
stage scores) and the manifest. The split is by a hash of the document id, so it is deterministic, disjoint,
and a document stays on its side when the corpus grows.

The output goes to a local folder or any S3 endpoint; `storage.prepare_litdata` makes litdata accept a
plain-http endpoint such as a local moto server, in this process and in the worker processes litdata forks.
Inputs are handed to litdata in a fixed order with reordering off, so the same input and config give the same
shards.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import xxhash

from stages.core import storage
from stages.core.config import PipelineConfig, StorageConfig
from stages.core.documents import read_texts
from stages.core.parallel import exit_when_gone, map_in_processes
from stages.core.stage import Build, Stage, StageResult, committed_shards, upstream_digest
from stages.tokenize import decontaminate
from stages.tokenize.decontaminate import is_contaminated
from stages.tokenizer.bpe import FILENAME as TOKENIZER_FILE

SPLITS = ("train", "val")
ENCODE_BATCH = 256  # documents per encode_batch call and per litdata item
VAL_DOCS = "val_docs.jsonl"
# Pass 1 reads the shards in worker processes from this many stored bytes on: below it, one process reads them
# sooner than a pool of workers starts (about a second, importing pyarrow and the stages).
SCAN_IN_PROCESSES_FROM = 64 << 20


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if xxhash.xxh64_intdigest(doc_id.encode()) % 1_000_000 < val_fraction * 1_000_000 else "train"


Piece = tuple[int, int, int | None]  # (source's number, first document, end document or None: to the end)


def encode_shard(
    piece: Piece,
    shard_uris: list[str],
    split: str,
    tokenizer_path: str,
    eos_id: int,
    val_fraction: float,
    storage_cfg: StorageConfig | None,
    counts_dir: str,
    banned: frozenset[int] = frozenset(),
):
    """litdata worker function: the documents of the split in the piece of a shard (all of a training shard; a
    part of the held-out documents, so every worker has some) as token ids with an EOS after each, one
    int32 tensor per batch of documents, leaving out those that share a 13-gram with an evaluation text
    (`banned`); then the number of documents it kept, in `counts_dir`.

    One tensor per batch, not per document: TokensLoader reads every chunk as one stream of tokens, so where
    items begin does not matter to it, while litdata's per-item cost would be paid 256 times more. It takes the
    shard's index, not its URI: litdata treats string inputs that look like remote paths as files to download
    itself, through its own client, bypassing our storage settings.
    """
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    if multiprocessing.parent_process() is not None:  # a litdata worker (forked): not to outlive a killed stage
        watch_parent_once()
    tokenizer = Tokenizer.from_file(tokenizer_path)
    batch: list[str] = []
    kept = 0

    def flush():
        encodings = tokenizer.encode_batch_fast(batch)
        ids = np.empty(sum(len(e.ids) + 1 for e in encodings), dtype=np.int32)
        position = 0
        for encoding in encodings:
            ids[position : position + len(encoding.ids)] = encoding.ids
            position += len(encoding.ids)
            ids[position] = eos_id
            position += 1
        return torch.from_numpy(ids)

    index, start, end = piece
    if split == "val":  # pass 1 wrote the held-out documents apart: read them, not every shard again
        documents = ((d["id"], d["text"]) for d in _read_jsonl(shard_uris[index], storage_cfg, start, end))
    else:
        documents = read_texts(shard_uris[index], storage_cfg)
    for doc_id, text in documents:
        if split_of(doc_id, val_fraction) != split or is_contaminated(text, banned):
            continue
        batch.append(text)
        kept += 1
        if len(batch) >= ENCODE_BATCH:
            yield flush()
            batch = []
    if batch:
        yield flush()
    Path(counts_dir, f"{split}-{index}-{start}.json").write_text(json.dumps({"docs": kept}))


@functools.cache
def watch_parent_once() -> None:
    exit_when_gone(os.getppid())


def _read_jsonl(uri: str, cfg: StorageConfig | None, start: int = 0, end: int | None = None):
    """Lines [start, end) of a JSONL file, parsed (the lines before `start` are skipped unparsed)."""
    with storage.open_uri(uri, "rb", cfg) as f:
        for line in itertools.islice(f, start, end):
            yield json.loads(line)


def decontamination(cfg: PipelineConfig) -> dict:
    """What the tokenize output is also a function of: the texts whose 13-grams remove training documents."""
    files = {uri: storage.raw_fingerprint(uri, cfg.storage) for uri in cfg.evaluate.decontaminate_with}
    return {"decontamination": {"heldout": "heldout_ppl" in cfg.evaluate.tasks, "files": files}}


def pin_index(uri: str, cfg: StorageConfig | None) -> dict:
    """Replace the wall-clock `updated_at` litdata writes into index.json by a digest of the rest of the index.

    litdata keys its local chunk cache by that value (a new one drops the cached chunks), so a content digest
    keeps that working while making the same shards give the same index, byte for byte.
    """
    index = storage.read_json(uri, cfg)
    index["updated_at"] = storage.digest_of({k: v for k, v in index.items() if k != "updated_at"})
    with storage.atomic_write(uri, cfg, "w") as f:
        f.write(json.dumps(index, sort_keys=True))
    return index


def token_count(index: dict) -> int:
    return sum(chunk["dim"] for chunk in index["chunks"])


def scan_shard(job: tuple[int, str], cfg: PipelineConfig, heldout: bool, tmp: str) -> dict:
    """Pass 1, one shard (in a worker process): its counts, its held-out documents (to tmp/val-<n>.jsonl) and, for
    the held-out decontamination, their 13-gram hashes."""
    index, uri = job
    counts = {"docs_in": 0, "bytes_in": 0, "train": 0, "val": 0}
    banned: set[int] = set()
    with open(Path(tmp, f"val-{index:06d}.jsonl"), "w", encoding="utf-8") as f:
        for doc_id, text in read_texts(uri, cfg.storage):
            counts["docs_in"] += 1
            counts["bytes_in"] += len(text.encode("utf-8"))
            split = split_of(doc_id, cfg.tokenize.val_fraction)
            counts[split] += 1
            if split == "val":
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                if heldout:
                    banned |= decontaminate.ngram_hashes(text)
    return {"counts": counts, "banned": banned}


def held_out_and_banned(b: Build, shard_uris: list[str], stored_bytes: int, counts: dict, tmp: str) -> set[int]:
    """Pass 1: the held-out documents (written for the evaluate stage, in shard order) and the evaluation
    13-grams; the shards are read in `tokenize.workers` processes, not by this one alone."""
    cfg = b.cfg
    banned: set[int] = set()
    for text in decontaminate.texts_from_files(cfg.evaluate.decontaminate_with, cfg.storage):
        banned |= decontaminate.ngram_hashes(text)
    heldout = b.identity["inputs"]["decontamination"]["heldout"]
    scan = partial(scan_shard, cfg=cfg, heldout=heldout, tmp=tmp)
    workers = cfg.tokenize.workers if stored_bytes > SCAN_IN_PROCESSES_FROM else 1
    found = map_in_processes(scan, list(enumerate(shard_uris)), workers)
    with storage.atomic_write(b.out.path(VAL_DOCS), cfg.storage) as out:
        for index, shard in enumerate(found):
            for key in ("docs_in", "bytes_in"):
                counts[key] += shard["counts"][key]
            for split in SPLITS:
                counts["docs"][split] += shard["counts"][split]
            banned |= shard["banned"]
            part = Path(tmp, f"val-{index:06d}.jsonl")
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
            part.unlink()
    return banned


def pieces(split: str, sources: list[str], val_docs: int, workers: int) -> list[Piece]:
    """litdata's inputs, which it deals out to its workers in order: every training shard whole, the held-out
    documents (one file) in one part per worker (whole, it would be one worker's alone)."""
    if split == "train":
        return [(index, 0, None) for index in range(len(sources))]
    parts = max(1, min(workers, val_docs))
    return [(0, k * val_docs // parts, (k + 1) * val_docs // parts) for k in range(parts)]


def write_split(b: Build, split: str, sources: list[str], tokenizer_path: str, banned: frozenset, tmp: str,
                val_docs: int) -> dict:  # fmt: skip
    """Pass 2, one split: token shards through litdata; its pinned index."""
    from litdata import TokensLoader, optimize

    cfg, tc = b.cfg, b.cfg.tokenize
    split_uri = b.out.path(split)
    # No work units here: a build resumed after a kill starts the split over. litdata refuses to write into a
    # folder that already holds a dataset, complete or not.
    storage.remove(split_uri, cfg.storage)
    optimize(
        fn=partial(
            encode_shard,
            shard_uris=sources,
            split=split,
            tokenizer_path=tokenizer_path,
            eos_id=b.inputs["tokenizer"].manifest()["counts"]["eos_id"],
            val_fraction=tc.val_fraction,
            storage_cfg=cfg.storage,
            counts_dir=tmp,
            banned=banned,
        ),
        inputs=pieces(split, sources, val_docs, tc.workers),
        output_dir=split_uri if storage.is_remote(split_uri) else str(Path(split_uri)),
        chunk_bytes=tc.chunk_bytes,
        item_loader=TokensLoader(),
        num_workers=tc.workers,
        reorder_files=False,
        keep_data_ordered=True,
        # fork: litdata's workers and their uploader processes inherit prepare_litdata's http allowance; a
        # spawned worker would start without it and fail on a local endpoint.
        start_method="fork",
        storage_options=storage.prepare_litdata(cfg.storage),
        verbose=False,
    )
    return pin_index(storage.join(split_uri, "index.json"), cfg.storage)


def build(b: Build) -> StageResult:
    cfg, docs, tokenizer = b.cfg, b.inputs["docs"], b.inputs["tokenizer"]
    shards = committed_shards(docs)
    shard_uris = [docs.path(s) for s in shards]
    stored_bytes = sum(docs.manifest()["files"][s]["bytes"] for s in shards)
    counts: dict = {
        "docs_in": 0,
        "bytes_in": 0,
        "tokens": {},
        "docs": {"train": 0, "val": 0},
        "tokenizer_sha256": tokenizer.manifest()["files"][TOKENIZER_FILE]["sha256"],
        "dataset": upstream_digest(docs),  # the deduplicated dataset these tokens come from
    }
    files: list[str] = [VAL_DOCS]
    chunk_bytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        banned = held_out_and_banned(b, shard_uris, stored_bytes, counts, tmp)
        tokenizer_path = str(Path(tmp) / TOKENIZER_FILE)
        with storage.open_uri(tokenizer.path(TOKENIZER_FILE), "rb", cfg.storage) as f:
            Path(tokenizer_path).write_bytes(f.read())
        with storage.atomic_write(b.out.path(TOKENIZER_FILE), cfg.storage) as f:
            f.write(Path(tokenizer_path).read_bytes())
        files.append(TOKENIZER_FILE)
        for split in SPLITS:
            sources = shard_uris if split == "train" else [b.out.path(VAL_DOCS)]
            banned_here = frozenset(banned if split == "train" else ())
            index = write_split(b, split, sources, tokenizer_path, banned_here, tmp, counts["docs"]["val"])
            counts["tokens"][split] = token_count(index)
            chunk_bytes += sum(chunk["chunk_bytes"] for chunk in index["chunks"])
            if split == "train":
                written = sum(json.loads(p.read_text())["docs"] for p in Path(tmp).glob("train-*.json"))
                counts["removed"] = {"decontaminated": counts["docs"]["train"] - written}
            files += [f"{split}/index.json"] + [f"{split}/{c['filename']}" for c in index["chunks"]]
            b.log(f"tokenize: {split}: {counts['tokens'][split]} tokens in {len(index['chunks'])} chunks")
    counts["docs_out"] = counts["docs_in"] - counts["removed"]["decontaminated"]
    counts["bytes_out"] = chunk_bytes  # (the token shards)
    b.log(f"tokenize: {counts['removed']['decontaminated']} training documents share a 13-gram with evaluation texts")
    total = sum(counts["tokens"].values())
    return StageResult(files, counts, {"tokens_total": total, "decontamination_ngrams": len(banned)})


STAGE = Stage(
    name="tokenize",
    folder="tokens",
    package=__package__,
    sections=("tokenize",),
    build=build,
    needs=("docs", "tokenizer"),
    fingerprints=decontamination,
    funnel="tokenized",
)
