"""Start, check and stop the local stack: a Prefect server (embedded SQLite), the process serving the
deployments, and optionally a local S3 endpoint (moto server over HTTP).

    python infra/stack.py up [--s3]     # idempotent: reuses what is already running
    python infra/stack.py status
    python infra/stack.py down

Everything lives under a state folder (default `.stack/` at the repository root): the Prefect home with its
database, one log and one pid file per process, and `env.sh` with PREFECT_API_URL for the shell. All servers
bind to 127.0.0.1. A port held by anything other than the process this stack started is an error naming the
port, never a silent reuse of someone else's server.

Exposing the server (`--bind 0.0.0.0`, so that workers on other machines reach it) requires basic auth: set
PREFECT_SERVER_API_AUTH_STRING=user:password in the environment of `up`; the server then refuses any API request
without it, and the stack hands it to the serving process as PREFECT_API_AUTH_STRING (Prefect's client setting,
which users and workers set too). It is read from the environment only, never from the command line (visible to
every user in `ps`) nor written to the state folder.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # where this machine's clients reach every server
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
S3_BUCKETS = ("pretrain-tiny",)


class StackError(RuntimeError):
    pass


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def http_ok(url: str, auth: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def read_pid(state: Path, name: str) -> int | None:
    path = state / f"{name}.pid"
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink()
        return None
    return pid


def start(state: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    log = open(state / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    (state / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def wait_for(check, what: str, state: Path, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if read_pid(state, name) is None:
            tail = (state / f"{name}.log").read_text(errors="replace")[-3000:]
            raise StackError(f"{name} exited while starting; end of {state / (name + '.log')}:\n{tail}")
        time.sleep(0.5)
    raise StackError(f"{what} not ready after {timeout:.0f}s; see {state / (name + '.log')}")


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def base_env(state: Path, port: int, bind: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(state / "prefect"),
        PREFECT_API_URL=api_url(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST=bind,
        PREFECT_SERVER_API_PORT=str(port),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    # The serving process looks for new flow runs every 2 s instead of Prefect's 10: on one machine `deployment run`
    # and Retry then start at once, for one cheap query every 2 s.
    env.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    if env.get(AUTH_ENV):
        env["PREFECT_API_AUTH_STRING"] = env[AUTH_ENV]  # the serving process is a client of the server
    return env


def check_exposure(bind: str, auth: str | None) -> None:
    if bind not in ("127.0.0.1", "localhost", "::1") and not auth:
        raise StackError(
            f"--bind {bind} exposes the Prefect server beyond this machine: set {AUTH_ENV}=user:password "
            "(basic auth) in the environment first"
        )
    if auth is not None and ":" not in auth:
        raise StackError(f"{AUTH_ENV} must look like user:password")


def ensure_process(state: Path, name: str, port: int | None, argv: list[str], env: dict, ready, what: str) -> str:
    pid = read_pid(state, name)
    if pid is not None:
        wait_for(ready, what, state, name)
        return f"{what}: running (pid {pid})"
    if port is not None and port_open(port):
        raise StackError(f"port {port} on {HOST} is in use by another program; stop it or choose another port")
    pid = start(state, name, argv, env)
    wait_for(ready, what, state, name)
    return f"{what}: started (pid {pid})"


DEPLOYMENTS = ("pretrain/full", "pretrain/data-refresh", "evaluate/checkpoint")  # what flows/serve.py registers


def deployment_registered(port: int, auth: str | None) -> bool:
    return all(http_ok(f"{api_url(port)}/deployments/name/{name}", auth) for name in DEPLOYMENTS)


def create_buckets(s3_port: int) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=f"http://{HOST}:{s3_port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in S3_BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def up(state: Path, port: int, s3_port: int | None, bind: str = HOST) -> list[str]:
    auth = os.environ.get(AUTH_ENV) or None
    check_exposure(bind, auth)
    state.mkdir(parents=True, exist_ok=True)
    env = base_env(state, port, bind)
    report = []
    if s3_port:
        report.append(
            ensure_process(
                state,
                "s3",
                s3_port,
                [str(BIN / "moto_server"), "-H", HOST, "-p", str(s3_port)],
                env,
                lambda: port_open(s3_port),
                f"S3 endpoint http://{HOST}:{s3_port}",
            )
        )
        create_buckets(s3_port)
    report.append(
        ensure_process(
            state,
            "server",
            port,
            [str(BIN / "prefect"), "server", "start", "--host", bind, "--port", str(port)],
            env,
            lambda: http_ok(f"{api_url(port)}/health"),
            f"Prefect server http://{bind}:{port}" + (" (basic auth)" if auth else ""),
        )
    )
    report.append(
        ensure_process(
            state,
            "serve",
            None,
            [sys.executable, "-m", "flows.serve"],
            env,
            lambda: deployment_registered(port, auth),
            f"deployments ({', '.join(DEPLOYMENTS)})",
        )
    )
    shell = f"export PREFECT_API_URL={api_url(port)}\n"
    if auth:  # (the secret itself stays out of the state folder)
        shell += "# the server wants basic auth: export PREFECT_API_AUTH_STRING=user:password as well\n"
    (state / "env.sh").write_text(shell)
    (state / "stack.json").write_text(json.dumps({"port": port, "s3_port": s3_port}))
    return report


def down(state: Path) -> list[str]:
    report = []
    for name in ("serve", "server", "s3"):
        pid = read_pid(state, name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        for _ in range(40):
            if read_pid(state, name) is None:
                break
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.25)
        else:
            os.killpg(pid, signal.SIGKILL)
        (state / f"{name}.pid").unlink(missing_ok=True)
        report.append(f"{name}: stopped (pid {pid})")
    return report or ["nothing running"]


def status(state: Path) -> list[str]:
    lines = []
    for name in ("server", "serve", "s3"):
        pid = read_pid(state, name)
        lines.append(f"{name}: {'running (pid %d)' % pid if pid else 'stopped'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state", type=Path, default=REPO / ".stack", help="folder for the stack's state")
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port")
    parser.add_argument("--bind", default=HOST, help=f"address the Prefect server listens on (needs {AUTH_ENV} "
                        "when not loopback)")  # fmt: skip
    parser.add_argument("--s3", action="store_true", help="also start a local S3 endpoint (moto)")
    parser.add_argument("--s3-port", type=int, default=9000)
    args = parser.parse_args(argv)
    state = args.state.resolve()
    try:
        if args.command == "up":
            lines = up(state, args.port, args.s3_port if args.s3 else None, args.bind)
            lines.append(f"Prefect UI: http://{HOST}:{args.port}  (export PREFECT_API_URL={api_url(args.port)})")
        elif args.command == "down":
            lines = down(state)
        else:
            lines = status(state)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
