"""Where the filter stage's time goes: each rule's seconds per document, and the word and sentence splitting the
rules share, on extracted web pages.

    .venv/bin/python bench/filter_profile.py [--pages 2000] [--write]

The pages are bench/extraction.py's, ingested with the default extractor; one ingested shard is filtered in this
process with the tiny preset's rules, once to load the models and once timed. Every rule's `filter` is timed where
the stage calls it, and so are the splitting functions of stages/filter/word_tokens.py (words: spaCy's tokenizer;
sentences and spans: its sentencizer) and the Gopher n-gram counts (stages/filter/repetition.py), which run inside
the rules. A rule's seconds include the splitting it asks for; a text is split once, by the first rule that asks.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from functools import wraps
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.extraction import pages, write_warcs
from bench.stage_times import machine, write_section
from stages.core.config import load_config
from stages.filter import repetition, rules, stage, word_tokens
from stages.pipeline import PIPELINE

SECTION = "## Where the filter's time goes"
seconds: Counter = Counter()
calls: Counter = Counter()


def timed(name: str, fn):
    @wraps(fn)
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started
            calls[name] += 1

    return run


def instrument() -> None:
    """Timers around each rule's filter (as first_rejection calls it) and the shared splitting and counting."""
    build = rules.build_rules

    def build_timed(*args, **kwargs):
        found = build(*args, **kwargs)
        for name, rule in found:
            if not getattr(rule.filter, "__wrapped__", None):
                rule.filter = timed(f"rule {name}", rule.filter)
        return found

    stage.build_rules = build_timed
    tokenizer = word_tokens._tokenizer_class()
    for method, label in (("word_tokenize", "words"), ("sent_tokenize", "sentences"), ("span_tokenize", "sentences")):
        setattr(tokenizer, method, timed(f"split into {label}", getattr(tokenizer, method)))
    word_tokens._tokenizer_class = lambda: tokenizer
    word_tokens.install()
    repetition.find_all_duplicate = timed("Gopher n-gram counts", repetition.find_all_duplicate)
    repetition.find_top_duplicate = timed("Gopher n-gram counts", repetition.find_top_duplicate)


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        write_warcs(pages(n), Path(tmp) / "warc", 1)
        cfg = load_config("tiny", {"storage.root": tmp, "ingest.inputs": [f"{tmp}/warc/*.warc.gz"],
                                   "ingest.docs_per_shard": n})  # fmt: skip
        PIPELINE.run("ingest", cfg, log=lambda _: None)
        docs = PIPELINE.output("ingest", cfg)
        shard = sorted(f for f in docs.manifest()["files"] if f.endswith(".parquet"))[0]
        instrument()
        marker = type("Marker", (), {"mark": lambda *_: None})()
        for k in range(2):  # (the first: models loaded and caches warmed)
            seconds.clear()
            calls.clear()
            started = time.perf_counter()
            result = stage.filter_shard("bench", shard, cfg, docs.uri, f"{tmp}/out-{k}", marker, None)
            total = time.perf_counter() - started
    return {"pages": n, "docs": result["docs_in"], "kept": result["docs_out"], "total": total,
            "seconds": dict(seconds), "calls": dict(calls), "bytes": result["bytes_in"]}  # fmt: skip


def table(r: dict, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{machine()} {r['docs']:,} documents extracted from bench/extraction.py's pages "
        f"({r['bytes'] / r['docs']:,.0f} bytes of text each on average), {r['kept']:,} kept; one process, the tiny "
        f"preset's rules: {r['total']:.1f} s, {r['total'] / r['docs'] * 1e3:.2f} ms a document.",
        "",
        "| where | seconds | ms per document in | share | calls |",
        "|---|---:|---:|---:|---:|",
    ]
    order = sorted(r["seconds"], key=lambda k: (not k.startswith("rule"), -r["seconds"][k]))
    for name in order:
        s = r["seconds"][name]
        lines.append(f"| {name} | {s:.2f} | {s / r['docs'] * 1e3:.2f} | {s / r['total']:.0%} | {r['calls'][name]:,} |")
    lines += [
        "",
        "The rules' rows add up to the time spent deciding; the splitting and counting rows are inside them. The "
        "rest is reading the shard, PII redaction and writing.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    text = table(measure(args.pages), f"python bench/filter_profile.py --pages {args.pages} --write")
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
