"""Ingest: whatever raw files a user brings, local or S3, by path, folder or glob, into the document table.

The formats and how each is read: stages/ingest/readers.py. Every raw record is accounted for: it becomes a document or
is quarantined with its reason, its source file and its position (line, row or WARC record, and byte offset), so
`records in = documents out + quarantined` holds exactly and nothing is silently dropped. Malformed input is
never fatal: a bad record is quarantined alone, and a damaged file keeps the records before the damage and
quarantines the rest as one `unreadable_tail` entry, while the other files of the run are ingested as usual.

A unit of work is a slice of an input file: the whole of a small one, about `ingest.slice_bytes` of a big one
(stages/ingest/slices.py: cut at line ends, row groups or WARC records), so a single 1 GB file keeps every
worker busy. Each slice becomes its own run of output shards (`part-<file>-<slice>-<n>.parquet`) and its own
quarantine file, has its own completion marker (a killed run redoes only unfinished slices), and reads the same
records with the same positions and ids as reading the whole file: the output does not depend on the number of
workers. Ids are the input's own, or its full URI and position (unique across inputs); ids that repeat across
the run are counted and named (stages/ingest/doc_ids.py).
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
from stages.ingest.readers import Cursor, Record, Tally, detect_format, read_records
from stages.ingest.slices import WHOLE, Slice, plan, splittable

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


Job = tuple[int, str, str, Slice]  # (input file's number, its URI, the slice's name, the slice)


def plan_file(unit: str, job: tuple[int, str, int], cfg: PipelineConfig, progress: Progress) -> dict:
    """A file's slices, as its completion marker (so a resumed run cuts it the same way without reading it again)."""
    _, uri, size = job
    result = {"slices": [piece.to_list() for piece in plan(uri, detect_format(uri), size, cfg)]}
    progress.mark(unit, result)
    return result


def ingest_slice(unit: str, job: Job, cfg: PipelineConfig, out_uri: str, progress: Progress) -> dict:
    """One slice of an input file to its shards and quarantine file, then its completion marker (the last write)."""
    index, uri, name, piece = job
    quarantined: Counter = Counter()
    tally, cursor = Tally(), Cursor(offset=piece.start)
    records = 0
    quarantine_name = f"quarantine/part-{index:04d}-{name}.jsonl"
    quarantine = QuarantineWriter(storage.join(out_uri, quarantine_name), cfg)
    hashes = array("Q")
    with ShardWriter(out_uri, f"part-{index:04d}-{name}", cfg.ingest.docs_per_shard, cfg.storage) as writer:
        for record in read_records(uri, cfg, tally, piece, cursor):
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
        "slice": piece.to_list(),
        "next_record": cursor.next_record,
        "format": detect_format(uri),
        "raw_bytes": fs.info(path).get("size") or 0,  # (the whole file's: counted once per file in the totals)
        "records": records,
        "docs": writer.docs,
        "bytes": writer.text_bytes,
        "quarantined": dict(quarantined),
        "skipped": dict(tally.skipped),
        "extracted_by": dict(tally.extracted),
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
    run = partial(run_units, progress, workers=cfg.ingest.workers, log=log, dask_address=cfg.cluster.dask_address)
    units, planned = slice_units(inputs, cfg, progress, run)
    work = partial(ingest_slice, cfg=cfg, out_uri=out.uri, progress=progress)
    results, resumed = run(units=units, work=work, on_progress=b.progress)
    resumed += planned
    if false_cuts := falsely_cut(units, results):
        log(f"ingest: {len(false_cuts)} WARC file(s) cut where no record starts (an archived WARC inside a page?): "
            f"read again whole: {', '.join(inputs[i] for i in sorted(false_cuts))}")  # fmt: skip
        units, results = read_whole(false_cuts, inputs, units, results, run, work, out, cfg)
    per_unit = list(results.values())
    repeats = progress.result("repeated-ids")
    if repeats is None:  # (done once: a rerun after a kill past this point finds it, the id files gone)
        repeats = repeated_ids(out.uri, list(units), per_unit, cfg, log)
        progress.mark("repeated-ids", repeats)
    storage.remove(out.path(IDS), cfg.storage)
    for uri, (docs, records, bad) in per_file(per_unit).items():
        log(f"ingest: {uri}: {records} records -> {docs} documents, {bad} quarantined")
    counts, stats = totals(per_unit)
    counts["repeated_ids"] = repeats["repeated_ids"]
    stats.update(repeated_id_examples=repeats["repeated_id_examples"], units_resumed=resumed, slices=len(units))
    return StageResult([f for r in per_unit for f in r["files"]], counts, stats)


