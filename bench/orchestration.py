"""What Prefect costs on top of the stages, and how fast a failed run gets going again after a retry.

    .venv/bin/python bench/orchestration.py [--write]

On a stack of its own (infra/stack.py: a Prefect server with SQLite and the serving process, on free ports, in a
temporary state folder), against a fresh output root:
1. overhead: `prefect deployment run pretrain/full` on the sample; the flow run's wall time (the server's start
   and end times) minus the sum of the stages' own seconds (each stage's stats: the work, torchrun's start-up
   included, and the train task's loss curve and prompt samples). What is left is the orchestration: task runs,
   artifacts, logs sent to the server, the config and plan. Target: at most 5% of the flow's wall time.
2. retry latency: a second run into another root loses its training processes (SIGKILL) after the step-30
   checkpoint and fails; `prefect flow-run retry` is timed from the command to the moment the `train` task runs
   again (its new task run's start time), and to the flow's completion.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section
from stages.pipeline import PIPELINE

SECTION = "## Orchestration overhead and retry latency"
BIN = Path(sys.executable).parent
STAGES = PIPELINE.names


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def start_run(env: dict, root: Path) -> subprocess.Popen:
    params = json.dumps({"overrides": {"storage.root": str(root)}})
    cmd = [str(BIN / "prefect"), "deployment", "run", "pretrain/full", "--watch", "--params", params]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_id(output: str) -> str:
    return re.search(r"UUID:\s*([0-9a-f-]{36})", output).group(1)


def stage_seconds(base: str, flow_run: str) -> dict[str, float]:
    found = api(base, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run]}}})
    found.sort(key=lambda a: a["created"])
    tables = {a["key"]: json.loads(a["data"]) for a in found if a["key"] and a["key"].endswith("-stats")}
    # a stage's own seconds, plus what its task computes after it (train: the loss curve, the prompt samples)
    work = ("seconds", "report_seconds", "samples_seconds")
    return {stage: sum(float(r["value"]) for r in tables[f"{stage}-stats"] if r["metric"] in work) for stage in STAGES}


def overhead(base: str, env: dict, root: Path) -> dict:
    proc = start_run(env, root)
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out[-3000:]
    flow_run = api(base, f"/flow_runs/{run_id(out)}")
    wall = seconds(flow_run["end_time"]) - seconds(flow_run["start_time"])
    stages = stage_seconds(base, flow_run["id"])
    work = sum(stages.values())
    return {"wall": wall, "stages": stages, "work": work, "overhead": wall - work}


def retry_latency(base: str, env: dict, root: Path) -> dict:
    import psutil

    proc = start_run(env, root)
    while not list(root.glob("train/*/step-000030/meta.json")):
        time.sleep(0.1)
    for p in psutil.process_iter(["cmdline"]):
        if "stages.train.worker" in (p.info["cmdline"] or []):
            p.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    flow_run = run_id(out)
    assert api(base, f"/flow_runs/{flow_run}")["state"]["type"] == "FAILED"
    started = time.time()
    subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run], env=env, check=True, capture_output=True)
    while api(base, f"/flow_runs/{flow_run}")["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED"):
        time.sleep(0.2)
    done = time.time()
    runs = api(base, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}})
    train_starts = sorted(seconds(r["start_time"]) for r in runs if r["name"].startswith("train") and r["start_time"])
    state = api(base, f"/flow_runs/{flow_run}")["state"]["type"]
    return {"to_train": train_starts[-1] - started, "to_completed": done - started, "state": state}


def table(result: dict, command: str) -> str:
    o, r = result["overhead"], result["retry"]
    stages = ", ".join(f"{s} {o['stages'][s]:.1f}" for s in STAGES)
    share = 100 * o["overhead"] / o["wall"]
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            machine(),
            "",
            "| measure | value |",
            "|---|---:|",
            f"| flow wall time (server's start to end) | {o['wall']:.1f} s |",
            f"| sum of the stages' own seconds | {o['work']:.1f} s |",
            f"| orchestration overhead (target <= 5%) | {o['overhead']:.1f} s, {share:.1f}% |",
            f"| retry command to `train` running again | {r['to_train']:.1f} s |",
            f"| retry command to the flow run {r['state']} | {r['to_completed']:.1f} s |",
            "",
            f"Stage seconds: {stages}. The retried run skipped the five data stages (manifests) and resumed "
            "training from its step-30 checkpoint; the latency to `train` is the worker picking up the scheduled "
            "run, starting a flow-run process, loading the config and the five skips.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        state = Path(tmp) / "stack"
        stack = [sys.executable, str(REPO / "infra" / "stack.py")]
        where = ["--state", str(state), "--port", str(port)]
        subprocess.run([*stack, "up", *where], check=True, capture_output=True)
        base = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_API_URL": base}
        try:
            result = {
                "overhead": overhead(base, env, Path(tmp) / "outputs"),
                "retry": retry_latency(base, env, Path(tmp) / "retried"),
            }
        finally:
            subprocess.run([*stack, "down", *where], capture_output=True)
    text = table(result, "python bench/orchestration.py --write")
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
