"""Serve the pipeline's deployments to the Prefect server named by PREFECT_API_URL.

`flow.serve` registers the deployment and runs its flow runs in subprocesses of this process, which is the
simplest way to make `prefect deployment run pretrain/full` work on one machine. infra/stack.py starts it;
on a cluster use a work pool instead (never both for one deployment: the serve process would take the runs).
"""

from flows.pretrain import pretrain

if __name__ == "__main__":
    pretrain.serve(name="full", parameters={"preset": "tiny"}, description="raw text to an evaluated model")
