"""Wall time and throughput of every stage on the bundled sample, run as plain functions (no Prefect).

    .venv/bin/python bench/stage_times.py [--preset tiny] [--write]

Runs each stage from scratch into a temporary root, then once more to time the skip path, prints a table and
with --write replaces the "Stage times" section of BENCHMARKS.md with it and the command that produced it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.core.config import load_config
from stages.pipeline import PIPELINE

SECTION = "## Stage times on the sample"


def measure(preset: str) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(preset, {"storage.root": root})
        for name in PIPELINE.names:
            started = time.perf_counter()
            stats = PIPELINE.run(name, cfg, log=lambda _: None)
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            again = PIPELINE.run(name, cfg, log=lambda _: None)
            skip_seconds = time.perf_counter() - started
            assert again["skipped"], f"{name} did not skip on rerun"
            rows.append({"stage": name, "seconds": seconds, "skip_seconds": skip_seconds, "stats": stats})
    return rows


def describe(row: dict) -> str:
    s = row["stats"]
    if isinstance(s.get("tokens"), dict):  # (each stage by the figures it reports)
        total = sum(s["tokens"].values())
        return f"{total:,} tokens ({s['tokens']['train']:,} train), {total / row['seconds']:,.0f} tokens/s"
    if "docs_out" in s:
        return f"{s['docs_in']} -> {s['docs_out']} docs, {s['docs_in'] / row['seconds']:.0f} docs/s"
    if "vocab_size" in s:
        return f"vocab {s['vocab_size']}, trained on {s['train_chars']:,} chars"
    if "steps" in s:
        return (
            f"{s['steps']} steps, loss {s['first_loss']:.2f} -> {s['final_loss']:.2f}, "
            f"{s['tokens_per_s']:,.0f} tokens/s while stepping"
        )
    metrics = s["metrics"].get("heldout_ppl", {})
    return f"heldout bits/byte {metrics.get('bits_per_byte', float('nan')):.3f} on {s['docs']} docs"


def machine() -> str:
    """The line every benchmark section carries: where and when its figures were measured."""
    return (
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')}."
    )


def table(rows: list[dict], command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        machine(),
        "",
        "| stage | first run (s) | rerun, skipped (s) | what it did |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r['stage']} | {r['seconds']:.1f} | {r['skip_seconds']:.2f} | {describe(r)} |" for r in rows]
    total = sum(r["seconds"] for r in rows)
    lines += [f"| all | {total:.1f} | {sum(r['skip_seconds'] for r in rows):.1f} | |", ""]
    return "\n".join(lines)


def write_section(text: str, section: str) -> None:
    """Replace (or append) one `## ` section of BENCHMARKS.md, keeping the others."""
    path = REPO / "BENCHMARKS.md"
    body = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\nFigures from `bench/`, each with the command that reproduces it.\n\n"
    )
    if section in body:
        head, _, rest = body.partition(section)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        body = head + text + tail
    else:
        body = body.rstrip("\n") + "\n\n" + text
    path.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    command = "python bench/stage_times.py" + (f" --preset {args.preset}" if args.preset != "tiny" else "") + " --write"
    text = table(measure(args.preset), command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
