"""The cluster work-pool templates in infra/work-pools/ render, with Prefect's own templating, into a Kubernetes
Job and a Slurm submission that say what the README promises; the Slurm job script parses."""

from __future__ import annotations

import json
import shlex
import subprocess

from prefect.utilities.templating import apply_values, find_placeholders

from tests.conftest import REPO

POOLS = REPO / "infra" / "work-pools"


def render(name: str, values: dict) -> dict:
    template = json.loads((POOLS / f"{name}.json").read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used == set(variables), f"{name}: placeholders and variables differ: {used ^ set(variables)}"
    assert set(template["variables"].get("required", [])) <= set(values)
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **values})


def test_kubernetes_job_gets_gpus_shared_memory_and_credentials_from_a_secret():
    config = render("kubernetes", {"image": "registry.example/pretrain:1", "command": "prefect flow-run execute"})
    job = config["job_manifest"]
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0  # retries are Prefect's, not the Job's
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/pretrain:1" and container["args"] == "prefect flow-run execute"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {v["name"]: v["emptyDir"] for v in pod["volumes"]}["shm"]["medium"] == "Memory"
    env = {e["name"]: e for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "pretrain-s3", "key": key}
    assert "{{" not in json.dumps(config)


def test_slurm_submission_waits_for_one_job_running_the_flow_run(tmp_path):
    config = render("slurm", {"repository": "/shared/pretrain-pipeline", "gpus_per_node": 4})
    argv = shlex.split(config["command"])
    assert argv[:2] == ["sbatch", "--wait"]  # the worker sees the flow run end when the job does
    assert "--gpus-per-node=4" in argv and "--export=ALL" in argv  # PREFECT__FLOW_RUN_ID reaches the job
    assert argv[-1] == "/shared/pretrain-pipeline/infra/slurm/flow-run.sbatch"
    assert config["working_dir"] == "/shared/pretrain-pipeline" and "{{" not in json.dumps(config)
    script = REPO / "infra" / "slurm" / "flow-run.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert 'prefect flow-run execute "${PREFECT__FLOW_RUN_ID}"' in script.read_text()
