"""The `pretrain` flow: one Prefect task per stage, named after it, so the UI's graph reads as the pipeline.

Thin by design: every task calls a stage's `run` from `stages/`, sends its log lines to the Prefect logger,
and turns the stats the stage returns into a table artifact. Skipping finished work is the stages' job (their
manifests), not Prefect's result cache, so a rerun from the UI, the CLI or a plain Python call behaves the
same. Each task holds its output's lock (flows/locks.py) while it builds, so two runs of one config at once
build each output once: the second waits, then skips it. The config is loaded and the inputs checked before the
first task, so a bad config fails before any work starts.
"""

from __future__ import annotations

import base64
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
from stages import (
    budget,
    dedup,
    evaluate,
    filter,
    ingest,
    launch,
    plan,
    samples,
    storage,
    tokenize,
    tokenizer,
    train_report,
)
from stages.config import PipelineConfig, load_config
from stages.preflight import preflight
from stages.stage import Force


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


def _report(stage: str, stats: dict) -> dict:
    logger = get_run_logger()
    logger.info("%s stats: %s", stage, json.dumps(stats, sort_keys=True, default=str))
    create_table_artifact(key=f"{stage}-stats", table=_rows(stats), description=f"{stage}: what the stage did")
    return stats


def _stage_task(stage):
    name = stage.__name__.rsplit(".", 1)[-1]

    @task(name=name, cache_policy=NO_CACHE)
    def run_stage_task(cfg: PipelineConfig, force: Force = False) -> dict:
        log = get_run_logger().info
        with output_lock(name, stage.output(cfg).uri, log):  # (its upstream is built: the version is known)
            stats = stage.run(cfg, log=log, force=force)
        return _report(name, stats)

    return run_stage_task


ingest_task = _stage_task(ingest)
filter_task = _stage_task(filter)
dedup_task = _stage_task(dedup)
tokenizer_task = _stage_task(tokenizer)
tokenize_task = _stage_task(tokenize)


def report_evaluation(stats: dict) -> dict:
    """The stats table plus a table of every metric beside the previously evaluated checkpoint's."""
    skipped = stats.get("tasks_skipped") or "none"
    create_table_artifact(
        key="eval-metrics",
        table=evaluate.compare(stats["metrics"], stats.get("previous")),
        description=f"step {stats['step']} of {stats['checkpoint']}; skipped tasks: {skipped}",
    )
    return _report("evaluate", stats)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, checkpoint: str | None = None, force: Force = False) -> dict:
    log = get_run_logger().info
    # one checkpoint's evaluation, or (no checkpoint given) those of every checkpoint of the config's run
    with output_lock("evaluate", checkpoint or launch.run_uri(launch.resolved(cfg)), log):
        stats = evaluate.run(cfg, log=log, checkpoint=checkpoint, force=force)
    return report_evaluation(stats)


def on_cluster_if_configured(stage_task, cfg: PipelineConfig, force: Force = False) -> dict:
    """Run a data stage's task here, or with `cluster.dask_address` set, on that Dask cluster through
    prefect-dask (the stage then spreads its units over the same cluster: stages/parallel.py)."""
    if not cfg.cluster.dask_address:
        return stage_task(cfg, force)
    from prefect_dask import DaskTaskRunner

    with DaskTaskRunner(address=cfg.cluster.dask_address) as runner:
        return runner.submit(stage_task, {"cfg": cfg, "force": force}).result()


