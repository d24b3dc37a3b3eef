"""What each filter rule removed, to read: per rule a few removed documents (their opening, the rule's reason, the
measured value against its threshold) and a few kept documents nearest that threshold, as markdown. It reads what
the filter stage wrote (the `removed/` sample, with each document's `removed_by`; the first kept shards) and never
changes its output (the stage's code version leaves this file out).

The measured values are recomputed here for the bounded sample shown, with datatrove's own helpers (word
splitting, duplicate finding) and the thresholds of the config: datatrove's blocks answer keep-or-remove with a
reason, not the number behind it. A rule whose decision has no single number (the URL list, bad words, C4's
line-level checks) shows its reason alone. Sizes are bounded: `SHOWN` documents each way, `OPENING` characters
of each, at most `SCANNED` kept documents measured and `FILES` removed/ files read, whatever the corpus.
"""

from __future__ import annotations

from collections.abc import Callable

from stages.core import storage
from stages.core.config import FilterConfig, PipelineConfig
from stages.core.documents import read_docs
from stages.filter import word_tokens

SHOWN = 3  # documents per rule, removed and kept
OPENING = 300  # characters of each document shown
SCANNED = 1000  # kept documents measured to find those nearest a threshold
FILES = 50  # removed/ files read at most (one per shard: a big corpus has thousands)

Check = tuple[float, float, str]  # (measured value, threshold, "min" or "max": the side a kept document is on)


def _words(text: str) -> list[str]:
    from datatrove.utils.text import split_into_words  # (the filters' own word split, English as theirs)

    return split_into_words(text)


def gopher_quality(text: str, fc: FilterConfig) -> dict[str, Check]:
    from datatrove.utils.text import PUNCTUATION_SET

    c = fc.gopher_quality
    words = _words(text)
    n = max(1, len(words))
    proper = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    lines = text.splitlines() or [""]
    checks = {
        "gopher_short_doc": (len(proper), c.min_doc_words, "min"),
        "gopher_long_doc": (len(proper), c.max_doc_words, "max"),
        "gopher_below_avg_threshold": (sum(map(len, proper)) / max(1, len(proper)), c.min_avg_word_length, "min"),
        "gopher_above_avg_threshold": (sum(map(len, proper)) / max(1, len(proper)), c.max_avg_word_length, "max"),
        "gopher_too_many_hashes": (text.count("#") / n, c.max_symbol_word_ratio, "max"),
        "gopher_too_many_ellipsis": ((text.count("...") + text.count("…")) / n, c.max_symbol_word_ratio, "max"),
        "gopher_too_many_bullets": (sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines),
                                    c.max_bullet_lines_ratio, "max"),
        "gopher_too_many_end_ellipsis": (sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines),
                                         c.max_ellipsis_lines_ratio, "max"),
        "gopher_below_alpha_threshold": (sum(any(ch.isalpha() for ch in w) for w in words) / n,
                                         c.max_non_alpha_words_ratio, "min"),
    }  # fmt: skip
    return {k: v for k, v in checks.items() if v[1] is not None}


def gopher_repetition(text: str, fc: FilterConfig) -> dict[str, Check]:
    import re

    from datatrove.pipeline.filters.gopher_repetition_filter import (
        find_all_duplicate,
        find_duplicates,
        find_top_duplicate,
        get_n_grams,
    )

    c, size = fc.gopher_repetition, max(1, len(text))
    paragraphs = re.split(r"\n{2,}", text.strip())
    lines = re.split(r"\n+", text)
    para_dups, para_chars = find_duplicates(paragraphs)
    line_dups, line_chars = find_duplicates(lines)
    checks = {
        "dup_para_frac": (para_dups / len(paragraphs), c.dup_para_frac, "max"),
        "dup_para_char_frac": (para_chars / size, c.dup_para_char_frac, "max"),
        "dup_line_frac": (line_dups / len(lines), c.dup_line_frac, "max"),
        "dup_line_char_frac": (line_chars / size, c.dup_line_char_frac, "max"),
    }
    words = _words(text)
    for n, frac in c.top_n_grams:
        grams = get_n_grams(words, n)
        checks[f"top_{n}_gram"] = (find_top_duplicate(grams) / size if grams else 0.0, frac, "max")
    for n, frac in c.dup_n_grams:
        checks[f"duplicated_{n}_n_grams"] = (find_all_duplicate(words, n) / size, frac, "max")
    return {k: v for k, v in checks.items() if v[1] is not None}


