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
from stages.core.documents import read_batches, read_texts
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
PIECES_PER_WORKER = 8  # (enough that dealing training pieces by size evens out the workers: see shares)


def split_of(doc_id: str, val_fraction: float) -> str:
    return "val" if xxhash.xxh64_intdigest(doc_id.encode()) % 1_000_000 < val_fraction * 1_000_000 else "train"


Piece = tuple[int, int, int | None]  # (source's number, first document, end document or None: to the end)
Share = tuple[Piece, ...]  # one litdata worker's input: all it encodes


def encode_share(
    share: Share,
    shard_uris: list[str],
    split: str,
    tokenizer_path: str,
    eos_id: int,
    val_fraction: float,
    storage_cfg: StorageConfig | None,
    counts_dir: str,
    banned: frozenset[int] = frozenset(),
):
    """litdata worker function: the documents of the split in each piece of the share (training shards whole; a
    part of the held-out documents) as token ids with an EOS after each, one int32 tensor per batch of
    documents, leaving out those that share a 13-gram with an evaluation text (`banned`); then the number of
    documents each piece kept, in `counts_dir`.

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

    def flush():
        docs = [encoding.ids for encoding in tokenizer.encode_batch_fast(batch)]  # (each .ids makes a new list)
        ids = np.empty(sum(map(len, docs)) + len(docs), dtype=np.int32)
        position = 0
        for doc in docs:
            ids[position : position + len(doc)] = doc
            ids[position + len(doc)] = eos_id
            position += len(doc) + 1
        return torch.from_numpy(ids)

    for index, start, end in share:
        if split == "val":  # pass 1 wrote the held-out documents apart: read them, not every shard again
            documents = ((d["id"], d["text"]) for d in _read_jsonl(shard_uris[index], storage_cfg, start, end))
        else:
            documents = read_texts(shard_uris[index], storage_cfg, start, end)
        kept = 0
        for doc_id, text in documents:
            if split_of(doc_id, val_fraction) != split or is_contaminated(text, banned):
                continue
            batch.append(text)
            kept += 1
            if len(batch) >= ENCODE_BATCH:
                yield flush()
                batch = []
        Path(counts_dir, f"{split}-{index}-{start}.json").write_text(json.dumps({"docs": kept}))
    if batch:
        yield flush()


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


def scan_shard(job: tuple[int, str], cfg: PipelineConfig, heldout: bool, tmp: str, cuts: int) -> dict:
    """Pass 1, one shard (in a worker process): its counts, its held-out documents (to tmp/val-<n>.jsonl), for the
    held-out decontamination their 13-gram hashes, and the shard cut in `cuts` runs of documents of about equal
    bytes (pass 2's pieces: see shares).

    Columnar: byte counts come from Arrow and only held-out texts become Python strings, so this pass costs a
    fraction of the second's reading of every training text (pass 2 converts those anyway)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    index, uri = job
    counts = {"docs_in": 0, "bytes_in": 0, "train": 0, "val": 0}
    banned: set[int] = set()
    lengths = []  # (each document's UTF-8 bytes, as str.encode counts them: 8 bytes a document, one shard's)
    with open(Path(tmp, f"val-{index:06d}.jsonl"), "w", encoding="utf-8") as f:
        for batch in read_batches(uri, cfg.storage):
            ids, texts = batch.column(0).to_pylist(), batch.column(1)
            lengths.append(pc.binary_length(texts).fill_null(0).to_numpy().astype(np.int64))
            val = [n for n, doc_id in enumerate(ids) if split_of(doc_id, cfg.tokenize.val_fraction) == "val"]
            counts["val"] += len(val)
            counts["train"] += len(ids) - len(val)
            for n, text in zip(val, texts.take(pa.array(val, pa.int64())).to_pylist()):
                f.write(json.dumps({"id": ids[n], "text": text}, ensure_ascii=False) + "\n")
                if heldout:
                    banned |= decontaminate.ngram_hashes(text)
    ends = np.cumsum(np.concatenate(lengths)) if lengths else np.zeros(0, np.int64)
    counts["docs_in"], counts["bytes_in"] = len(ends), int(ends[-1]) if len(ends) else 0
    cut_at = sorted({0, len(ends), *(int(np.searchsorted(ends, counts["bytes_in"] * k / cuts, "right"))
                                     for k in range(1, cuts))})  # fmt: skip
    pieces = [((index, start, end), int(ends[end - 1] - (ends[start - 1] if start else 0)))
              for start, end in zip(cut_at, cut_at[1:]) if end > start]  # fmt: skip
    return {"counts": counts, "banned": banned, "pieces": pieces}


def held_out_and_banned(b: Build, shard_uris: list[str], stored_bytes: int, counts: dict,
                        tmp: str) -> tuple[set[int], list[tuple[Piece, int]]]:  # fmt: skip
    """Pass 1: the held-out documents (written for the evaluate stage, in shard order), the evaluation 13-grams
    and the training pieces with their bytes; the shards are read in `tokenize.workers` processes, not by this
    one alone."""
    cfg = b.cfg
    banned: set[int] = set()
    for text in decontaminate.texts_from_files(cfg.evaluate.decontaminate_with, cfg.storage):
        banned |= decontaminate.ngram_hashes(text)
    heldout = b.identity["inputs"]["decontamination"]["heldout"]
    # Each shard in enough pieces that every worker gets PIECES_PER_WORKER: one shard whole per piece at scale.
    cuts = max(1, -(-PIECES_PER_WORKER * cfg.tokenize.workers // max(1, len(shard_uris))))
    scan = partial(scan_shard, cfg=cfg, heldout=heldout, tmp=tmp, cuts=cuts)
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
    return banned, [piece for shard in found for piece in shard["pieces"]]


def shares(split: str, pieces: list[tuple[Piece, int]], val_docs: int, workers: int) -> list[Share]:
    """litdata's inputs, one per worker. Training: the pieces of the shards, dealt so that every worker gets about
    as many bytes of text (the largest piece first, each to the lightest share). Held out: the documents (one
    file) in one part per worker.

    One input per worker, not one per shard: litdata deals inputs out in contiguous runs of equal count, which
    left one worker 10% longer than the other on real documents, and its weighted mode shuffles each worker's
    inputs with an unseeded permutation, which would make the shards differ from run to run."""
    if split == "val":
        parts = max(1, min(workers, val_docs))
        return [((0, k * val_docs // parts, (k + 1) * val_docs // parts),) for k in range(parts)]
    loads, dealt = [0] * workers, [[] for _ in range(workers)]
    for piece, size in sorted(pieces, key=lambda p: (-p[1], p[0])):
        lightest = min(range(workers), key=lambda w: (loads[w], w))
        loads[lightest] += size
        dealt[lightest].append(piece)
    return [tuple(sorted(share)) for share in dealt if share]


def write_split(b: Build, split: str, sources: list[str], tokenizer_path: str, banned: frozenset, tmp: str,
                inputs: list[Share]) -> dict:  # fmt: skip
    """Pass 2, one split: token shards through litdata; its pinned index."""
    from litdata import TokensLoader, optimize

    cfg, tc = b.cfg, b.cfg.tokenize
    split_uri = b.out.path(split)
    # No work units here: a build resumed after a kill starts the split over. litdata refuses to write into a
    # folder that already holds a dataset, complete or not.
    storage.remove(split_uri, cfg.storage)
    optimize(
        fn=partial(
            encode_share,
            shard_uris=sources,
            split=split,
            tokenizer_path=tokenizer_path,
            eos_id=b.inputs["tokenizer"].manifest()["counts"]["eos_id"],
            val_fraction=tc.val_fraction,
            storage_cfg=cfg.storage,
            counts_dir=tmp,
            banned=banned,
        ),
        inputs=inputs,
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
        banned, pieces = held_out_and_banned(b, shard_uris, stored_bytes, counts, tmp)
        tokenizer_path = str(Path(tmp) / TOKENIZER_FILE)
        with storage.open_uri(tokenizer.path(TOKENIZER_FILE), "rb", cfg.storage) as f:
            Path(tokenizer_path).write_bytes(f.read())
        with storage.atomic_write(b.out.path(TOKENIZER_FILE), cfg.storage) as f:
            f.write(Path(tokenizer_path).read_bytes())
        files.append(TOKENIZER_FILE)
        for split in SPLITS:
            sources = shard_uris if split == "train" else [b.out.path(VAL_DOCS)]
            banned_here = frozenset(banned if split == "train" else ())
            inputs = shares(split, pieces, counts["docs"]["val"], cfg.tokenize.workers)
            index = write_split(b, split, sources, tokenizer_path, banned_here, tmp, inputs)
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
