"""What a mixture costs the trainer's data path: batches/s of a two-source `Mixture` (a block per draw from one of
two litdata loaders) against the single-dataset loader (`loader.Epochs`, a batch per read), side by side.

    .venv/bin/python bench/mixture_loader.py [--batches 2000] [--repeats 5] [--write]

The bundled sample's tokens (the pipeline's output under outputs/bench-train, as bench/train_throughput.py builds
it), micro-batch 8 of seq_len 128 as in the tiny preset, one process, no training: only the reading, through the
trainer's read-ahead (`loader.Batches`). Both sources of the mixture read the same dataset, weights 0.5 / 0.5. The
two alternate `--repeats` times; each figure is the median over the repeats. The last column puts a batch's read
time beside a training step of the tiny preset (bench/train_throughput.py: about 24k tokens/s on one process at
micro-batch 8), which the read-ahead thread overlaps.
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
from bench.train_throughput import prepare  # noqa: E402
from stages.train import loader as loader_lib  # noqa: E402
from stages.train.mixture import Mixture, Source  # noqa: E402

SECTION = "## Mixture loader against the single-dataset loader"
STEP_SECONDS = 8 * 128 / 24_000  # a tiny-preset training step on one process at micro-batch 8 (BENCHMARKS.md)


def reader(cfg, kind: str):
    batch = cfg.train.micro_batch_size
    if kind == "single":
        return loader_lib.Epochs(loader_lib.make_loader(cfg, "train", batch, shuffle=True), batch, log=lambda _: None)
    sources = [Source(name, 0.5, loader_lib.make_loader(cfg, "train", 1, shuffle=True), None) for name in ("a", "b")]
    return Mixture(sources, batch, cfg.train.seed, log=lambda _: None)


def batches_per_s(cfg, kind: str, n: int) -> float:
    batches = loader_lib.Batches(reader(cfg, kind))
    batches.next()  # (the loaders' start: index, cache, first chunk)
    tick = time.perf_counter()
    for _ in range(n):
        batches.next()
    return n / (time.perf_counter() - tick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace this section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    cfg = prepare("tiny", REPO / "outputs" / "bench-train")
    rates: dict[str, list[float]] = {"single": [], "mixture": []}
    for _ in range(args.repeats):
        for kind in rates:
            rates[kind].append(batches_per_s(cfg, kind, args.batches))
    command = "python bench/mixture_loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Command: `{command.strip()}`",
        machine(),
        "",
        f"Micro-batch {cfg.train.micro_batch_size} x seq_len {cfg.train.seq_len}, {args.batches} batches per run, "
        f"median of {args.repeats} alternating runs (range).",
        "",
        "| loader | batches/s | blocks/s | read time per batch, share of a training step |",
        "|---|---:|---:|---:|",
    ]
    for kind, values in rates.items():
        rate = statistics.median(values)
        lines.append(
            f"| {kind} | {rate:,.0f} ({min(values):,.0f}-{max(values):,.0f}) | "
            f"{rate * cfg.train.micro_batch_size:,.0f} | {100 / rate / STEP_SECONDS:.1f}% |"
        )
    ratio = statistics.median(rates["mixture"]) / statistics.median(rates["single"])
    lines += ["", f"Mixture / single: {ratio:.2f}x batches/s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
