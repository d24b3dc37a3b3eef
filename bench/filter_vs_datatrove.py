"""The filter stage against the same rules as a plain datatrove pipeline, on the same ingested shards.

    .venv/bin/python bench/filter_vs_datatrove.py [--docs-per-shard 500] [--write]

The bundled sample is ingested once (shards of `--docs-per-shard` documents). Then, each in a fresh process
with 2 worker processes:
- ours: the filter stage (`PIPELINE.run("filter", ...)`) with the tiny preset's rules (FineWeb's order and thresholds);
- datatrove: ParquetReader -> URLFilter -> LanguageFilter -> GopherRepetitionFilter -> GopherQualityFilter ->
  C4QualityFilter -> FineWebQualityFilter -> C4BadWordsFilter -> PIIFormatter -> JsonlWriter, one
  LocalPipelineExecutor task per shard, with the blocks built from the same config objects. Like ours it is
  pointed at the local lid.176 model and bad-words list, and documents without a URL skip the URL rule
  (datatrove's URLFilter asserts that a URL is there).
Both kept sets are compared document by document (id and final text, after C4's line removal and PII
redaction); the figures count only when they are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section  # noqa: E402
from stages.core.config import load_config  # noqa: E402
from stages.pipeline import PIPELINE

SECTION = "## Filter against a plain datatrove pipeline"
OFFLINE_LISTS = "BENCH_BADWORDS_LISTS"

OURS = """
import sys
from stages.pipeline import PIPELINE
from stages.core.config import load_config
cfg = load_config("tiny", {"storage.root": sys.argv[1], "filter.workers": 2})
PIPELINE.run("filter", cfg, log=lambda _: None)
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


def document_with_url(self, data: dict, path: str, id_in_file: int) -> dict:
    """ParquetReader adapter: our document table, with the URL where datatrove's filters look for it."""
    metadata = json.loads(data.get("metadata") or "{}")
    metadata["url"] = data.get("url")
    return {"text": data["text"], "id": data["id"], "metadata": metadata}


def run_datatrove(root: str, shards: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = load_config("tiny", {"storage.root": root})
    pipeline = [
        ParquetReader(f"{root}/ingest", glob_pattern="part-*.parquet", adapter=document_with_url),
        *datatrove_blocks(cfg),
        PIIFormatter(**cfg.filter.pii.block_kwargs()),
        JsonlWriter(f"{root}/datatrove/output", compression=None),
    ]
    LocalPipelineExecutor(pipeline, tasks=shards, workers=2, logging_dir=f"{root}/datatrove/logs").run()


if os.environ.get(OFFLINE_LISTS):
    # datatrove's worker processes import this file anew: point C4BadWordsFilter at the local word lists there
    # too, or it would try to download them (our filter stage does the same in its own workers)
    from stages.filter.rules import _local_badwords

    _local_badwords(os.environ[OFFLINE_LISTS])


def run_timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - started


def kept(folder: Path) -> dict[str, str]:
    """id -> text of the documents in Parquet shards (ours) or JSONL files (datatrove's JsonlWriter)."""
    rows = [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f, columns=["id", "text"]).to_pylist()]
    rows += [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return {r["id"]: r["text"] for r in rows}


def measure(docs_per_shard: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config("tiny", {"storage.root": root, "ingest.docs_per_shard": docs_per_shard})
        docs = PIPELINE.run("ingest", cfg, log=lambda _: None)["docs_out"]
        shards = len(list((Path(root) / "ingest").glob("part-*.parquet")))
        lists = {OFFLINE_LISTS: cfg.filter.c4_badwords.lists_dir}
        datatrove_s = run_timed([sys.executable, __file__, "--run-datatrove", root, str(shards)], lists)
        ours_s = run_timed([sys.executable, "-c", OURS, root])
        ours, theirs = kept(Path(root) / "filter"), kept(Path(root) / "datatrove" / "output")
    return {
        "docs": docs,
        "shards": shards,
        "ours_s": ours_s,
        "datatrove_s": datatrove_s,
        "kept_ours": len(ours),
        "kept_datatrove": len(theirs),
        "identical": ours == theirs,
    }


def table(r: dict, command: str) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            f"{machine()} {r['docs']:,} ingested sample documents in {r['shards']} "
            "shards, 2 worker processes each, the tiny preset's rules.",
            "",
            "| run | seconds | docs/s | kept |",
            "|---|---:|---:|---:|",
            f"| filter stage | {r['ours_s']:.1f} | {r['docs'] / r['ours_s']:.0f} | {r['kept_ours']} |",
            f"| datatrove LocalPipelineExecutor | {r['datatrove_s']:.1f} | {r['docs'] / r['datatrove_s']:.0f} "
            f"| {r['kept_datatrove']} |",
            "",
            f"Ratio (ours / datatrove docs/s): {r['datatrove_s'] / r['ours_s']:.2f}x; kept sets identical "
            f"(ids and final texts): {'yes' if r['identical'] else 'NO'}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs-per-shard", type=int, default=500)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--run-datatrove", nargs=2, metavar=("ROOT", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_datatrove:
        run_datatrove(args.run_datatrove[0], int(args.run_datatrove[1]))
        return
    command = f"python bench/filter_vs_datatrove.py --docs-per-shard {args.docs_per_shard} --write"
    result = measure(args.docs_per_shard)
    text = table(result, command)
    print(text)
    if not result["identical"]:
        sys.exit("the kept sets differ: the comparison does not hold")
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
