"""The `pretrain` flow: one Prefect task per stage of stages/pipeline.py, named after it, so the UI's graph reads as
the pipeline, with an edge from each stage to those that read its output.

Thin by design, and written once for every stage: a task resolves its stage's inputs, holds its output's lock
(flows/locks.py) while the stage runs, sends the stage's log lines to the Prefect logger and its progress to a
progress artifact, and turns the stats the stage returns into a table artifact (plus what the stage asks to show:
`Stage.artifacts`). Skipping finished work is the stages' job (their manifests), not Prefect's result cache, so a
rerun from the UI, the CLI or a plain Python call behaves the same. Two runs of one config at once build each
output once: the second waits, then skips it. The config is loaded and the inputs checked before the first task,
so a bad config fails before any work starts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as flow_run_context

from flows.credentials import resolve_credentials
from flows.locks import output_lock
from stages import pipeline
from stages.core.config import PipelineConfig, load_config
from stages.core.stage import Artifact, Force, Stage
from stages.tools import budget, plan
from stages.tools.preflight import preflight


def _rows(stats: dict, prefix: str = "") -> list[dict[str, str]]:
    rows = []
    for key, value in stats.items():
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        else:
            rows.append(
                {"metric": f"{prefix}{key}", "value": json.dumps(value) if not isinstance(value, str) else value}
            )
    return rows


def _show(artifact: Artifact) -> None:
    if artifact.kind == "table":
        create_table_artifact(key=artifact.key, table=artifact.content, description=artifact.description)
    elif artifact.kind == "markdown":
        create_markdown_artifact(key=artifact.key, markdown=artifact.content, description=artifact.description)
    elif artifact.kind == "image":
        data_uri = "data:image/png;base64," + base64.b64encode(artifact.content).decode()
        create_image_artifact(image_url=data_uri, key=artifact.key, description=artifact.description)
    else:
        raise ValueError(f"artifact {artifact.key}: unknown kind {artifact.kind!r}")


def report(stage: Stage, cfg: PipelineConfig, stats: dict) -> dict:
    """The stats to the log and as a table artifact, then what else the stage shows."""
    logger = get_run_logger()
    logger.info("%s stats: %s", stage.name, json.dumps(stats, sort_keys=True, default=str))
    create_table_artifact(key=f"{stage.name}-stats", table=_rows(stats), description=f"{stage.name}: what it did")
    for artifact in stage.artifacts(cfg, stats):
        _show(artifact)
    return stats


class ProgressBar:
    """A progress artifact that follows a stage's work (steps, units), updated at most every `interval` seconds."""

    def __init__(self, key: str, interval: float = 2.0):
        self.key, self.interval = key, interval
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        percent = 100.0 * done / max(total, 1)
        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, key=self.key, description="work done (%)")
        elif now - self.last >= self.interval or done == total:
            update_progress_artifact(self.artifact_id, progress=percent)
        else:
            return
        self.last = now


def run_stage(stage_name: str, cfg: PipelineConfig, force: Force = False) -> dict:
    """A stage of the registry, as its task runs it (its inputs are built: its output's version is known)."""
    registry = pipeline.PIPELINE
    stage, log = registry[stage_name], get_run_logger().info
    upstream = registry.upstream(stage_name, cfg)
    with output_lock(stage_name, stage.lock_uri(cfg, upstream), log):
        stats = stage.run(cfg, upstream, log=log, force=force, progress=ProgressBar(f"{stage_name}-progress"))
    return report(stage, cfg, stats)


_TASKS: dict[str, Any] = {}


def stage_task(name: str):
    """The Prefect task of stage `name` (made once per stage)."""
    if name not in _TASKS:
        _TASKS[name] = task(name=name, cache_policy=NO_CACHE)(_named(name))
    return _TASKS[name]


def _named(name: str):
    def run_stage_task(cfg: PipelineConfig, force: Force = False) -> dict:
        return run_stage(name, cfg, force)

    run_stage_task.__name__ = run_stage_task.__qualname__ = f"run_{name}"
    return run_stage_task


