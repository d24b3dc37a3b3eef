"""The `evaluate` flow: evaluate any checkpoint, from the UI or `prefect deployment run evaluate/checkpoint`.

Parameters: the checkpoint's URI (a run's `.../train/VERSION/step-N` folder with its meta.json, local or s3://), the
suite (task names and/or a suite's name, `standard`; default: the preset's `evaluate.tasks` and `evaluate.suite`),
and the preset and overrides for everything else
(storage credentials, batch size, ...). The held-out documents are those of the run the checkpoint belongs to;
results land in the checkpoint's `eval/` folder with the same artifacts as the evaluate stage of `pretrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.credentials import resolve_credentials
from flows.locks import output_lock
from flows.pretrain import report
from stages import pipeline
from stages.core.config import REPO_ROOT, PipelineConfig, load_config
from stages.evaluate.benchmarks import SUITES
from stages.evaluate.stage import evaluate


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, checkpoint: str) -> dict:
    log = get_run_logger().info
    with output_lock("evaluate", checkpoint, log):
        stats = evaluate(cfg, None, log, checkpoint=checkpoint)
    return report(pipeline.PIPELINE["evaluate"], cfg, stats)


@flow(name="evaluate")
def evaluate_checkpoint(
    checkpoint: str,
    suite: list[str] | None = None,
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
) -> dict:
    settings = dict(overrides or {})
    if suite:  # task names, or a suite's name (standard): only these, not the preset's
        settings["evaluate.tasks"] = [name for name in suite if name not in SUITES]
        settings["evaluate.suite"] = next((name for name in suite if name in SUITES), None)
    cfg = resolve_credentials(load_config(preset, settings))
    if "://" not in checkpoint and not Path(checkpoint).is_absolute():
        checkpoint = str(REPO_ROOT / checkpoint)  # relative to the repository, as config paths are
    get_run_logger().info("evaluating %s with %s", checkpoint, cfg.evaluate.tasks)
    return evaluate_task(cfg, checkpoint)
