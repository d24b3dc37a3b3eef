"""What the perplexity filter (`filter.perplexity`) costs the filter stage, side by side with the same stage without
it, and how fast its parts run.

    .venv/bin/python bench/perplexity_filter.py [--repeats 3] [--write]

The bundled sample (the tiny preset's ingest output under outputs/bench-perplexity), the reference corpus
data/sample/reference.parquet, keep_percentile 70. The filter stage is rebuilt (`force`) with and without the rule,
alternating, `--repeats` times; each figure is the median. With the rule, the stage also trains its models (one
per language with a reference: English here) and scores a sample of the pool for the threshold; the table splits
that out. Scoring alone: `Scorer.perplexity` over the documents the stage kept, one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section  # noqa: E402
from stages.core.config import load_config  # noqa: E402
from stages.core.documents import read_docs  # noqa: E402
from stages.filter import perplexity_model  # noqa: E402
from stages.pipeline import PIPELINE

SECTION = "## Perplexity filter (KenLM) in the filter stage"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace this section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    root = str(REPO / "outputs" / "bench-perplexity")
    plain = load_config("tiny", {"storage.root": root, "filter.workers": 1})
    scored = load_config(
        "tiny",
        {
            "storage.root": root,
            "filter.workers": 1,
            "filter.perplexity.enabled": True,
            "filter.perplexity.reference": ["data/sample/reference.parquet"],
            "filter.perplexity.keep_percentile": 70,
        },
    )
    PIPELINE.run("ingest", plain, log=lambda _: None)
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    training: list[float] = []
    stats = {}
    for _ in range(args.repeats):
        for kind, cfg in (("without", plain), ("with", scored)):
            tick = time.perf_counter()
            stats[kind] = PIPELINE.run("filter", cfg, log=lambda _: None, force=True)
            seconds[kind].append(time.perf_counter() - tick)
            if kind == "with":  # of which: training the models and scoring the pool sample for the threshold
                training.append(stats[kind]["perplexity"]["seconds"])
    docs_in = stats["with"]["docs_in"]
    p = stats["with"]["perplexity"]
    out = PIPELINE.output("filter", scored).uri
    model = p["models"]["en"]
    scorer = perplexity_model.Scorer(*perplexity_model.local_copies(scored, out, model))
    kept = [d.text for name in sorted(Path(out).glob("part-*.parquet")) for d in read_docs(str(name))]
    tick = time.perf_counter()
    for text in kept:
        scorer.perplexity(text)
    score_s = time.perf_counter() - tick
    mb = sum(len(t.encode()) for t in kept) / 1e6

    command = "python bench/perplexity_filter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    w, wo = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    en = p["languages"]["en"]
    text = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command.strip()}`",
            machine(),
            "",
            "| filter stage on the sample | seconds (median) | documents in/s |",
            "|---|---:|---:|",
            f"| without the perplexity rule | {wo:.1f} ({min(seconds['without']):.1f}-{max(seconds['without']):.1f}) | "
            f"{docs_in / wo:,.0f} |",
            f"| with it (keep_percentile 70) | {w:.1f} ({min(seconds['with']):.1f}-{max(seconds['with']):.1f}) | "
            f"{docs_in / w:,.0f} |",
            "",
            f"- Of that, training the English model ({model['reference_docs']} reference documents, "
            f"{model['pieces']} SentencePiece pieces, {scored.filter.perplexity.order}-gram KenLM) and scoring "
            f"{p['percentile_sample']['en']} pool documents for the threshold: {statistics.median(training):.1f} s.",
            f"- Scoring alone: {len(kept) / score_s:,.0f} documents/s, {mb / score_s:.2f} MB/s of text on one core "
            f"({len(kept)} kept documents, {mb:.2f} MB).",
            f"- English: {en['scored']} documents scored, {en['removed']} removed at perplexity > {en['threshold']} "
            f"(p10 {en['p10']}, p50 {en['p50']}, p90 {en['p90']}).",
            "",
        ]
    )
    print(text)
    if args.write:
        write_section(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
