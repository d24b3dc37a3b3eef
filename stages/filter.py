"""Filter: FineWeb's heuristic pipeline from datatrove blocks, with removals counted per rule.

The rules run in FineWeb's order and with its settings: fastText language ID (lid.176, score >= 0.65), Gopher
repetition, Gopher quality, C4 quality (FineWeb turned off C4's terminal-punctuation rule) and FineWeb quality.
Each block's `filter(doc)` is called directly, not through a datatrove executor, so that the first rule that
rejects a document is recorded with the block's own reason (e.g. `gopher_quality:gopher_short_doc`) and the
removed document is kept in `removed/` for inspection instead of vanishing.

The language-ID model is read from `filter.lid_model_path` (put there at install time by
infra/fetch_models.py). datatrove would otherwise download lid.176.bin on first use; pointing its MODEL_URL at
the local file makes it copy that instead.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

from stages import storage
from stages.config import PipelineConfig
from stages.documents import ShardWriter, read_docs
from stages.ingest import output as ingest_output
from stages.parallel import map_in_processes
from stages.stage import Log, StageResult, committed_shards, run_stage, stage_identity, upstream_digest
from stages.storage import StageOutput


def build_rules(cfg: PipelineConfig) -> list[tuple[str, object]]:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )

    fc = cfg.filter
    model_path = Path(fc.lid_model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"filter.lid_model_path: {model_path} does not exist (run `make install`)")
    language = LanguageFilter(languages=fc.languages or None, language_threshold=fc.language_threshold)
    language.model.MODEL_URL = str(model_path)
    rules: list[tuple[str, object]] = [("language", language)]
    if fc.gopher_repetition:
        rules.append(("gopher_repetition", GopherRepetitionFilter()))
    if fc.gopher_quality:
        rules.append(("gopher_quality", GopherQualityFilter()))
    if fc.c4_quality:
        rules.append(("c4_quality", C4QualityFilter(filter_no_terminal_punct=False)))
    if fc.fineweb_quality:
        rules.append(("fineweb_quality", FineWebQualityFilter()))
    return rules


def first_rejection(rules, document) -> str | None:
    """Name (and datatrove's reason) of the first rule that removes the document, or None to keep it."""
    for name, rule in rules:
        verdict = rule.filter(document)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
        if not keep:
            return f"{name}:{reason}" if reason else name
    return None


def filter_shard(name: str, cfg: PipelineConfig, in_uri: str, out_uri: str) -> dict:
    from datatrove.data import Document

    rules = build_rules(cfg)
    removed_by: Counter = Counter()
    languages: Counter = Counter()
    stem = name.removesuffix(".parquet")
    kept = ShardWriter(out_uri, stem, cfg.ingest.docs_per_shard, cfg.storage)
    removed = ShardWriter(storage.join(out_uri, "removed"), stem, cfg.ingest.docs_per_shard, cfg.storage)
    docs_in = bytes_in = 0
    for doc in read_docs(storage.join(in_uri, name), cfg.storage):
        docs_in += 1
        bytes_in += len(doc.text.encode("utf-8"))
        document = Document(text=doc.text, id=doc.id, metadata=dict(doc.metadata))
        rejection = first_rejection(rules, document)
        doc.metadata = document.metadata  # the language rule adds language and language_score
        languages[doc.metadata.get("language", "unknown")] += 1
        if rejection:
            removed_by[rejection.split(":")[0]] += 1
            doc.metadata["removed_by"] = rejection
            removed.write(doc)
        else:
            doc.text = document.text  # the C4 rule drops unwanted lines from kept documents
            kept.write(doc)
    files = kept.close() + [f"removed/{f}" for f in removed.close()]
    return {
        "docs_in": docs_in,
        "bytes_in": bytes_in,
        "docs_out": kept.docs,
        "bytes_out": kept.text_bytes,
        "removed": dict(removed_by),
        "languages": dict(languages),
        "files": files,
    }


def output(cfg: PipelineConfig) -> StageOutput:
    return StageOutput("filter", storage.join(cfg.storage.root, "filter"), cfg.storage)


def run(cfg: PipelineConfig, log: Log = print) -> dict:
    upstream = ingest_output(cfg)
    shards = committed_shards(upstream)
    out = output(cfg)
    identity = stage_identity(
        __name__,
        cfg,
        "filter",
        {"docs": upstream_digest(upstream), "lid_model": storage.raw_fingerprint(cfg.filter.lid_model_path)},
    )

    def build() -> StageResult:
        results = map_in_processes(
            partial(filter_shard, cfg=cfg, in_uri=upstream.uri, out_uri=out.uri), shards, cfg.filter.workers
        )
        removed: Counter = Counter()
        languages: Counter = Counter()
        for result in results:
            removed.update(result["removed"])
            languages.update(result["languages"])
        counts = {key: sum(r[key] for r in results) for key in ("docs_in", "bytes_in", "docs_out", "bytes_out")}
        counts["removed"] = {name: removed.get(name, 0) for name, _ in build_rules(cfg)}
        for rule, n in counts["removed"].items():
            log(f"filter: {rule} removed {n} documents")
        files = [f for r in results for f in r["files"]]
        return StageResult(files, counts, {"languages": dict(languages.most_common())})

    return run_stage(out, identity, build, log)
