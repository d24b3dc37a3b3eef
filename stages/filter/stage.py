"""Filter: FineWeb's heuristic pipeline from datatrove blocks, with removals counted per rule.

Rules, in FineWeb's order and with its settings (every threshold is a field of `FilterConfig`, defaulting to
datatrove's): URL blocklist (the lists datatrove ships), fastText language ID (lid.176, score >= 0.65), Gopher
repetition, Gopher quality, C4 quality (FineWeb turned off its terminal-punctuation rule), FineWeb quality,
then C4 bad words (the blocks: rules.py); then, when enabled, CCNet's perplexity filter (KenLM models per language
trained on a reference corpus: perplexity_model.py) and a fastText quality classifier (quality_model.py); kept
documents then have e-mail and public IP addresses redacted (datatrove's PIIFormatter).
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

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.documents import ShardWriter, read_docs
from stages.core.stage import Build, Progress, Stage, StageResult, committed_shards, run_units
from stages.filter import browse, perplexity_model, quality_model, repetition, word_tokens
from stages.filter.rules import build_rules, first_rejection, language_of


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
    repetition.install()
    rules = build_rules(cfg, quality, perplexity)
    pii = PIIFormatter(**fc.pii.block_kwargs()) if fc.pii.enabled else None
    removed_docs: Counter = Counter()
    removed_bytes: Counter = Counter()
    languages: Counter = Counter()
    scores: dict[str, Counter] = {}  # perplexity histogram bins per language (stages/filter/perplexity_model.py)
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


def fingerprints(cfg: PipelineConfig) -> dict:
    """What else the filter reads: the language-ID model, the bad-words lists, the quality classifier's examples
    and the perplexity filter's reference corpus."""
    fc = cfg.filter
    return {
        "lid_model": storage.raw_fingerprint(fc.lid_model_path),
        "badwords": [storage.raw_fingerprint(str(p)) for p in sorted(Path(fc.c4_badwords.lists_dir).glob("*"))],
        "quality_examples": {
            uri: storage.raw_fingerprint(uri, cfg.storage) for uri in fc.quality.positive + fc.quality.negative
        },
        "perplexity_reference": {uri: storage.raw_fingerprint(uri, cfg.storage) for uri in fc.perplexity.reference},
    }


def check(cfg: PipelineConfig) -> None:
    language_model = cfg.filter.lid_model_path
    if not Path(language_model).is_file():
        raise FileNotFoundError(f"filter.lid_model_path: {language_model} does not exist (run `make install`)")
    pc = cfg.filter.perplexity
    if not pc.enabled:
        return
    for i, uri in enumerate(pc.reference):
        if not storage.expand(uri, cfg.storage):
            raise FileNotFoundError(f"filter.perplexity.reference[{i}]: {uri} does not exist")
    missing = perplexity_model.kenlm_installed()
    if missing:
        raise FileNotFoundError(f"filter.perplexity: {missing}")


def train_quality(b: Build, pool: list[str]) -> dict | None:
    """The quality classifier, trained on the pool against the reference examples, when enabled."""
    if not b.cfg.filter.quality.enabled:
        return None
    quality = quality_model.train(b.cfg, pool, b.out.uri)
    quality["model_uri"] = b.out.path(quality["model"])
    b.log(f"filter: quality classifier {quality['model']}: held-out precision {quality['held_out_precision']}, "
          f"recall {quality['held_out_recall']} at threshold {quality['threshold']}")  # fmt: skip
    return quality


def train_perplexity(b: Build, pool: list[str]) -> dict | None:
    """The perplexity filter's language models and thresholds, trained on the reference corpus, when enabled."""
    if not b.cfg.filter.perplexity.enabled:
        return None
    started = time.perf_counter()
    perplexity = perplexity_model.train(b.cfg, pool, b.out.uri, partial(language_of, b.cfg))
    perplexity["seconds"] = round(time.perf_counter() - started, 3)  # models and thresholds
    perplexity["out_uri"] = b.out.uri
    for lang, model in perplexity["models"].items():
        b.log(f"filter: perplexity model {lang}: {model['reference_docs']} reference documents, "
              f"{model['pieces']} pieces; threshold {perplexity['thresholds'].get(lang)}")  # fmt: skip
    return perplexity


def build(b: Build) -> StageResult:
    cfg, docs = b.cfg, b.inputs["docs"]
    shards = committed_shards(docs)
    pool = [docs.path(s) for s in shards]
    quality, perplexity = train_quality(b, pool), train_perplexity(b, pool)
    progress = Progress(b.out)
    units = {name.removesuffix(".parquet"): name for name in shards}
    work = partial(
        filter_shard, cfg=cfg, in_uri=docs.uri, out_uri=b.out.uri, progress=progress, quality=quality,
        perplexity=perplexity,
    )  # fmt: skip
    by_unit, resumed = run_units(progress, units, work, cfg.filter.workers, b.log, cfg.cluster.dask_address, b.progress)
    results = list(by_unit.values())
    rules = [name for name, _ in build_rules(cfg, quality, perplexity)]
    counts, scores, removed_by_perplexity = totals(results, rules)
    for rule, n in counts["removed"].items():
        b.log(f"filter: {rule} removed {n} documents")
    files = [f for r in results for f in r["files"]]
    if quality is not None:
        files.append(quality["model"])
    if perplexity is not None:
        files += [name for model in perplexity["models"].values() for name in (model["sp"], model["lm"])]
        del perplexity["out_uri"]
        perplexity["languages"] = perplexity_model.summarize(scores, perplexity["thresholds"], removed_by_perplexity)
        for lang, summary in perplexity["languages"].items():
            b.log(f"filter: perplexity {lang}: {summary}")
    languages = Counter()
    for result in results:
        languages.update(result["languages"])
    stats = {
        "languages": dict(languages.most_common()),
        "units_resumed": resumed,
        "quality_classifier": quality,
        "perplexity": perplexity,
    }
    return StageResult(files, counts, stats)


def totals(results: list[dict], rules: list[str]) -> tuple[dict, dict, Counter]:
    """The shards' counts summed (removals per rule, in the rules' order), the perplexity histogram per
    language and the perplexity removals per language."""
    removed, removed_bytes = Counter(), Counter()
    scores: dict[str, Counter] = {}
    removed_by_perplexity: Counter = Counter()
    for result in results:
        removed.update(result["removed"])
        removed_bytes.update(result["removed_bytes"])
        for lang, hist in result["perplexity_bins"].items():
            scores.setdefault(lang, Counter()).update({int(b): n for b, n in hist.items()})
        removed_by_perplexity.update(result["perplexity_removed"])
    keys = ("docs_in", "bytes_in", "docs_out", "bytes_out", "pii_redacted_docs")
    counts = {key: sum(r[key] for r in results) for key in keys}
    counts["removed"] = {name: removed.get(name, 0) for name in rules}
    counts["removed_bytes"] = {name: removed_bytes.get(name, 0) for name in rules}
    return counts, scores, removed_by_perplexity


STAGE = Stage(
    name="filter",
    folder="filter",
    package=__package__,
    sections=("filter",),
    build=build,
    needs=("docs",),
    fingerprints=fingerprints,
    check=check,
    units=True,
    funnel="filter",
    code_exclude=("browse.py",),  # (it reads the output, never makes it)
    show=browse.artifacts,
)
