"""Serve the pipeline's deployments to the Prefect server named by PREFECT_API_URL: `pretrain/full` and
`evaluate/checkpoint`.

`serve` registers the deployments and runs their flow runs in subprocesses of this process, which is the
simplest way to make `prefect deployment run pretrain/full` work on one machine. infra/stack.py starts it;
on a cluster use a work pool instead (never both for one deployment: the serve process would take the runs).
"""

from prefect import serve

from flows.evaluate import evaluate_checkpoint
from flows.pretrain import pretrain

if __name__ == "__main__":
    serve(
        pretrain.to_deployment(
            name="full", parameters={"preset": "tiny"}, description="raw text to an evaluated model"
        ),
        evaluate_checkpoint.to_deployment(name="checkpoint", description="evaluate any checkpoint with a task suite"),
    )