def fineweb_quality(text: str, fc: FilterConfig) -> dict[str, Check]:
    from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
    from datatrove.utils.text import TERMINAL_PUNCTUATION

    c = fc.fineweb_quality
    lines = [line for line in text.split("\n") if line.strip()] or [""]
    stops = tuple(TERMINAL_PUNCTUATION)  # (FineWebQualityFilter's default stop characters)
    return {
        "line_punct_ratio": (sum(line.endswith(stops) for line in lines) / len(lines), c.line_punct_thr, "min"),
        "short_line_ratio": (sum(len(line) <= c.short_line_length for line in lines) / len(lines),
                             c.short_line_thr, "max"),
        "char_dup_ratio": (find_duplicates(lines)[1] / max(1, len(text.replace("\n", ""))),
                           c.char_duplicates_ratio, "max"),
        "list_ratio": (text.count("\n") / max(1, len(_words(text))), c.new_line_ratio, "max"),
    }  # fmt: skip


def _metadata_score(key: str, threshold: Callable[[FilterConfig, dict], float | None], side: str):
    def measure(text: str, fc: FilterConfig, metadata: dict) -> dict[str, Check]:
        value, limit = metadata.get(key), threshold(fc, metadata)
        return {key: (value, limit, side)} if value is not None and limit is not None else {}

    return measure


def _language_threshold(fc: FilterConfig, metadata: dict) -> float | None:
    """The score threshold, for a document detected in a kept language (another language is removed whatever its
    score, which is then no measure of the decision)."""
    return fc.language_threshold if not fc.languages or metadata.get("language") in fc.languages else None


# The rules whose decisions have a number, and how to measure it: (text, filter config, metadata) -> checks.
MEASURES: dict[str, Callable[[str, FilterConfig, dict], dict[str, Check]]] = {
    "language": _metadata_score("language_score", _language_threshold, "min"),
    "gopher_repetition": lambda text, fc, _: gopher_repetition(text, fc),
    "gopher_quality": lambda text, fc, _: gopher_quality(text, fc),
    "fineweb_quality": lambda text, fc, _: fineweb_quality(text, fc),
}


def margin(check: Check) -> float:
    """How far a value is inside its threshold, relative to it (negative: outside)."""
    value, threshold, side = check
    scale = abs(threshold) or 1.0
    return (value - threshold) / scale if side == "min" else (threshold - value) / scale


def _shown(text: str) -> str:
    opening = " ".join(text.split())[:OPENING]
    return opening.replace("|", "\\|") + ("…" if len(text) > OPENING else "")


def _check_line(name: str, check: Check) -> str:
    value, threshold, side = check
    relation = "at least" if side == "min" else "at most"
    return f"`{name}` = {value:.4g} (kept when {relation} {threshold:g})"


def removed_by_rule(out_uri: str, cfg: PipelineConfig, rules: list[str] | None = None) -> dict[str, list]:
    """The first SHOWN removed documents of each rule in the stage's removed/ sample (one file per shard: read in
    order until each of `rules` has its SHOWN, and never more than FILES files)."""
    found: dict[str, list] = {}
    paths = sorted(storage.expand(storage.join(out_uri, "removed", "*.parquet"), cfg.storage))
    for path in paths[:FILES]:
        for doc in read_docs(path, cfg.storage):
            rule = (doc.metadata.get("removed_by") or ":").split(":")[0]
            if len(found.setdefault(rule, [])) < SHOWN:
                found[rule].append(doc)
        if rules is not None and all(len(found.get(rule, [])) >= SHOWN for rule in rules):
            break
    return found


