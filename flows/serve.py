"""Serve the pipeline's deployments to the Prefect server named by PREFECT_API_URL: `pretrain/full`,
`pretrain/data-refresh` (on the preset's `refresh.schedule`), `pretrain/ablate` and `evaluate/checkpoint`.

`serve` registers the deployments and runs their flow runs in subprocesses of this process, which is the
simplest way to make `prefect deployment run pretrain/full` work on one machine. infra/stack.py starts it;
on a cluster use a work pool instead (prefect.yaml declares the same deployments; never both for one
deployment: the serve process would take the runs).
"""

from prefect import serve

from flows.ablate import ablate
from flows.evaluate import evaluate_checkpoint
from flows.pretrain import pretrain
from flows.refresh import data_refresh
from stages.core.config import load_config

PRESET = "tiny"  # the embedded default; a deployment run can name another preset as a parameter


def deployments() -> list:
    """What is served (and what prefect.yaml must declare: tests/test_deployments.py compares them)."""
    return [
        pretrain.to_deployment(
            name="full", parameters={"preset": PRESET}, description="raw text to an evaluated model"
        ),
        data_refresh.to_deployment(
            name="data-refresh",
            parameters={"preset": PRESET},
            cron=load_config(PRESET).refresh.schedule,  # None: no schedule, run it by hand
            description="add the raw files new since the last dataset version; optionally continue pretraining",
        ),
        ablate.to_deployment(
            name="ablate",
            parameters={"preset": PRESET},
            description="proxy models on variants of the data, several seeds each, compared on one held-out set",
        ),
        evaluate_checkpoint.to_deployment(name="checkpoint", description="evaluate any checkpoint with a task suite"),
    ]


if __name__ == "__main__":
    serve(*deployments())
