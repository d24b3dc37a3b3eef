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
    results = sorted(Path(run).glob("step-*/eval/results.json"))
    if results:
        data = json.loads(results[-1].read_text())
        print(f"Evaluation ({results[-1]}):")
        for task, metrics in data.get("results", {}).items():
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            print(f"  {task}: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
