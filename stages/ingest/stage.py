"""Ingest: whatever raw files a user brings, local or S3, by path, folder or glob, into the document table.

The formats and how each is read: stages/ingest/readers.py. Every raw record is accounted for: it becomes a document or
is quarantined with its reason, its source file and its position (line, row or WARC record, and byte offset), so
`records in = documents out + quarantined` holds exactly and nothing is silently dropped. Malformed input is
never fatal: a bad record is quarantined alone, and a damaged file keeps the records before the damage and
quarantines the rest as one `unreadable_tail` entry, while the other files of the run are ingested as usual.

Each input file becomes its own run of output shards (`part-<file>-<n>.parquet`) and its own quarantine file,
so files are processed in parallel and the output does not depend on the number of workers. Ids are the
input's own, or its full URI and position (unique across inputs); ids that repeat across the run are counted
and named (stages/ingest/doc_ids.py).
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from functools import partial

import numpy as np

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.documents import ShardWriter, read_texts
from stages.core.stage import RAW_FILES, Build, Log, Progress, Stage, StageResult, run_units
from stages.ingest import doc_ids
from stages.ingest.readers import Record, detect_format, read_records

IDS = "_ids"  # per-unit id hashes for the repeat check (stages/ingest/doc_ids.py), removed once it is done


def list_inputs(cfg: PipelineConfig) -> list[str]:
    """Every input file, in a fixed order; raises naming the pattern that matched nothing."""
    files: list[str] = []
    for pattern in cfg.ingest.inputs:
        found = storage.expand(pattern, cfg.storage)
        if not found:
            raise FileNotFoundError(f"ingest.inputs: {pattern} matches no file")
        for uri in found:
            detect_format(uri)
            files.append(uri)
    return sorted(set(files))


class QuarantineWriter:
    """JSONL of rejected records, opened on the first one so clean inputs leave no empty files."""

    def __init__(self, uri: str, cfg: PipelineConfig):
        self.uri, self.cfg = uri, cfg
        self._context = self._file = None
        self.count = 0

    def write(self, source: str, record: Record) -> None:
        if self._file is None:
            self._context = storage.atomic_write(self.uri, self.cfg.storage, "w")
            self._file = self._context.__enter__()
        entry = {"source": source, "where": record.where, "offset": record.offset, "reason": record.reason,
                 "raw": record.raw}  # fmt: skip
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> bool:
        if self._context is not None:
            self._context.__exit__(None, None, None)
        return self._context is not None


def ingest_file(unit: str, job: tuple[int, str], cfg: PipelineConfig, out_uri: str, progress: Progress) -> dict:
    """One input file to its shards and quarantine file, then its completion marker (the last write)."""
    index, uri = job
    quarantined: Counter = Counter()
    skipped: Counter = Counter()
    extracted: Counter = Counter()
    records = 0
    quarantine_name = f"quarantine/part-{index:04d}.jsonl"
    quarantine = QuarantineWriter(storage.join(out_uri, quarantine_name), cfg)
    hashes = array("Q")
    with ShardWriter(out_uri, f"part-{index:04d}", cfg.ingest.docs_per_shard, cfg.storage) as writer:
        for record in read_records(uri, cfg, skipped, extracted):
            records += 1
            if record.doc is None:
                quarantined[record.reason] += 1
                quarantine.write(uri, record)
            else:
                writer.write(record.doc)
                hashes.append(doc_ids.id_hash(record.doc.id))
    files = list(writer.files) + ([quarantine_name] if quarantine.close() else [])
    doc_ids.write(storage.join(out_uri, IDS, f"{unit}.bin"), np.frombuffer(hashes, dtype=np.uint64), cfg.storage)
    if records != writer.docs + quarantine.count:
        raise AssertionError(f"{uri}: {records} records but {writer.docs} documents + {quarantine.count} quarantined")
    fs, path = storage.filesystem(uri, cfg.storage)
    result = {
        "uri": uri,
        "format": detect_format(uri),
        "raw_bytes": fs.info(path).get("size") or 0,
        "records": records,
        "docs": writer.docs,
        "bytes": writer.text_bytes,
        "quarantined": dict(quarantined),
        "skipped": dict(skipped),
        "extracted_by": dict(extracted),
        "files": files,
    }
    progress.mark(unit, result)
    return result


def repeated_ids(out_uri: str, units: list[str], results: list[dict], cfg: PipelineConfig, log: Log) -> dict:
    """Documents whose id an earlier one of the run has (a count and a few named), from the units' id files."""
    uris = [storage.join(out_uri, IDS, f"{unit}.bin") for unit in units]
    repeats, pairs = doc_ids.find_repeats(uris, cfg.storage)
    named = []
    for positions in pairs:
        ids = [_id_at(out_uri, results[u], doc, cfg) for u, doc in positions]
        if ids[0] != ids[1]:  # a 64-bit hash collision, not a repeat
            repeats -= 1
            continue
        named.append({"id": ids[0], "inputs": [results[u]["uri"] for u, _ in positions]})
    if repeats:
        shown = "; ".join(f"{e['id']!r} in {' and '.join(e['inputs'])}" for e in named)
        log(f"ingest: {repeats} documents repeat an id that an earlier one has (e.g. {shown}); ids are kept as "
            "given (stages downstream work by position), dedup removes the repeats whose texts match")  # fmt: skip
    return {"repeated_ids": repeats, "repeated_id_examples": named}