class StageRuns:
    """Runs stages' tasks, each once the tasks in `after` are done (the UI draws those edges): here, or for a stage
    whose work splits into units with `cluster.dask_address` set, on that Dask cluster through prefect-dask (the
    stage then spreads its units over the same cluster: stages/core/parallel.py). One Dask runner serves the whole
    flow run, opened on first use and closed with `stack`: a stage waits on another's future, which must outlive
    the runner that made it no more than the run does."""

    def __init__(self, cfg: PipelineConfig, stack: contextlib.ExitStack):
        self.cfg, self.stack = cfg, stack
        self.runner = None

    def submit(self, stage: Stage, force: Force, after: list) -> tuple[dict, Any]:
        """The stage's stats, and its state or future (what later stages wait for)."""
        stage_run = stage_task(stage.name)
        if stage.units and self.cfg.cluster.dask_address:
            if self.runner is None:
                from prefect_dask import DaskTaskRunner

                self.runner = self.stack.enter_context(DaskTaskRunner(address=self.cfg.cluster.dask_address))
            future = self.runner.submit(stage_run, {"cfg": self.cfg, "force": force}, wait_for=after)
            return future.result(), future
        state = stage_run(self.cfg, force, return_state=True, wait_for=after)
        return state.result(), state


def funnel(stats: dict[str, dict], registry: pipeline.Pipeline) -> str:
    """Markdown table: documents and bytes from raw records to training tokens, with what each step removed (every
    funnel stage reports the core keys: stages/core/stage.py)."""
    first = stats[registry.funnel[0].name]
    rows = [("raw records", first["docs_in"], first["bytes_in"], "", "")]
    for stage in registry.funnel:
        s = stats[stage.name]
        removed = ", ".join(f"{n} {rule}" for rule, n in s["removed"].items() if n)
        tokens = s.get("tokens")  # (a stage that makes tokens: how many, per split)
        shown = " / ".join(f"{n} {split}" for split, n in tokens.items()) if isinstance(tokens, dict) else ""
        rows.append((stage.funnel, s["docs_out"], s["bytes_out"], shown, removed))
    lines = ["| step | documents | bytes | tokens | removed |", "|---|---:|---:|---:|---|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def run_stages(cfg: PipelineConfig, stages: tuple[Stage, ...], forced: set[str] = frozenset(), token: str = "") -> dict:
    """Each of `stages` in order, each task waiting on those of its inputs; the data funnel once its last row's
    stage has run. `forced` stages rebuild, once per flow run (`token`: stages/core/stage.py forced_now)."""
    registry = pipeline.PIPELINE
    stats: dict[str, dict] = {}
    runs: dict[str, Any] = {}
    last_funnel = registry.funnel[-1].name if registry.funnel else None
    with contextlib.ExitStack() as stack:
        tasks = StageRuns(cfg, stack)
        for stage in stages:
            after = [runs[source] for source in stage.inputs.values() if source in runs]
            force = token if stage.name in forced else False
            stats[stage.name], runs[stage.name] = tasks.submit(stage, force, after)
            if stage.name == last_funnel and all(s.name in stats for s in registry.funnel):
                create_markdown_artifact(key="data-funnel", markdown="# Data funnel\n\n" + funnel(stats, registry))
    return stats


@flow(name="pretrain")
def pretrain(
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    force: list[str] | None = None,
    dry_run: bool = False,
) -> dict:
    """`force`: stages to rebuild even when up to date (any of stages/pipeline.py's). `dry_run`: only the plan
    (what would run and why), as an artifact and the return value."""
    registry = pipeline.PIPELINE
    cfg = resolve_credentials(load_config(preset, overrides))
    forced = set(registry.check_names(force or []))
    preflight(cfg)
    logger = get_run_logger()
    logger.info("config %s, outputs under %s", cfg.name, cfg.storage.root)
    steps = plan.plan(cfg, sorted(forced))
    table = plan.markdown(steps)
    logger.info("plan:\n%s", table)
    create_markdown_artifact(key="plan", markdown="# Plan\n\n" + table, description="what this run does and why")
    create_markdown_artifact(
        key="compute-plan",
        markdown="# Compute plan\n\n" + budget.plan_markdown(cfg),
        description="parameters, FLOPs, tokens, steps; time, cost, memory and disk (estimates)",
    )
    if dry_run:
        return {"plan": steps}
    # A forced stage is forced once per flow run: the token (this run's id) lets a retry of it resume what its
    # first attempt rebuilt rather than start that over (stages/core/stage.py: forced_now).
    return run_stages(cfg, registry.stages, forced, str(flow_run_context.id))
