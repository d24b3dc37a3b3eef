"""The flow of the `pretrain/ablate` deployment: data variants of a preset, proxy models trained on each with
several seeds, all evaluated on one held-out set (stages/tools/ablate.py holds the steps; this flow runs them as
the same stage tasks `pretrain` runs, so shared stages are built once and the UI shows every one).

Parameters: the preset, `variants` ({name: {dotted.key: value}}, data sections only), `seeds` (two or more) and
`overrides` for every variant. Every variant's config is loaded and checked before the first task. The result is a
table artifact (the metric per variant with its spread over seeds, the data kept, seconds per stage), the plot,
and the verdict: whether a difference exceeds the seed spread.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from flows.credentials import resolve_credentials
from flows.pretrain import run_stages
from stages.core.config import PipelineConfig
from stages.tools import ablate as ablation

DEFAULT_VARIANTS = {"baseline": {}, "no-gopher-quality": {"filter.gopher_quality.enabled": False}}


# Named `pretrain` as the full pipeline's flow is: the deployment is `pretrain/ablate`.
@flow(name="pretrain")
def ablate(
    preset: str = "tiny",
    variants: dict[str, dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Train proxy models on each variant of the data and compare them on one held-out set."""
    spec = {"preset": preset, "variants": variants or DEFAULT_VARIANTS, "overrides": overrides or {}}
    ab = ablation.load({**spec, **({"seeds": seeds} if seeds else {})}, resolve_credentials)
    logger = get_run_logger()
    logger.info("ablation %s: variants %s, seeds %s", ab.uri, list(ab.configs), ab.spec.seeds)

    def execute(cfg: PipelineConfig, stages: tuple) -> dict:
        return run_stages(cfg, stages)

    summary = ablation.run(ab, execute, logger.info)
    where = f"{summary['uri']}: held-out {summary['heldout']}; {summary['verdict']}"
    create_table_artifact(key="ablation", table=ablation.table(summary), description=where)
    png = summary["png"]
    create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(), key="ablation-plot",
                          description=f"held-out {summary['metric']} per variant, each seed a dot")  # fmt: skip
    create_markdown_artifact(key="ablation-verdict", markdown=f"# Ablation\n\n{summary['verdict']}\n")
    return {k: summary[k] for k in ("uri", "heldout", "verdict")}