def slice_units(inputs: list[str], cfg: PipelineConfig, progress: Progress, run) -> tuple[dict[str, Job], int]:
    """Every input file's slices as units of work, in file order, and how many planning units had been done:
    big files are cut by planning units (in parallel, each marked done: a resumed run cuts the same way without
    reading the files again)."""
    sizes = {i: size_if_splittable(uri, cfg) for i, uri in enumerate(inputs)}
    to_plan = {f"plan-{i:04d}": (i, uri, sizes[i]) for i, uri in enumerate(inputs) if sizes[i] > cfg.ingest.slice_bytes}
    planned, resumed = run(units=to_plan, work=partial(plan_file, cfg=cfg, progress=progress))
    units = {}
    for index, uri in enumerate(inputs):
        found = planned.get(f"plan-{index:04d}")
        pieces = [Slice(*piece) for piece in found["slices"]] if found else [WHOLE]
        for k, piece in enumerate(pieces):
            units[f"file-{index:04d}-{k:04d}"] = (index, uri, f"{k:04d}", piece)
    return units, resumed


def size_if_splittable(uri: str, cfg: PipelineConfig) -> int:
    """A file's size when it can be cut (a file bigger than a slice is planned), else 0 without asking."""
    if not splittable(uri, detect_format(uri)):
        return 0
    fs, path = storage.filesystem(uri, cfg.storage)
    return fs.info(path).get("size") or 0


def falsely_cut(units: dict[str, Job], results: dict[str, dict]) -> set[int]:
    """Files (their numbers) with a slice whose next record did not start where the next slice began: a false
    WARC cut (stages/ingest/slices.py). A slice that ended at damage says nothing about the next one."""
    wrong, names = set(), list(units)
    for name, after in zip(names, names[1:]):
        (index, *_), (next_index, _, _, piece) = units[name], units[after]
        result = results[name]
        if index == next_index and result["format"] == "warc" and "unreadable_tail" not in result["quarantined"]:
            if result["next_record"] != piece.start:
                wrong.add(index)
    return wrong


def read_whole(files: set[int], inputs: list[str], units: dict, results: dict, run, work, out, cfg: PipelineConfig):
    """The units and results with each of `files` read as one slice, its slices' output removed."""
    whole = {f"file-{i:04d}-whole": (i, inputs[i], "whole", WHOLE) for i in sorted(files)}
    done, _ = run(units=whole, work=work)
    kept_units, kept_results = {}, {}
    for name, job in [*units.items(), *whole.items()]:
        if job[0] in files and job[2] != "whole":
            for file in results[name]["files"]:
                storage.remove(out.path(file), cfg.storage)
            continue
        kept_units[name], kept_results[name] = job, results.get(name) or done[name]
    order = sorted(kept_units, key=lambda name: kept_units[name][0])  # (file order; a file's slices in order)
    return {n: kept_units[n] for n in order}, {n: kept_results[n] for n in order}


def per_file(per_unit: list[dict]) -> dict[str, tuple[int, int, int]]:
    """(documents, records, quarantined) of each input file, over its slices."""
    found: dict[str, Counter] = {}
    for result in per_unit:
        count = found.setdefault(result["uri"], Counter())
        count.update(docs=result["docs"], records=result["records"], bad=sum(result["quarantined"].values()))
    return {uri: (c["docs"], c["records"], c["bad"]) for uri, c in found.items()}


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
        "files_in": len({r["uri"] for r in per_file}),
        "records_in": sum(r["records"] for r in per_file),
        "docs_in": sum(r["records"] for r in per_file),
        "docs_out": sum(r["docs"] for r in per_file),
        "bytes_in": sum({r["uri"]: r["raw_bytes"] for r in per_file}.values()),  # (the raw files, as stored)
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