def _id_at(out_uri: str, result: dict, doc: int, cfg: PipelineConfig) -> str:
    shard, row = divmod(doc, cfg.ingest.docs_per_shard)
    shards = [name for name in result["files"] if name.endswith(".parquet")]  # (in the order they were written)
    for n, (doc_id, _) in enumerate(read_texts(storage.join(out_uri, shards[shard]), cfg.storage)):
        if n == row:
            return doc_id
    raise IndexError(f"{result['uri']}: no document {doc}")


def raw_files(cfg: PipelineConfig) -> dict:
    """The identity's inputs: every input file's fingerprint (size and mtime, or ETag)."""
    return {RAW_FILES: {uri: storage.raw_fingerprint(uri, cfg.storage) for uri in list_inputs(cfg)}}


def check(cfg: PipelineConfig) -> None:
    list_inputs(cfg)


def build(b: Build) -> StageResult:
    cfg, out, log = b.cfg, b.out, b.log
    inputs = list(b.identity["inputs"][RAW_FILES])
    progress = Progress(out)
    units = {f"file-{index:04d}": (index, uri) for index, uri in enumerate(inputs)}
    work = partial(ingest_file, cfg=cfg, out_uri=out.uri, progress=progress)
    results, resumed = run_units(progress, units, work, cfg.ingest.workers, log, cfg.cluster.dask_address, b.progress)
    per_file = list(results.values())
    repeats = progress.result("repeated-ids")
    if repeats is None:  # (done once: a rerun after a kill past this point finds it, the id files gone)
        repeats = repeated_ids(out.uri, list(units), per_file, cfg, log)
        progress.mark("repeated-ids", repeats)
    storage.remove(out.path(IDS), cfg.storage)
    for result in per_file:
        bad = sum(result["quarantined"].values())
        log(f"ingest: {result['uri']}: {result['records']} records -> {result['docs']} documents, {bad} quarantined")
    counts, stats = totals(per_file)
    counts["repeated_ids"] = repeats["repeated_ids"]
    stats.update(repeated_id_examples=repeats["repeated_id_examples"], units_resumed=resumed)
    return StageResult([f for r in per_file for f in r["files"]], counts, stats)


def totals(per_file: list[dict]) -> tuple[dict, dict]:
    """The stage's counts (the core keys: a quarantined record is one removed by its reason) and stats."""
    by_format, quarantined, skipped, extracted = Counter(), Counter(), Counter(), Counter()
    for result in per_file:
        by_format[result["format"]] += result["docs"]
        quarantined.update(result["quarantined"])
        skipped.update(result["skipped"])
        extracted.update(result["extracted_by"])
    removed = dict(sorted(quarantined.items()))
    counts = {
        "files_in": len(per_file),
        "records_in": sum(r["records"] for r in per_file),
        "docs_in": sum(r["records"] for r in per_file),
        "docs_out": sum(r["docs"] for r in per_file),
        "bytes_in": sum(r["raw_bytes"] for r in per_file),  # (the raw files, as stored: compressed or not)
        "bytes_out": sum(r["bytes"] for r in per_file),
        "removed": removed,
        "quarantined": removed,
        "quarantined_total": sum(quarantined.values()),
    }
    stats = {"docs_by_format": dict(by_format), "skipped_records": dict(skipped), "extracted_by": dict(extracted)}
    return counts, stats


STAGE = Stage(
    name="ingest",
    folder="ingest",
    package=__package__,
    sections=("ingest",),
    build=build,
    fingerprints=raw_files,
    check=check,
    units=True,
    funnel="ingested",
)
