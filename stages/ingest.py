"""Ingest: whatever raw files a user brings, local or S3, by path, folder or glob, into the document table.

Formats, by extension: JSONL (.jsonl/.json, plain, .gz or .zst), Parquet, WARC with HTML pages (text
extracted by trafilatura through datatrove), WET (.wet[.gz]: text already extracted), and plain text files
(.txt/.md, one document per file, as LitGPT's TextFiles).

Every raw record is accounted for: it becomes a document or is quarantined with its reason, its source file
and its line (or row, or WARC record number), so `records in = documents out + quarantined` holds exactly and
nothing is silently dropped. Malformed input is never fatal. That accounting is why JSONL and Parquet are read
here line by line and row by row rather than through datatrove's readers, which skip bad records without
saying where; WARC parsing (`process_record`) and HTML extraction (`Trafilatura`, run in datatrove's sandbox
process so a pathological page times out instead of hanging the stage) are datatrove's.

Each input file becomes its own run of output shards (`part-<file>-<n>.parquet`) and its own quarantine file,
so files are processed in parallel and the output does not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import IO

from datatrove.pipeline.extractors.base import ExtractorSandbox

from stages import storage
from stages.config import IngestConfig, PipelineConfig
from stages.documents import Doc, ShardWriter
from stages.parallel import exit_when_gone
from stages.stage import Force, Log, Progress, StageResult, run_stage, run_units, stage_identity, versioned_output
from stages.storage import StageOutput

FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json": "jsonl",
    ".json.gz": "jsonl",
    ".json.zst": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc",
    ".warc.gz": "warc",
    ".wet": "warc",
    ".wet.gz": "warc",
    ".txt": "text",
    ".md": "text",
}
QUARANTINE_RAW_CHARS = 2000  # enough of a bad record to see what is wrong with it


def detect_format(uri: str) -> str:
    name = PurePosixPath(uri).name.lower()
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{uri}: unknown input format (expected one of {', '.join(sorted(FORMATS))})")


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


@dataclass
class Record:
    """One raw record: a document, or why it is not one."""

    where: str  # "line 12", "row 7", "record 3", "file"
    doc: Doc | None = None
    reason: str | None = None
    raw: str = ""


def _bad(where: str, reason: str, raw) -> Record:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return Record(where, reason=reason, raw=str(raw)[:QUARANTINE_RAW_CHARS])


def _check_text(text, where: str, ic: IngestConfig, raw) -> Record | None:
    if not isinstance(text, str):
        return _bad(where, "missing_text", raw)
    if len(text.strip()) < ic.min_text_chars:
        return _bad(where, "empty_text", raw)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape: not representable as UTF-8
        return _bad(where, "not_utf8", raw)
    if size > ic.max_doc_bytes:
        return _bad(where, "too_large", f"{size} bytes: {text[:200]}")
    return None


def _from_object(obj: dict, uri: str, where: str, ic: IngestConfig, raw) -> Record:
    text = obj.get("text")
    bad = _check_text(text, where, ic, raw)
    if bad:
        return bad
    metadata = obj.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            metadata = {"metadata": metadata}
    if not isinstance(metadata, dict):
        metadata = {"metadata": metadata}
    extra = {k: v for k, v in obj.items() if k not in ("id", "text", "url", "metadata") and v is not None}
    doc_id = obj.get("id")
    doc_id = str(doc_id) if doc_id is not None else f"{PurePosixPath(uri).name}/{where.split()[-1]}"
    url = obj.get("url")
    return Record(where, Doc(doc_id, text.strip(), uri, str(url) if url else None, {**metadata, **extra}))


@contextlib.contextmanager
def open_lines(uri: str, cfg: PipelineConfig) -> Iterator[IO[bytes]]:
    """A binary file object that iterates over lines, decompressing .gz and .zst on the fly.

    fsspec's own zstd wrapper cannot iterate lines, so both codecs are wrapped here in the same way.
    """
    with storage.open_uri(uri, "rb", cfg.storage) as raw:
        name = uri.lower()
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                yield io.BufferedReader(reader)
        else:
            yield raw


def read_jsonl(uri: str, cfg: PipelineConfig) -> Iterator[Record]:
    with open_lines(uri, cfg) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue  # a blank line is not a record
            where = f"line {number}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield _bad(where, "not_utf8", line)
                continue
            except json.JSONDecodeError:
                yield _bad(where, "invalid_json", line)
                continue
            if not isinstance(obj, dict):
                yield _bad(where, "not_an_object", line)
                continue
            yield _from_object(obj, uri, where, cfg.ingest, line)


def read_parquet(uri: str, cfg: PipelineConfig) -> Iterator[Record]:
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "rb", cfg.storage) as f:
        row = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield _from_object(obj, uri, f"row {row}", cfg.ingest, json.dumps(obj, default=str))


def read_text_file(uri: str, cfg: PipelineConfig) -> Iterator[Record]:
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield _bad("file", "not_utf8", data)
        return
    yield _from_object({"id": uri, "text": text}, uri, "file", cfg.ingest, data)


class RestartableSandbox(ExtractorSandbox):
    """datatrove's ExtractorSandbox (HTML extraction in a child process that a timeout can kill), restartable
    under any start method.

    After a timeout the sandbox starts a new child, pickling itself as part of the child's target unless the
    start method is fork. Inside our worker processes the start method is forkserver, and the sandbox then holds
    the previous child's Process object, which cannot be pickled ('cannot pickle weakref'): the restart failed,
    and every later page of the file with it. The child needs only the sandbox's settings, so only those are
    pickled.
    """

    def __init__(self, timeout: float, warmup_text: str = ""):
        super().__init__(timeout, warmup_text)
        self.owner = os.getpid()

    def __getstate__(self) -> dict:
        return {"timeout": self.timeout, "warmup_text": self.warmup_text, "owner": self.owner}

    def _worker(self, conn, extract_fn):
        exit_when_gone(self.owner)  # (the child: it must not outlive the process extracting through it)
        return super()._worker(conn, extract_fn)


def read_warc(uri: str, cfg: PipelineConfig, skipped: Counter) -> Iterator[Record]:
    """Response records with HTML (extracted) and WET conversion records (already text)."""
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    timeout = cfg.ingest.extract_timeout_s
    extractor = Trafilatura(favour_precision=True, timeout=timeout)
    with storage.open_uri(uri, "rb", cfg.storage) as f, RestartableSandbox(timeout) as sandbox:
        for number, record in enumerate(ArchiveIterator(f), 1):
            if record.rec_type not in ("response", "conversion"):
                skipped["warc_non_document_records"] += 1  # warcinfo, request, metadata: not documents
                continue
            data = process_record(record)
            if data is None:
                skipped["warc_non_html_records"] += 1  # images, PDFs, ...: not text documents
                continue
            where = f"record {number}"
            text = data["text"]
            if record.rec_type == "response":
                try:
                    text = sandbox.process_document(text, extractor.extract) or ""
                except TimeoutError:
                    yield _bad(where, "extraction_timeout", data["url"])
                    continue
                except Exception as exc:  # the child died or trafilatura raised: this page, not the stage
                    yield _bad(where, "extraction_failed", f"{data['url']}: {exc}")
                    continue
                if not text.strip():
                    yield _bad(where, "extraction_empty", data["url"])
                    continue
            obj = {"id": data["id"], "text": text, "url": data["url"], "metadata": {"date": data["date"]}}
            yield _from_object(obj, uri, where, cfg.ingest, data["url"])


def read_records(uri: str, cfg: PipelineConfig, skipped: Counter) -> Iterator[Record]:
    fmt = detect_format(uri)
    if fmt == "jsonl":
        return read_jsonl(uri, cfg)
    if fmt == "parquet":
        return read_parquet(uri, cfg)
    if fmt == "text":
        return read_text_file(uri, cfg)
    return read_warc(uri, cfg, skipped)


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
        entry = {"source": source, "where": record.where, "reason": record.reason, "raw": record.raw}
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
    records = 0
    quarantine_name = f"quarantine/part-{index:04d}.jsonl"
    quarantine = QuarantineWriter(storage.join(out_uri, quarantine_name), cfg)
    with ShardWriter(out_uri, f"part-{index:04d}", cfg.ingest.docs_per_shard, cfg.storage) as writer:
        for record in read_records(uri, cfg, skipped):
            records += 1
            if record.doc is None:
                quarantined[record.reason] += 1
                quarantine.write(uri, record)
            else:
                writer.write(record.doc)
    files = list(writer.files) + ([quarantine_name] if quarantine.close() else [])
    if records != writer.docs + quarantine.count:
        raise AssertionError(f"{uri}: {records} records but {writer.docs} documents + {quarantine.count} quarantined")
    result = {
        "uri": uri,
        "format": detect_format(uri),
        "records": records,
        "docs": writer.docs,
        "bytes": writer.text_bytes,
        "quarantined": dict(quarantined),
        "skipped": dict(skipped),
        "files": files,
    }
    progress.mark(unit, result)
    return result


def identity(cfg: PipelineConfig, inputs: list[str] | None = None) -> dict:
    inputs = list_inputs(cfg) if inputs is None else inputs
    return stage_identity(__name__, cfg, "ingest", {uri: storage.raw_fingerprint(uri, cfg.storage) for uri in inputs})


def output(cfg: PipelineConfig, ident: dict | None = None) -> StageOutput:
    """Where the output of `ident` (default: this config's identity) lives."""
    return versioned_output("ingest", "ingest", cfg, ident or identity(cfg))


def run(cfg: PipelineConfig, log: Log = print, force: Force = False) -> dict:
    inputs = list_inputs(cfg)
    ident = identity(cfg, inputs)
    out = output(cfg, ident)

    def build() -> StageResult:
        progress = Progress(out)
        units = {f"file-{index:04d}": (index, uri) for index, uri in enumerate(inputs)}
        work = partial(ingest_file, cfg=cfg, out_uri=out.uri, progress=progress)
        results, resumed = run_units(progress, units, work, cfg.ingest.workers, log, cfg.cluster.dask_address)
        per_file = list(results.values())
        files, by_format, quarantined, skipped = [], Counter(), Counter(), Counter()
        for result in per_file:
            files += result["files"]
            by_format[result["format"]] += result["docs"]
            quarantined.update(result["quarantined"])
            skipped.update(result["skipped"])
            bad = sum(result["quarantined"].values())
            log(
                f"ingest: {result['uri']}: {result['records']} records -> {result['docs']} documents, {bad} quarantined"
            )
        counts = {
            "files_in": len(inputs),
            "records_in": sum(r["records"] for r in per_file),
            "docs_in": sum(r["records"] for r in per_file),
            "docs_out": sum(r["docs"] for r in per_file),
            "bytes_out": sum(r["bytes"] for r in per_file),
            "quarantined": dict(sorted(quarantined.items())),
            "quarantined_total": sum(quarantined.values()),
        }
        stats = {"docs_by_format": dict(by_format), "skipped_records": dict(skipped), "units_resumed": resumed}
        return StageResult(files, counts, stats)

    return run_stage(out, ident, build, log, force)
