"""The data path at scale: at least 1 GB of WARC through ingest -> filter -> dedup -> tokenizer -> tokenize on this
machine's cores, each stage's throughput and memory, and what a Common Crawl-sized run would cost.

    .venv/bin/python bench/scale.py [--corpus /tmp/scale_corpus] [--gb 1.0] [--workers 2] [--write]

The corpus is bench/scale_corpus.py's (Debian documentation and manual pages in several languages as web pages,
with planted duplicates and junk); it is built into `--corpus` unless WARC files are there already. Each stage
runs in its own process with the tiny preset's settings and `--workers` processes, so that its peak memory is its
own: the peak is the largest sum of resident memory over the stage's process tree (the driver and its workers),
sampled every 0.2 s, and the largest single process. Per stage: seconds, documents in and out, documents and
megabytes (its input: compressed WARC for ingest, text for the others) per second, peak memory and its share of
the run's time.

The projection: core-seconds per raw page = the run's seconds x cores / pages read, scaled to a billion pages,
priced on a named on-demand instance at its list price (an assumption to check against current prices; one of this
machine's cores taken as one vCPU, which makes it conservative: a vCPU is half a physical core).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section
from stages.pipeline import PIPELINE

SECTION = "## The data path at 1 GB of WARC"
INSTANCE = ("AWS c7i.4xlarge (16 vCPU, 32 GiB, us-east-1 on-demand)", 16, 0.714)  # name, vCPUs, $/hour
PAGES = 1_000_000_000  # Common Crawl's monthly crawls hold 2-3 billion pages

RUN_STAGE = """
import json, sys, time
from stages.core.config import load_config
from stages.pipeline import PIPELINE
if __name__ == "__main__":
    cfg = load_config("tiny", json.loads(sys.argv[2]))
    started = time.perf_counter()
    stats = PIPELINE.run(sys.argv[1], cfg, log=lambda _: None)
    print("RESULT", json.dumps({"seconds": time.perf_counter() - started, "stats": stats}, default=str))
"""


def settings(corpus: Path, root: Path, workers: int) -> dict:
    return {
        "storage.root": str(root),
        "ingest.inputs": [f"{corpus}/*.warc.gz"],
        "ingest.workers": workers,
        "filter.workers": workers,
        "dedup.workers": workers,
        "tokenize.workers": workers,
    }


def peak_memory(proc: subprocess.Popen, peaks: dict) -> None:
    """The largest resident total over the process tree, and the largest single process, until it ends."""
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            sizes = []
            for p in [root, *root.children(recursive=True)]:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.Error:
                    continue
            peaks["tree"] = max(peaks.get("tree", 0), sum(sizes))
            peaks["process"] = max(peaks.get("process", 0), max(sizes, default=0))
            time.sleep(0.2)
    except psutil.Error:
        return


def run_stage(name: str, overrides: dict) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", RUN_STAGE, name, json.dumps(overrides)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    peaks: dict = {}
    sampler = threading.Thread(target=peak_memory, args=(proc, peaks))
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({proc.returncode})")
    found = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT ") :])
    return {**found, "peak_tree": peaks.get("tree", 0), "peak_process": peaks.get("process", 0)}


def describe(name: str, r: dict) -> tuple[int, int, int]:
    """(documents in, documents out, input bytes) of a stage's stats; the tokenizer reads a bounded sample."""
    s = r["stats"]
    if name == "tokenizer":
        return 0, 0, s["train_chars"]
    return s["docs_in"], s["docs_out"], s["bytes_in"]


def measure(args) -> dict:
    corpus = Path(args.corpus)
    built = None
    if not list(corpus.glob("*.warc.gz")):
        from bench.scale_corpus import build

        built = build(corpus, int(args.gb * 1e9))
    raw = sum(p.stat().st_size for p in corpus.glob("*.warc.gz"))
    uncompressed = sum(gzip_size(p) for p in corpus.glob("*.warc.gz"))
    root = Path(args.root)
    stages = {}
    for stage in PIPELINE.dataset_part:
        stages[stage.name] = run_stage(stage.name, settings(corpus, root, args.workers))
        print(stage.name, f"{stages[stage.name]['seconds']:.1f} s", flush=True)
    return {"corpus": built, "raw_bytes": raw, "uncompressed_bytes": uncompressed,
            "files": len(list(corpus.glob("*.warc.gz"))), "stages": stages}  # fmt: skip


