"""What a run of the pipeline would do, without doing it: per stage, run or skip, and why.

    python -m stages.tools.plan [PRESET] [--set section.field=value ...] [--force STAGE ...]

The pretrain flow shows the same table as a markdown artifact before its first stage (and with `dry_run` stops
there). It walks stages/pipeline.py and every answer comes from each stage's own `status` (stages/core/stage.py),
so the plan cannot disagree with what the run then does:
- a data stage is skipped when the manifest at its versioned path holds its identity; otherwise it runs, and
  the reason names what differs from its newest other version (code, config section, inputs) or says it was
  never built or its build was interrupted;
- inputs are content digests (stages/core/stage.py), so a stage downstream of one that runs cannot know its version
  yet: "after <upstream>, unless its output comes out unchanged" (then it is skipped);
- train: skipped when its run folder holds the final checkpoint, else resumes from its latest complete one or
  starts; evaluate follows train.
Reading manifests costs a few small reads per stage; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from stages import pipeline
from stages.core.config import PipelineConfig, load_config


def plan(cfg: PipelineConfig, force: list[str] = (), registry: pipeline.Pipeline | None = None) -> list[dict]:
    """One row per stage: stage, action (run | skip), reason, output (the path, when already known)."""
    registry = registry or pipeline.PIPELINE
    force = registry.check_names(list(force))
    rows: list[dict] = []
    pending: dict[str, str] = {}  # stage -> the first stage upstream of it (or itself) that will run
    known: dict = {}
    for stage in registry.stages:
        reads = [stage.inputs[role] for role in stage.read_roles(cfg)]
        waiting = next((pending[source] for source in reads if source in pending), None)
        if waiting:
            rows.append(row(stage.name, "run", stage.after(waiting)))
            pending[stage.name] = waiting
            continue
        upstream = {role: registry.output(stage.inputs[role], cfg, known) for role in stage.read_roles(cfg)}
        status = stage.status(cfg, upstream, stage.name in force)
        rows.append(row(stage.name, status.action, status.reason, status.output))
        if status.action == "run":
            pending[stage.name] = stage.name
    return rows


def row(stage: str, action: str, reason: str, output: str = "") -> dict:
    return {"stage": stage, "action": action, "reason": reason, "output": output}


def markdown(rows: list[dict]) -> str:
    lines = ["| stage | action | why | output |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['action']} | {r['reason']} | {r['output']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (JSON value)")
    parser.add_argument("--force", nargs="*", default=[], metavar="STAGE")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    print(markdown(plan(load_config(args.preset, overrides), args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
