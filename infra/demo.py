"""Run `prefect deployment run pretrain/full --watch` against the local stack and say what it produced.

Prints the flow run's URL in the Prefect UI, where each stage's output lives and the evaluation result.
Assumes `python infra/stack.py up` has run (`make demo` does both).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.stack import HOST, api_url
from stages import pipeline
from stages.core.config import load_config
from stages.evaluate.stage import compare


def main() -> int:
    stack = json.loads((REPO / ".stack" / "stack.json").read_text())
    env = {"PREFECT_API_URL": api_url(stack["port"])}
    cmd = [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "pretrain/full", "--watch"]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    if match:
        print(f"Prefect UI: http://{HOST}:{stack['port']}/runs/flow-run/{match.group(1)}")
    if proc.returncode != 0:
        print("pretrain/full failed; the UI and the log above say which stage", file=sys.stderr)
        return proc.returncode
    cfg = load_config("tiny")
    registry, known = pipeline.PIPELINE, {}
    print(f"Outputs under {cfg.storage.root} (one folder per version of each stage):")
    for stage in registry.stages:
        print(f"  {stage.name:<11} {registry.output(stage.name, cfg, known).uri}")
    run = registry.output(registry.trains, cfg, known).uri
    metrics = Path(run, "metrics.jsonl")
    if metrics.exists():
        steps = [json.loads(line) for line in metrics.read_text().splitlines()]
        print(f"Training: {len(steps)} steps, loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    evaluated = sorted(Path(run).glob("step-*/eval/stats.json"))
    if evaluated:
        print_evaluation(evaluated[-1])
    return 0


def print_evaluation(path: Path) -> None:
    """The latest evaluation as the eval-metrics artifact has it: each metric with chance and, for the standard
    benchmarks, the published GPT-2 124M and Pythia-160M figures beside it."""
    stats = json.loads(path.read_text())
    limit = stats.get("benchmarks_limit")
    print(f"Evaluation ({path.parent}/results.json):")
    if stats.get("benchmarks"):
        print(f"  standard benchmarks on {f'their first {limit} examples' if limit else 'all examples'} each "
              "(validation splits): a model this small scores near chance; published figures for scale")  # fmt: skip
    line = "  {:<11} {:<15} {:<16} {:>10} {:>7} {:>11} {:>12}"
    print(line.format("model", "task", "metric", "value", "chance", "GPT-2 124M", "Pythia-160M"))
    for row in compare(stats["metrics"], stats.get("previous"), stats.get("base"), f"step {stats['step']}"):
        cells = [row.get(key) for key in ("value", "chance", "gpt2_124m", "pythia_160m")]
        print(line.format(row["model"], row["task"], row["metric"], *("" if v is None else f"{v:.4g}" for v in cells)))


if __name__ == "__main__":
    sys.exit(main())
