"""prefect.yaml, as a user with a work pool runs it: `prefect --no-prompt deploy --all` against a real Prefect server
registers the deployments flows/serve.py serves, with its parameters, descriptions and schedule, and a real
`prefect worker start` in the repository runs one of them (a dry run of `pretrain/full`: the plan only, seconds)
to COMPLETED. The server is this test's own (infra/stack.py's helpers, a temporary PREFECT_HOME with SQLite), with
no serve process beside it: that would take the runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from flows.serve import PRESET, deployments
from infra import stack
from stages.core.config import load_config
from tests.conftest import BIN, REPO, free_port

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POOL = "pretrain"  # the pool prefect.yaml names
# flows/serve.py's deployments: parameters and description, by name
EXPECTED = {f"{d.flow_name}/{d.name}": (d.parameters, d.description) for d in deployments()}


def api(base: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # (generous: two busy cores)
        return json.loads(response.read())


def stop(state, name: str) -> None:
    """SIGTERM the process group stack.start made (its pid is the group's), SIGKILL after 15 s."""
    pid = stack.read_pid(state, name)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while stack.read_pid(state, name) is not None and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it: a zombie still answers kill(pid, 0)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if stack.read_pid(state, name) is not None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture
def server(tmp_path):
    """A Prefect server of this test's own, on a free port; no scheduler (prefect.yaml's cron schedule must not
    start a real refresh while the test runs) and no serve process."""
    state, port = tmp_path / "stack", free_port()
    state.mkdir()
    env = stack.base_env(state, port, stack.HOST)
    env.update(PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    argv = [str(BIN / "prefect"), "server", "start", "--host", stack.HOST, "--port", str(port)]
    try:
        stack.start(state, "server", argv, env)
        stack.wait_for(lambda: stack.http_ok(f"{stack.api_url(port)}/health"), "Prefect server", state, "server")
        yield {"api": stack.api_url(port), "state": state, "env": env}
    finally:
        stop(state, "worker")
        stop(state, "server")


def prefect(server, *args: str) -> str:
    """A Prefect CLI command from the repository root, as a user's shell there runs it (PWD is what prefect.yaml's
    pull step names)."""
    env = server["env"] | {"PWD": str(REPO)}
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def wait_for_end(server, flow_run_id: str, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while (run := api(server["api"], f"/flow_runs/{flow_run_id}"))["state"]["type"] not in FINAL:
        if time.monotonic() > deadline:
            log = (server["state"] / "worker.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"flow run {flow_run_id} still {run['state']['type']} after {seconds:.0f}s; worker:\n{log}")
        time.sleep(0.5)
    return run


def assert_deployed(server) -> dict[str, dict]:
    """flows/serve.py's deployments, as `prefect deploy --all` registered them from prefect.yaml, by name."""
    deployments = {}
    for name, (parameters, description) in EXPECTED.items():
        found = deployments[name] = api(server["api"], f"/deployments/name/{name}")
        assert (found["parameters"], found["description"]) == (parameters, description), name
        assert found["work_pool_name"] == POOL and found["entrypoint"].startswith("flows/"), name
        assert found["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    # the refresh schedule is the preset's, as flows/serve.py registers it
    cron = load_config(PRESET).refresh.schedule
    schedules = [s["schedule"] for s in deployments["pretrain/data-refresh"]["schedules"]]
    assert [(s["cron"], s.get("timezone") or "UTC") for s in schedules] == ([(cron, "UTC")] if cron else [])
    assert not deployments["pretrain/full"]["schedules"] and not deployments["evaluate/checkpoint"]["schedules"]
    return deployments


def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_them(server, tmp_path):
    prefect(server, "work-pool", "create", POOL, "--type", "process")
    prefect(server, "--no-prompt", "deploy", "--all")
    deployments = assert_deployed(server)

    # A worker without PYTHONPATH: prefect.yaml's pull step must put the flow run in the repository for the
    # entrypoint's file to be found (without it, the run starts in a temporary folder and crashes).
    worker_env = {k: v for k, v in server["env"].items() if k != "PYTHONPATH"}
    stack.start(server["state"], "worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL], worker_env)
    params = {"dry_run": True, "overrides": {"storage.root": str(tmp_path / "outputs")}}
    full = deployments["pretrain/full"]["id"]
    run = api(server["api"], f"/deployments/{full}/create_flow_run", {"parameters": params})
    ended = wait_for_end(server, run["id"])
    assert ended["state"]["type"] == "COMPLETED", ended["state"]
    assert ended["work_pool_name"] == POOL
    plan = api(server["api"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    assert "ingest" in {a["key"]: a for a in plan}["plan"]["data"]  # the flow itself ran: its plan artifact
