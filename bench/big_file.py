"""One big WARC file through the ingest stage: read whole (one worker busy) against cut into slices (every worker).

    .venv/bin/python bench/big_file.py [--corpus /tmp/scale_corpus] [--workers 2] [--repeats 3] [--write]

The file is bench/scale_corpus.py's WARC files joined into one (a .warc.gz of members joins by concatenation).
Side by side, alternated, medians of `--repeats`, each run in its own process: the ingest stage with
`ingest.slice_bytes` past the file's size (one slice), at its default (128 MiB) and at 32 MiB; the document counts must
be the same in all three (tests/test_ingest.py checks that the documents themselves are).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.extraction import run
from bench.stage_times import machine, write_section

SECTION = "## One big file: whole against in slices"
SLICES = {"whole (one slice)": 1 << 40, "default slices (128 MiB)": 128 << 20, "32 MiB slices": 32 << 20}

INGEST = """
import sys, time
from stages.core.config import load_config
from stages.pipeline import PIPELINE
if __name__ == "__main__":
    cfg = load_config("tiny", {"storage.root": sys.argv[1], "ingest.inputs": [sys.argv[2]],
                               "ingest.workers": int(sys.argv[3]), "ingest.slice_bytes": int(sys.argv[4])})
    started = time.perf_counter()
    stats = PIPELINE.run("ingest", cfg, log=lambda _: None)
    print("RESULT", time.perf_counter() - started, stats["docs_out"])
"""


def measure(args) -> dict:
    seconds: dict[str, list[float]] = {name: [] for name in SLICES}
    docs = set()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "crawl.warc.gz"
        with open(big, "wb") as out:
            for part in sorted(Path(args.corpus).glob("*.warc.gz")):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        for k in range(args.repeats):
            for name, size in SLICES.items():
                root = f"{tmp}/{k}-{size}"
                took, made = run(INGEST, root, str(big), str(args.workers), str(size))
                seconds[name].append(took)
                docs.add(made)
                shutil.rmtree(root)
        size = big.stat().st_size
    if len(docs) != 1:
        raise SystemExit(f"the runs made different numbers of documents: {sorted(docs)}")
    medians = {name: statistics.median(found) for name, found in seconds.items()}
    return {"docs": docs.pop(), "bytes": size, "seconds": medians}


def table(r: dict, args, command: str) -> str:
    whole = r["seconds"]["whole (one slice)"]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{machine()} One .warc.gz of {r['bytes'] / 1e9:.2f} GB (bench/scale_corpus.py's files joined), "
        f"{r['docs']:,} documents, "
        f"{args.workers} worker processes; medians of {args.repeats}.",
        "",
        "| ingest | seconds | MB/s (compressed) | speed-up |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {s:.1f} | {r['bytes'] / 1e6 / s:.1f} | {whole / s:.2f}x |" for name, s in r["seconds"].items()],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="/tmp/scale_corpus")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    text = table(measure(args), args, f"python bench/big_file.py --workers {args.workers} --repeats {args.repeats}"
                                      " --write")  # fmt: skip
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
