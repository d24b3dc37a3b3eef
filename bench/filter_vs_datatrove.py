"""WARC -> filtered documents: the ingest and filter stages against the equivalent datatrove pipeline.

    .venv/bin/python bench/filter_vs_datatrove.py [--pages 4000] [--files 4] [--workers 2] [--repeats 3] [--write]

The pages are bench/extraction.py's (real English text in the boilerplate of real sites), written as `--files`
WARC files. Side by side, each run in its own process (interpreter start-up excluded), alternated, medians of
`--repeats`, `--workers` worker processes each:
- ours: the ingest stage (Resiliparse, the default) then the filter stage with the tiny preset's rules (FineWeb's
  order and thresholds), `PIPELINE.run` in one process;
- datatrove: LocalPipelineExecutor([WarcReader, Trafilatura(favour_precision), URLFilter, LanguageFilter,
  GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter, FineWebQualityFilter, C4BadWordsFilter,
  PIIFormatter, JsonlWriter]), one task per file, the blocks built from the same config objects (pointed at the
  local lid.176 model and bad-words lists, as ours are);
- datatrove with Resiliparse in place of Trafilatura (our extractor as a datatrove extractor block, the same
  options): the same extractor on both sides, so its kept set must equal ours document by document (WARC record
  id and final text, after C4's line removal and PII redaction); the figures count only when it does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.extraction import page_arguments, pages, write_warcs
from bench.stage_times import machine, write_section
from stages.core.config import load_config
from stages.pipeline import PIPELINE

SECTION = "## WARC -> filtered documents against datatrove"
OFFLINE_LISTS = "BENCH_BADWORDS_LISTS"

OURS = """
import sys, time
from stages.core.config import load_config
from stages.pipeline import PIPELINE
if __name__ == "__main__":
    cfg = load_config("tiny", {"storage.root": sys.argv[1], "ingest.inputs": [sys.argv[2] + "/*.warc.gz"],
                               "ingest.workers": int(sys.argv[3]), "filter.workers": int(sys.argv[3])})
    started = time.perf_counter()
    PIPELINE.run("ingest", cfg, log=lambda _: None)
    kept = PIPELINE.run("filter", cfg, log=lambda _: None)["docs_out"]
    print("RESULT", time.perf_counter() - started, kept)
"""


def datatrove_blocks(cfg):
    """The filter stage's rules as datatrove pipeline blocks; a document without a URL skips the URL rule."""
    from datatrove.pipeline.filters.base_filter import BaseFilter

    from stages.filter.rules import build_rules

    class SkipWithoutUrl(BaseFilter):
        name = "url, unless there is none"

        def __init__(self, url_filter):
            super().__init__()
            self.url_filter = url_filter

        def filter(self, doc):
            return self.url_filter.filter(doc) if doc.metadata.get("url") else True

    return [SkipWithoutUrl(rule) if name == "url" else rule for name, rule in build_rules(cfg)]


def resiliparse_block(cfg):
    """Our Resiliparse extraction as a datatrove extractor block (its sandbox and timeout datatrove's own)."""
    from datatrove.pipeline.extractors.base import BaseExtractor

    from stages.ingest.extract import extractor

    class Resiliparse(BaseExtractor):
        name = "Resiliparse"

        def __init__(self):
            super().__init__(timeout=cfg.ingest.extract_timeout_s)
            self.extract_text = extractor("resiliparse", cfg.ingest)

        def extract(self, text: str) -> str:
            return self.extract_text(text).strip()  # (ingest strips a document's text)

    return Resiliparse()


def run_datatrove(root: str, folder: str, workers: int, files: int, extractor: str) -> None:
    import time

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = load_config("tiny", {"storage.root": root})
    extract = resiliparse_block(cfg) if extractor == "resiliparse" else Trafilatura(favour_precision=True, timeout=30.0)
    pipeline = [
        WarcReader(folder, glob_pattern="*.warc.gz"),
        extract,
        *datatrove_blocks(cfg),
        PIIFormatter(**cfg.filter.pii.block_kwargs()),
        JsonlWriter(f"{root}/output", compression=None),
    ]
    executor = LocalPipelineExecutor(pipeline, tasks=files, workers=workers, logging_dir=f"{root}/logs",
                                     start_method="forkserver")  # fmt: skip
    started = time.perf_counter()
    executor.run()
    print("RESULT", time.perf_counter() - started, len(kept(Path(root) / "output")))


