"""Filter: FineWeb's heuristic pipeline from datatrove blocks, with removals counted per rule.

Rules, in FineWeb's order and with its settings (every threshold is a field of `FilterConfig`, defaulting to
datatrove's): URL blocklist (the lists datatrove ships), fastText language ID (lid.176, score >= 0.65), Gopher
repetition, Gopher quality, C4 quality (FineWeb turned off its terminal-punctuation rule), FineWeb quality,
then C4 bad words; then, when enabled, CCNet's perplexity filter (KenLM models per language trained on a reference
corpus: stages/perplexity_model.py) and a fastText quality classifier (stages/quality_model.py); kept documents then
have e-mail and public IP addresses redacted (datatrove's PIIFormatter).
Each block's `filter(doc)` is called directly, not through a datatrove executor, so that the first rule that
rejects a document is recorded with the block's own reason (e.g. `gopher_quality:gopher_short_doc`), and a
bounded sample of each rule's removals is kept in `removed/` for inspection.

Nothing downloads at run time. datatrove would fetch lid.176.bin and the LDNOOBW bad-words lists on first use:
pointing their URLs at local files (put under models/ by infra/fetch_models.py) makes it copy those instead;
tldextract is told to use the public-suffix snapshot in its wheel rather than fetch a fresh one.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path

from stages import perplexity_model, quality_model, storage, word_tokens
from stages.config import PipelineConfig
from stages.documents import ShardWriter, read_docs
from stages.ingest import output as ingest_output
from stages.stage import (
    Force,
    Log,
    Progress,
    StageResult,
    committed_shards,
    run_stage,
    run_units,
    stage_identity,
    upstream_digest,
    versioned_output,
)
from stages.storage import StageOutput


def _local_badwords(lists_dir: str) -> None:
    from datatrove.pipeline.filters import c4_filters

    # datatrove builds `_BADWORDS_URL + lang` (and a separate URL for English) and copies local paths.
    c4_filters._BADWORDS_URL = lists_dir.rstrip("/") + "/"
    c4_filters._EN_BADWORDS_URL = str(Path(lists_dir) / "en")
    available = {p.name for p in Path(lists_dir).iterdir()} if Path(lists_dir).is_dir() else set()
    # a language without a list file is kept (and counted by datatrove), never a download attempt
    c4_filters._BADWORDS_LANGS = [lang for lang in c4_filters._BADWORDS_LANGS if lang in available]


# Blocks that hold no state between documents and are costly to build (datatrove's URL blocklists take about a
# second to parse, the fastText models to load) are built once per process and reused for every shard; the
# others are built per shard, so that a shard's output never depends on which shards a process ran before
# (C4BadWordsFilter draws from a seeded generator).
_REUSED: dict[str, object] = {}


def _reused(key: str, make):
    if key not in _REUSED:
        _REUSED[key] = make()
    return _REUSED[key]


def language_rule(cfg: PipelineConfig):
    """datatrove's LanguageFilter with the configured fastText model (lid.176), built once per process."""
    from datatrove.pipeline.filters import LanguageFilter

    fc = cfg.filter
    model_path = Path(fc.lid_model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"filter.lid_model_path: {model_path} does not exist (run `make install`)")

    def make_language():
        language = LanguageFilter(languages=fc.languages or None, language_threshold=fc.language_threshold)
        language.model.MODEL_URL = str(model_path)
        return language

    return _reused(f"language {fc.languages} {fc.language_threshold} {model_path}", make_language)


def language_of(cfg: PipelineConfig, text: str) -> str | None:
    """The language the language rule finds in `text`, or None when it would remove it."""
    from datatrove.data import Document

    doc = Document(text=text, id="")
    return doc.metadata["language"] if language_rule(cfg).filter(doc) else None


