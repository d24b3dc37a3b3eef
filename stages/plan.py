"""What a run of the pipeline would do, without doing it: per stage, run or skip, and why.

    python -m stages.plan [PRESET] [--set section.field=value ...] [--force STAGE ...]

The pretrain flow shows the same table as a markdown artifact before its first stage (and with `dry_run` stops
there). Every answer comes from the stages' own identity functions, so the plan cannot disagree with what the
run then does:
- a data stage is skipped when the manifest at its versioned path holds its identity; otherwise it runs, and
  the reason names what differs from its newest other version (code, config section, inputs) or says it was
  never built or its build was interrupted;
- inputs are content digests (stages/stage.py), so a stage downstream of one that runs cannot know its version
  yet: "after <upstream>, unless its output comes out unchanged" (then it is skipped);
- train: skipped when its run folder holds the final checkpoint, else resumes from its latest complete one or
  starts; evaluate follows train.
Reading manifests costs a few small reads per stage; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys

from stages import checkpoints, dedup, evaluate, filter, ingest, launch, storage, tokenize, tokenizer
from stages.config import PipelineConfig, load_config
from stages.stage import PROGRESS, other_versions

DATA_STAGES = {"ingest": ingest, "filter": filter, "dedup": dedup, "tokenizer": tokenizer, "tokenize": tokenize}
STAGES = (*DATA_STAGES, "train", "evaluate")


def check_force(force: list[str]) -> list[str]:
    unknown = sorted(set(force) - set(STAGES))
    if unknown:
        raise ValueError(f"force: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    return list(force)


def _why_data_stage_runs(out: storage.StageOutput, identity: dict) -> str:
    if out.manifest() is None and storage.exists(out.path(PROGRESS, "identity.json"), out.storage):
        return "resumes an interrupted build"
    others = other_versions(out)
    if not others:
        return "never built"
    before = others[0]["identity"]
    changed = [part for part in ("code", "config", "inputs") if before.get(part) != identity.get(part)]
    if "inputs" in changed and isinstance(identity["inputs"], dict) and isinstance(before.get("inputs"), dict):
        keys = sorted(k for k in identity["inputs"] if identity["inputs"][k] != before["inputs"].get(k))
        changed[changed.index("inputs")] = f"inputs ({', '.join(keys)})"
    what = {"code": "code", "config": "config section"}
    return f"{', '.join(what.get(c, c) for c in changed)} changed since {others[0]['uri'].rsplit('/', 1)[1]}"


def plan(cfg: PipelineConfig, force: list[str] = ()) -> list[dict]:
    """One row per stage: stage, action (run | skip), reason, output (the path, when already known)."""
    force = check_force(list(force))
    rows: list[dict] = []
    pending: str | None = None  # the first upstream stage that will run
    for name, module in DATA_STAGES.items():
        if pending:
            rows.append(
                {
                    "stage": name,
                    "action": "run",
                    "reason": f"after {pending}, unless its output comes out unchanged",
                    "output": "",
                }
            )
            continue
        identity = module.identity(cfg)
        out = module.output(cfg, identity)
        if name in force:
            action, reason = "run", "forced"
        elif out.is_current(identity):
            action, reason = "skip", "up to date"
        else:
            action, reason = "run", _why_data_stage_runs(out, identity)
        rows.append({"stage": name, "action": action, "reason": reason, "output": out.uri})
        if action == "run":
            pending = name
    rows += _training_rows(cfg, force, pending)
    return rows


def _training_rows(cfg: PipelineConfig, force: list[str], pending: str | None) -> list[dict]:
    if pending:
        reason = f"after {pending}, unless its output comes out unchanged"
        return [{"stage": s, "action": "run", "reason": reason, "output": ""} for s in ("train", "evaluate")]
    cfg = launch.resolved(cfg)
    run = launch.run_uri(cfg)
    found = checkpoints.complete_checkpoints(run, cfg.storage)
    final = checkpoints.final_checkpoint(run, cfg.train.max_steps, cfg.storage)
    if "train" in force:
        train = ("run", "forced: from step 0")
    elif final:
        early = " (a mixture source ran out)" if final[1].get("data_exhausted") else ""
        train = ("skip", f"complete at step {final[1]['step']}{early}")
    elif found:
        train = ("run", f"resumes from step {found[-1][0]} of {cfg.train.max_steps}")
    else:
        train = ("run", f"never trained: {cfg.train.max_steps} steps")
    rows = [{"stage": "train", "action": train[0], "reason": train[1], "output": run}]
    if train[0] == "run":
        return rows + [{"stage": "evaluate", "action": "run", "reason": "after train", "output": ""}]
    step, ckpt, meta = checkpoints.latest_checkpoint(run, cfg.storage)
    out = evaluate.output(ckpt, cfg.storage)
    identity = evaluate.eval_identity(cfg, step, meta, evaluate.heldout_uri(ckpt, meta, cfg.storage))
    if "evaluate" in force:
        action, reason = "run", "forced"
    elif out.is_current(identity):
        action, reason = "skip", "up to date"
    else:
        action, reason = "run", "not evaluated with this config" if out.manifest() else "never evaluated"
    return rows + [{"stage": "evaluate", "action": action, "reason": reason, "output": out.uri}]


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