def nearest_kept(out_uri: str, cfg: PipelineConfig, rule: str) -> list[tuple[float, str, Check, object]]:
    """The SHOWN kept documents (of the first SCANNED) nearest one of the rule's thresholds."""
    measure, scored = MEASURES[rule], []
    for path in sorted(storage.expand(storage.join(out_uri, "part-*.parquet"), cfg.storage)):
        for doc in read_docs(path, cfg.storage):
            checks = measure(doc.text, cfg.filter, doc.metadata)
            if checks:
                name, check = min(checks.items(), key=lambda item: margin(item[1]))
                scored.append((margin(check), name, check, doc))
            if len(scored) >= SCANNED:
                break
        if len(scored) >= SCANNED:
            break
    return sorted(scored, key=lambda item: item[0])[:SHOWN]


AFTER_C4 = ("fineweb_quality", "c4_badwords", "perplexity", "quality")  # the rules after c4_quality, in order


def as_seen(rule: str, text: str, cfg: PipelineConfig) -> str:
    """A removed document's text as `rule` saw it: C4's quality rule, before it in the order, drops the lines it
    rejects from every document it lets through (the removed sample keeps the text as it came in)."""
    if rule not in AFTER_C4 or not cfg.filter.c4_quality.enabled:
        return text
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter

    document = Document(text=text, id="")
    C4QualityFilter(**cfg.filter.c4_quality.block_kwargs()).filter(document)
    return document.text


def failed_check(rule: str, doc, cfg: PipelineConfig) -> tuple[str, Check] | None:
    """The check a removed document failed, measured: the one its reason names (`rule:check`), or the rule's only
    one (the language rule's score)."""
    if rule not in MEASURES:
        return None
    checks = MEASURES[rule](as_seen(rule, doc.text, cfg), cfg.filter, doc.metadata)
    reason = doc.metadata.get("removed_by", rule).partition(":")[2]
    name = reason if reason in checks else (next(iter(checks)) if len(checks) == 1 else None)
    return (name, checks[name]) if name else None


def rule_markdown(rule: str, removed: list, kept: list, count: int, cfg: PipelineConfig) -> str:
    lines = [f"# Filter: {rule}", "", f"{count:,} documents removed by this rule. A few of them:", ""]
    for doc in removed:
        failed = failed_check(rule, doc, cfg)
        measured = f" — {_check_line(*failed)}" if failed else ""
        if rule == "language" and not failed:  # (another language than those kept)
            measured = f" — detected `{doc.metadata.get('language')}`, kept: {', '.join(cfg.filter.languages)}"
        lines.append(f"- **{doc.metadata.get('removed_by', rule)}**{measured} `{doc.id}`: {_shown(doc.text)}")
    if rule in MEASURES:
        lines += ["", f"Kept documents nearest a threshold of this rule (of the first {SCANNED} kept):", ""]
        lines += [f"- {_check_line(name, check)} `{doc.id}`: {_shown(doc.text)}" for _, name, check, doc in kept]
    return "\n".join(lines) + "\n"


def artifacts(cfg: PipelineConfig, stats: dict) -> list:
    """One markdown artifact per rule that removed anything: `filter-rule-<rule>`."""
    from stages.core.stage import Artifact

    word_tokens.install()  # (the filter stage's faster spaCy word split: the same tokens)
    out_uri = stats["output"]
    removed = removed_by_rule(out_uri, cfg, [rule for rule, n in stats.get("removed", {}).items() if n])
    shown = []
    for rule, count in stats.get("removed", {}).items():
        if not count:
            continue
        kept = nearest_kept(out_uri, cfg, rule) if rule in MEASURES else []
        text = rule_markdown(rule, removed.get(rule, []), kept, count, cfg)
        key = "filter-rule-" + rule.replace("_", "-")
        shown.append(Artifact("markdown", key, text, f"what {rule} removed, and kept documents near its threshold"))
    return shown