def gzip_size(path: Path) -> int:
    import gzip

    with gzip.open(path) as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 24), b""))


def table(r: dict, args, command: str) -> str:
    stages = r["stages"]
    total = sum(s["seconds"] for s in stages.values())
    pages = stages["ingest"]["stats"]["records_in"]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{machine()} {r['files']} WARC files, {r['raw_bytes'] / 1e9:.2f} GB compressed "
        f"({r['uncompressed_bytes'] / 1e9:.2f} GB of WARC), {pages:,} HTML pages; {args.workers} worker processes "
        "per stage, the tiny preset's settings (English kept; decontamination against the held-out split).",
        "",
        "MB/s in: ingest counts the compressed WARC, the tokenizer the characters it trains on (a bounded "
        "sample), the others the text they read.",
        "",
        "| stage | seconds | docs in | docs out | docs/s | MB/s in | peak RSS, all processes (MB) | "
        "peak RSS, one process (MB) | share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stages.items():
        docs_in, docs_out, bytes_in = describe(name, s)
        docs = (f"{docs_in:,} | {docs_out:,} | {docs_in / s['seconds']:,.0f}" if docs_in else
                "(a sample) | - | -")  # fmt: skip
        lines.append(
            f"| {name} | {s['seconds']:.1f} | {docs} | "
            f"{bytes_in / 1e6 / s['seconds']:.1f} | {s['peak_tree'] / 1e6:,.0f} | {s['peak_process'] / 1e6:,.0f} | "
            f"{s['seconds'] / total:.0%} |"
        )
    lines.append(f"| all | {total:.1f} | {pages:,} | | {pages / total:,.0f} | "
                 f"{r['raw_bytes'] / 1e6 / total:.1f} | | | 100% |")  # fmt: skip
    ingest = stages["ingest"]["seconds"]
    lines += ["", f"Ingest read {r['uncompressed_bytes'] / 1e6 / ingest:.0f} MB/s of WARC, decompressed "
              f"({r['uncompressed_bytes'] / 1e6 / ingest / args.workers:.0f} MB/s a core).", ""]  # fmt: skip
    lines += [*projection(total, pages, r["raw_bytes"], args.workers), ""]
    return "\n".join(lines)


def projection(seconds: float, pages: int, raw_bytes: int, cores: int) -> list[str]:
    name, vcpus, hourly = INSTANCE
    core_s = seconds * cores / pages
    core_hours = core_s * PAGES / 3600
    per_tb = seconds * cores / raw_bytes * 1e12 / 3600
    return [
        f"Projection to {PAGES:,} pages (Common Crawl scale), on {name} at ${hourly}/hour:",
        "",
        f"- core-seconds per page: {seconds:.1f} s x {cores} cores / {pages:,} pages = {core_s * 1e3:.2f} ms;",
        f"- core-hours per billion pages: {core_s * 1e3:.2f} ms x {PAGES:,} / 3600 = {core_hours:,.0f};",
        f"- instance-hours: {core_hours:,.0f} / {vcpus} vCPUs = {core_hours / vcpus:,.0f}; cost: "
        f"{core_hours / vcpus:,.0f} x ${hourly} = ${core_hours / vcpus * hourly:,.0f} per billion pages, before "
        "storage and transfer;",
        f"- by bytes instead: {seconds:.1f} s x {cores} cores / {raw_bytes / 1e9:.2f} GB = {per_tb:,.0f} core-hours "
        f"per TB of compressed WARC, ${per_tb / vcpus * hourly:,.0f} per TB.",
        "",
        "Per page, the cost depends on the pages' size (extraction and the filter scale with the HTML and the text "
        "kept): these are documentation pages, so the per-byte figure is the safer one for a crawl whose pages are "
        "larger.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/tmp/scale_corpus")
    parser.add_argument("--root", default="/tmp/scale_run")
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--table-from", help="a scale.json of an earlier run: its table, nothing run")
    args = parser.parse_args()
    if args.table_from:
        result = json.loads(Path(args.table_from).read_text())
    else:
        result = measure(args)
        (Path(args.root) / "scale.json").write_text(json.dumps(result, indent=2, default=str))
    command = f"python bench/scale.py --gb {args.gb} --workers {args.workers} --write"
    text = table(result, args, command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