def build_rules(
    cfg: PipelineConfig, quality: dict | None = None, perplexity: dict | None = None
) -> list[tuple[str, object]]:
    """The rules in order; `quality` is the trained classifier (stages/quality_model.py) and `perplexity` the
    trained language models (stages/perplexity_model.py), when enabled."""
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        FastTextClassifierFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        URLFilter,
    )
    from tldextract import TLDExtract

    fc = cfg.filter
    rules: list[tuple[str, object]] = []
    if fc.url.enabled:

        def make_url():
            url = URLFilter(**fc.url.block_kwargs())
            url.tldextractor = TLDExtract(suffix_list_urls=())
            return url

        rules.append(("url", _reused(f"url {storage.digest_of(fc.url.block_kwargs())}", make_url)))

    rules.append(("language", language_rule(cfg)))
    blocks = [
        ("gopher_repetition", fc.gopher_repetition, GopherRepetitionFilter),
        ("gopher_quality", fc.gopher_quality, GopherQualityFilter),
        ("c4_quality", fc.c4_quality, C4QualityFilter),
        ("fineweb_quality", fc.fineweb_quality, FineWebQualityFilter),
        ("c4_badwords", fc.c4_badwords, C4BadWordsFilter),
    ]
    if fc.c4_badwords.enabled:
        _local_badwords(fc.c4_badwords.lists_dir)
    rules += [(name, block(**rule.block_kwargs())) for name, rule, block in blocks if rule.enabled]
    if perplexity is not None:
        models = {
            lang: perplexity_model.local_copies(cfg, perplexity["out_uri"], model)
            for lang, model in perplexity["models"].items()
        }
        thresholds = perplexity["thresholds"]
        rules.append(
            (
                "perplexity",
                _reused(
                    f"perplexity {sorted(models.items())} {sorted(thresholds.items())}",
                    lambda: perplexity_model.PerplexityFilter(models, thresholds),
                ),
            )
        )
    if quality is not None:
        model = quality_model.local_copy(cfg, quality["model_uri"])
        keep = [(quality_model.LABEL, quality["threshold"])]
        classifier = _reused(
            f"quality {model} {quality['threshold']}",
            lambda: FastTextClassifierFilter(model, keep_labels=keep, save_labels_in_metadata=False),
        )
        rules.append(("quality", classifier))
    return rules


def first_rejection(rules, document) -> str | None:
    """Name (and datatrove's reason) of the first rule that removes the document, or None to keep it."""
    for name, rule in rules:
        if name == "url" and not document.metadata.get("url"):
            continue  # a document without a URL (a book, a man page) has nothing for this rule to check
        verdict = rule.filter(document)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
        if not keep:
            return f"{name}:{reason}" if reason else name
    return None


def filter_shard(
    unit: str,
    name: str,
    cfg: PipelineConfig,
    in_uri: str,
    out_uri: str,
    progress: Progress,
    quality: dict | None,
    perplexity: dict | None = None,
) -> dict:
    """One ingested shard to its kept and sampled-removed shards, then its completion marker (the last write)."""
    from datatrove.data import Document
    from datatrove.pipeline.formatters import PIIFormatter

    fc = cfg.filter
    word_tokens.install()
    rules = build_rules(cfg, quality, perplexity)
    pii = PIIFormatter(**fc.pii.block_kwargs()) if fc.pii.enabled else None
    removed_docs: Counter = Counter()
    removed_bytes: Counter = Counter()
    languages: Counter = Counter()
    scores: dict[str, Counter] = {}  # perplexity histogram bins per language (stages/perplexity_model.py)
    removed_by_perplexity: Counter = Counter()
    stem = name.removesuffix(".parquet")
    kept = ShardWriter(out_uri, stem, cfg.ingest.docs_per_shard, cfg.storage)
    removed = ShardWriter(storage.join(out_uri, "removed"), stem, cfg.ingest.docs_per_shard, cfg.storage)
    docs_in = bytes_in = redacted = 0
    for doc in read_docs(storage.join(in_uri, name), cfg.storage):
        size = len(doc.text.encode("utf-8"))
        docs_in += 1
        bytes_in += size
        document = Document(text=doc.text, id=doc.id, metadata={**doc.metadata, "url": doc.url})
        rejection = first_rejection(rules, document)
        document.metadata.pop("url")
        doc.metadata = document.metadata  # the language rule adds language and language_score
        languages[doc.metadata.get("language", "unknown")] += 1
        if doc.metadata.get("perplexity") is not None:
            bucket = str(perplexity_model.histogram_bin(doc.metadata["perplexity"]))
            scores.setdefault(doc.metadata["language"], Counter())[bucket] += 1
        if rejection:
            rule = rejection.split(":")[0]
            if rule == "perplexity":
                removed_by_perplexity[doc.metadata["language"]] += 1
            removed_docs[rule] += 1
            removed_bytes[rule] += size
            if removed_docs[rule] <= fc.removed_sample_per_rule:
                doc.metadata["removed_by"] = rejection
                removed.write(doc)
            continue
        doc.text = document.text  # the C4 rule drops unwanted lines from kept documents
        if pii is not None:
            clean = pii.format(doc.text)
            redacted += clean != doc.text
            doc.text = clean
        kept.write(doc)
    files = kept.close() + [f"removed/{f}" for f in removed.close()]
    result = {
        "docs_in": docs_in,
        "bytes_in": bytes_in,
        "docs_out": kept.docs,
        "bytes_out": kept.text_bytes,
        "removed": dict(removed_docs),
        "removed_bytes": dict(removed_bytes),
        "pii_redacted_docs": redacted,
        "languages": dict(languages),
        "perplexity_bins": {lang: dict(hist) for lang, hist in scores.items()},
        "perplexity_removed": dict(removed_by_perplexity),
        "files": files,
    }
    progress.mark(unit, result)
    return result