class TrainingProgress:
    """A progress artifact that follows the training steps, updated at most every `interval` seconds."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, metric: dict) -> None:
        percent = 100.0 * metric["step"] / metric["max_steps"]
        now = time.monotonic()
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=percent, key="train-progress", description="training steps done (%)"
            )
        elif now - self.last >= self.interval or metric["step"] == metric["max_steps"]:
            update_progress_artifact(self.artifact_id, progress=percent)
        else:
            return
        self.last = now


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, force: Force = False) -> dict:
    log = get_run_logger().info
    with output_lock("train", launch.run_uri(launch.resolved(cfg)), log):
        # The torchrun children's output streams line by line into this task's log.
        stats = launch.run_training(cfg, on_line=log, on_metric=TrainingProgress(), force=force)
    started = time.perf_counter()
    report = train_report.write(cfg)  # (the loss curve: matplotlib's import and drawing take a second or two)
    stats["report_seconds"] = round(time.perf_counter() - started, 3)
    if report["png"]:
        data_uri = "data:image/png;base64," + base64.b64encode(report["png"]).decode()
        create_image_artifact(image_url=data_uri, key="train-loss-curve", description=f"saved at {report['png_uri']}")
        create_table_artifact(
            key="train-metrics", table=train_report.metrics_table(report["records"]), description="per-step metrics"
        )
    if stats.get("checkpoint"):  # the final checkpoint continues a few fixed prompts: a look by a human
        started = time.perf_counter()
        shown = samples.run(cfg, stats["checkpoint"], log)
        stats["samples_seconds"] = round(time.perf_counter() - started, 3)
        create_markdown_artifact(key="train-samples", markdown=shown["markdown"], description="continuations")
        stats["samples"] = storage.join(stats["checkpoint"], samples.SAMPLES)
    return _report("train", stats)


def funnel(stats: dict[str, dict]) -> str:
    """Markdown table: documents and bytes from raw records to training tokens, with what each step removed."""
    ingest, tokenize = stats["ingest"], stats["tokenize"]
    rows = [
        ("raw records", ingest["records_in"], "", "", ""),
        ("ingested", ingest["docs_out"], ingest["bytes_out"], "", f"{ingest['quarantined_total']} quarantined"),
    ]
    for stage in ("filter", "dedup"):
        removed = ", ".join(f"{n} {rule}" for rule, n in stats[stage]["removed"].items() if n)
        rows.append((stage, stats[stage]["docs_out"], stats[stage]["bytes_out"], "", removed))
    tokens = tokenize["tokens"]
    rows.append(
        (
            "tokenized",
            tokenize["docs"]["train"] - tokenize["removed"]["decontaminated"] + tokenize["docs"]["val"],
            "",
            f"{tokens['train']} train / {tokens['val']} val",
            f"{tokenize['removed']['decontaminated']} decontaminated",
        )
    )
    lines = ["| step | documents | bytes | tokens | removed |", "|---|---:|---:|---:|---|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


@flow(name="pretrain")
def pretrain(
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    force: list[str] | None = None,
    dry_run: bool = False,
) -> dict:
    """`force`: stages to rebuild even when up to date (ingest, filter, dedup, tokenizer, tokenize, train,
    evaluate). `dry_run`: only the plan (what would run and why), as an artifact and the return value."""
    cfg = resolve_credentials(load_config(preset, overrides))
    forced = set(plan.check_force(force or []))
    preflight(cfg)
    logger = get_run_logger()
    logger.info("config %s, outputs under %s", cfg.name, cfg.storage.root)
    steps = plan.plan(cfg, sorted(forced))
    table = plan.markdown(steps)
    logger.info("plan:\n%s", table)
    create_markdown_artifact(key="plan", markdown="# Plan\n\n" + table, description="what this run does and why")
    create_markdown_artifact(
        key="compute-plan",
        markdown="# Compute plan\n\n" + budget.markdown(budget.estimate(cfg)),
        description="parameters, FLOPs, tokens, steps; time, cost, memory and disk (estimates)",
    )
    if dry_run:
        return {"plan": steps}
    stats: dict[str, dict] = {}
    # A forced stage is forced once per flow run: the token (this run's id) lets a retry of it resume what its
    # first attempt rebuilt rather than start that over (stages/stage.py: forced_now).
    token = str(flow_run_context.id)

    def force_of(stage: str) -> Force:
        return token if stage in forced else False

    stats["ingest"] = on_cluster_if_configured(ingest_task, cfg, force_of("ingest"))
    stats["filter"] = on_cluster_if_configured(filter_task, cfg, force_of("filter"))
    stats["dedup"] = on_cluster_if_configured(dedup_task, cfg, force_of("dedup"))
    stats["tokenizer"] = tokenizer_task(cfg, force_of("tokenizer"))
    stats["tokenize"] = tokenize_task(cfg, force_of("tokenize"))
    create_markdown_artifact(key="data-funnel", markdown="# Data funnel\n\n" + funnel(stats))
    stats["train"] = train_task(cfg, force_of("train"))
    stats["evaluate"] = evaluate_task(cfg, force=force_of("evaluate"))
    return stats
