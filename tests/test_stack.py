"""infra/stack.py beyond loopback: the server is exposed only behind basic auth, and the secret stays out of files."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request

from tests.conftest import BIN, REPO, free_port

STACK = [sys.executable, str(REPO / "infra" / "stack.py")]
AUTH = "admin:stack-Test-Passw0rd-91c2"


def stack(command: str, state, port: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [*STACK, command, "--state", str(state), "--port", str(port), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env or dict(os.environ), timeout=300)


def status_of(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_exposing_the_server_without_auth_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
    up = stack("up", tmp_path, free_port(), "--bind", "0.0.0.0", env=env)
    assert up.returncode == 1
    assert "PREFECT_SERVER_API_AUTH_STRING" in up.stderr and "0.0.0.0" in up.stderr
    assert not list(tmp_path.glob("*.pid"))  # refused before anything started


def test_exposed_server_requires_basic_auth(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_SERVER_API_AUTH_STRING": AUTH}
    try:
        up = stack("up", tmp_path, port, "--bind", "0.0.0.0", env=env)
        assert up.returncode == 0, up.stderr + up.stdout
        api = f"http://127.0.0.1:{port}/api"
        deployment = f"{api}/deployments/name/pretrain/full"
        assert status_of(f"{api}/health") == 200  # probes stay open
        assert status_of(deployment) == 401
        assert status_of(deployment, "admin:wrong") == 401
        assert status_of(deployment, AUTH) == 200  # registered by the serving process, which had to authenticate

        # Prefect's own CLI, as a user or a worker elsewhere would run it
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        client_env.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "client"))
        listing = [str(BIN / "prefect"), "deployment", "ls"]
        refused = subprocess.run(listing, capture_output=True, text=True, env=client_env, timeout=120)
        assert refused.returncode != 0 and "pretrain/full" not in refused.stdout
        allowed = subprocess.run(
            listing, capture_output=True, text=True, env={**client_env, "PREFECT_API_AUTH_STRING": AUTH}, timeout=120
        )
        assert allowed.returncode == 0 and "full" in allowed.stdout, allowed.stdout + allowed.stderr

        # the secret is in no file the stack writes (env.sh tells the user what to export, not its value)
        assert "PREFECT_API_AUTH_STRING" in (tmp_path / "env.sh").read_text()
        written = [p for p in tmp_path.iterdir() if p.is_file()]
        assert written and not [p.name for p in written if AUTH in p.read_text(errors="replace")]
    finally:
        stack("down", tmp_path, port)