def identity(cfg: PipelineConfig, upstream: StageOutput | None = None) -> dict:
    upstream = upstream or ingest_output(cfg)
    return stage_identity(
        __name__,
        cfg,
        "filter",
        {
            "docs": upstream_digest(upstream),
            "lid_model": storage.raw_fingerprint(cfg.filter.lid_model_path),
            "badwords": [
                storage.raw_fingerprint(str(p)) for p in sorted(Path(cfg.filter.c4_badwords.lists_dir).glob("*"))
            ],
            "quality_examples": {
                uri: storage.raw_fingerprint(uri, cfg.storage)
                for uri in cfg.filter.quality.positive + cfg.filter.quality.negative
            },
            "perplexity_reference": {
                uri: storage.raw_fingerprint(uri, cfg.storage) for uri in cfg.filter.perplexity.reference
            },
        },
        helpers=(quality_model, perplexity_model, word_tokens),
    )


def output(cfg: PipelineConfig, ident: dict | None = None) -> StageOutput:
    """Where the output of `ident` (default: this config's identity) lives."""
    return versioned_output("filter", "filter", cfg, ident or identity(cfg))


def run(cfg: PipelineConfig, log: Log = print, force: Force = False) -> dict:
    upstream = ingest_output(cfg)
    shards = committed_shards(upstream)
    ident = identity(cfg, upstream)
    out = output(cfg, ident)

    def build() -> StageResult:
        progress = Progress(out)
        quality = None
        if cfg.filter.quality.enabled:
            quality = quality_model.train(cfg, [storage.join(upstream.uri, s) for s in shards], out.uri)
            quality["model_uri"] = out.path(quality["model"])
            log(f"filter: quality classifier {quality['model']}: held-out precision {quality['held_out_precision']}, "
                f"recall {quality['held_out_recall']} at threshold {quality['threshold']}")  # fmt: skip
        perplexity = None
        if cfg.filter.perplexity.enabled:
            pool = [storage.join(upstream.uri, s) for s in shards]
            started = time.perf_counter()
            perplexity = perplexity_model.train(cfg, pool, out.uri, partial(language_of, cfg))
            perplexity["seconds"] = round(time.perf_counter() - started, 3)  # models and thresholds
            perplexity["out_uri"] = out.uri
            for lang, model in perplexity["models"].items():
                log(f"filter: perplexity model {lang}: {model['reference_docs']} reference documents, "
                    f"{model['pieces']} pieces; threshold {perplexity['thresholds'].get(lang)}")  # fmt: skip
        units = {name.removesuffix(".parquet"): name for name in shards}
        work = partial(
            filter_shard, cfg=cfg, in_uri=upstream.uri, out_uri=out.uri, progress=progress, quality=quality,
            perplexity=perplexity,
        )  # fmt: skip
        by_unit, resumed = run_units(progress, units, work, cfg.filter.workers, log, cfg.cluster.dask_address)
        results = list(by_unit.values())
        removed, removed_bytes, languages = Counter(), Counter(), Counter()
        scores: dict[str, Counter] = {}
        removed_by_perplexity: Counter = Counter()
        for result in results:
            removed.update(result["removed"])
            removed_bytes.update(result["removed_bytes"])
            languages.update(result["languages"])
            for lang, hist in result["perplexity_bins"].items():
                scores.setdefault(lang, Counter()).update({int(b): n for b, n in hist.items()})
            removed_by_perplexity.update(result["perplexity_removed"])
        keys = ("docs_in", "bytes_in", "docs_out", "bytes_out", "pii_redacted_docs")
        counts = {key: sum(r[key] for r in results) for key in keys}
        rules = [name for name, _ in build_rules(cfg, quality, perplexity)]
        counts["removed"] = {name: removed.get(name, 0) for name in rules}
        counts["removed_bytes"] = {name: removed_bytes.get(name, 0) for name in rules}
        for rule, n in counts["removed"].items():
            log(f"filter: {rule} removed {n} documents")
        files = [f for r in results for f in r["files"]]
        if quality is not None:
            files.append(quality["model"])
        if perplexity is not None:
            files += [name for model in perplexity["models"].values() for name in (model["sp"], model["lm"])]
            del perplexity["out_uri"]
            perplexity["languages"] = perplexity_model.summarize(
                scores, perplexity["thresholds"], removed_by_perplexity
            )
            for lang, summary in perplexity["languages"].items():
                log(f"filter: perplexity {lang}: {summary}")
        stats = {
            "languages": dict(languages.most_common()),
            "units_resumed": resumed,
            "quality_classifier": quality,
            "perplexity": perplexity,
        }
        return StageResult(files, counts, stats)

    return run_stage(out, ident, build, log, force)
