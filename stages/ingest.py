"""Ingest: raw files (JSONL[.gz], Parquet, WARC with HTML) from local paths or S3 into the document table.

Reading and HTML extraction are datatrove's blocks (JsonlReader, ParquetReader, WarcReader, Trafilatura), run
as plain generators over one file at a time rather than through a datatrove executor: the stage then owns its
output layout, its manifest and its stats, and any datatrove block can still be dropped in. Each input file
becomes its own run of output shards (`part-<file>-<n>.parquet`), so files are processed in parallel and the
output does not depend on the number of workers.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import PurePosixPath

from stages import storage
from stages.config import PipelineConfig
from stages.documents import Doc, ShardWriter
from stages.parallel import map_in_processes
from stages.stage import Log, StageResult, run_stage, stage_identity
from stages.storage import StageOutput

FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc",
    ".warc.gz": "warc",
}


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


def _adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """Map a raw record to datatrove's fields, keeping a nested `metadata` object flat and the URL apart."""
    data = dict(data)
    metadata = data.pop("metadata", None) or {}
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    text = data.pop(self.text_key, None)
    doc_id = data.pop(self.id_key, None)
    return {
        "text": text,
        "id": str(doc_id) if doc_id is not None else f"{PurePosixPath(path).name}/{id_in_file}",
        "metadata": {**metadata, **{k: v for k, v in data.items() if v is not None}},
    }


def _reader(fmt: str, folder, name: str):
    from datatrove.pipeline.readers import JsonlReader, ParquetReader, WarcReader

    if fmt == "jsonl":
        return JsonlReader(folder, adapter=_adapter).read_file(name)
    if fmt == "parquet":
        return ParquetReader(folder, adapter=_adapter).read_file(name)
    from datatrove.pipeline.extractors import Trafilatura

    records = WarcReader(folder, adapter=_adapter).read_file(name)
    return Trafilatura(favour_precision=True, timeout=5.0).run(records)


def ingest_file(job: tuple[int, str], cfg: PipelineConfig, out_uri: str) -> dict:
    index, uri = job
    fmt = detect_format(uri)
    parent, _, name = uri.rpartition("/")
    folder = (parent, storage.storage_options(cfg.storage)) if storage.is_remote(uri) else parent
    counts: Counter = Counter()
    with ShardWriter(out_uri, f"part-{index:04d}", cfg.ingest.docs_per_shard, cfg.storage) as writer:
        for document in _reader(fmt, folder, name):
            counts["records"] += 1
            text = (document.text or "").strip()
            if len(text) < cfg.ingest.min_text_chars:
                counts["too_short"] += 1
                continue
            metadata = dict(document.metadata)
            url = metadata.pop("url", None)
            writer.write(Doc(document.id, text, uri, url, metadata))
    return {
        "uri": uri,
        "format": fmt,
        "records": counts["records"],
        "too_short": counts["too_short"],
        "docs": writer.docs,
        "bytes": writer.text_bytes,
        "files": writer.files,
    }


def identity(cfg: PipelineConfig, inputs: list[str]) -> dict:
    return stage_identity(__name__, cfg, "ingest", {uri: storage.raw_fingerprint(uri, cfg.storage) for uri in inputs})


def output(cfg: PipelineConfig) -> StageOutput:
    return StageOutput("ingest", storage.join(cfg.storage.root, "ingest"), cfg.storage)


def run(cfg: PipelineConfig, log: Log = print) -> dict:
    inputs = list_inputs(cfg)
    out = output(cfg)

    def build() -> StageResult:
        per_file = map_in_processes(
            partial(ingest_file, cfg=cfg, out_uri=out.uri), enumerate(inputs), cfg.ingest.workers
        )
        files, by_format = [], Counter()
        for result in per_file:
            files += result["files"]
            by_format[result["format"]] += result["docs"]
            log(f"ingest: {result['uri']}: {result['records']} records -> {result['docs']} documents")
        counts = {
            "files_in": len(inputs),
            "records_in": sum(r["records"] for r in per_file),
            "docs_in": sum(r["records"] for r in per_file),
            "docs_out": sum(r["docs"] for r in per_file),
            "bytes_out": sum(r["bytes"] for r in per_file),
            "removed": {"too_short": sum(r["too_short"] for r in per_file)},
        }
        return StageResult(files, counts, {"docs_by_format": dict(by_format)})

    return run_stage(out, identity(cfg, inputs), build, log)