if os.environ.get(OFFLINE_LISTS):
    # datatrove's worker processes import this file anew: point C4BadWordsFilter at the local word lists there
    # too, or it would try to download them (our filter stage does the same in its own workers)
    from stages.filter.rules import _local_badwords

    _local_badwords(os.environ[OFFLINE_LISTS])


def run(command: list[str], env: dict | None = None) -> float:
    env = {**os.environ, **(env or {})}
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True, env=env)
    return float(next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()[1])


def kept(folder: Path) -> dict[str, str]:
    """id -> text of the documents in Parquet shards (ours) or JSONL files (datatrove's JsonlWriter)."""
    rows = [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f, columns=["id", "text"]).to_pylist()]
    rows += [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return {r["id"]: r["text"] for r in rows}


def measure(args) -> dict:
    times: dict[str, list[float]] = {"ours": [], "trafilatura": [], "resiliparse": []}
    lists = {OFFLINE_LISTS: load_config("tiny").filter.c4_badwords.lists_dir}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "warc"
        write_warcs(pages(args.pages), folder, args.files)
        for k in range(args.repeats):  # (alternated: the machine's noise hits all alike)
            ours = f"{tmp}/ours-{k}"
            times["ours"].append(run([sys.executable, "-c", OURS, ours, str(folder), str(args.workers)]))
            for name in ("trafilatura", "resiliparse"):
                theirs = f"{tmp}/{name}-{k}"
                command = [sys.executable, __file__, "--run-datatrove", theirs, str(folder), str(args.workers),
                           str(args.files), name]  # fmt: skip
                times[name].append(run(command, lists))
        cfg = load_config("tiny", {"storage.root": f"{tmp}/ours-0", "ingest.inputs": [f"{folder}/*.warc.gz"]})
        ours_kept = kept(Path(PIPELINE.output("filter", cfg).uri))
        same = kept(Path(tmp) / "resiliparse-0" / "output")
        trafilatura_kept = len(kept(Path(tmp) / "trafilatura-0" / "output"))
    median = {name: statistics.median(found) for name, found in times.items()}
    return {"seconds": median, "kept": {"ours": len(ours_kept), "resiliparse": len(same),
            "trafilatura": trafilatura_kept}, "identical": ours_kept == same}  # fmt: skip


def table(r: dict, args, command: str) -> str:
    s, n = r["seconds"], r["kept"]
    rows = [("ingest + filter stages (Resiliparse)", "ours"), ("datatrove, Trafilatura", "trafilatura"),
            ("datatrove, Resiliparse (the same extractor)", "resiliparse")]  # fmt: skip
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{machine()} {args.pages:,} pages (bench/extraction.py's) in {args.files} WARC files, {args.workers} "
        f"worker processes each side, the tiny preset's rules; medians of {args.repeats}.",
        "",
        "| pipeline | seconds | pages/s | kept |",
        "|---|---:|---:|---:|",
        *[f"| {label} | {s[key]:.1f} | {args.pages / s[key]:,.0f} | {n[key]:,} |" for label, key in rows],
        "",
        f"Speed-up against datatrove with Trafilatura: {s['trafilatura'] / s['ours']:.1f}x; against datatrove "
        f"with the same extractor: {s['resiliparse'] / s['ours']:.1f}x. Kept sets with the same extractor "
        f"identical (record ids and final texts): {'yes' if r['identical'] else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = page_arguments()
    parser.add_argument("--run-datatrove", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_datatrove:
        root, folder, workers, files, extractor = args.run_datatrove
        run_datatrove(root, folder, int(workers), int(files), extractor)
        return
    command = (f"python bench/filter_vs_datatrove.py --pages {args.pages} --files {args.files} "
               f"--workers {args.workers} --repeats {args.repeats} --write")  # fmt: skip
    result = measure(args)
    text = table(result, args, command)
    print(text)
    if not result["identical"]:
        sys.exit("the kept sets with the same extractor differ: the comparison does not hold")
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
