"""End to end through a real Prefect server: `prefect deployment run pretrain/full --watch` on the sample corpus,
locally and with shards and checkpoints on a local S3 endpoint, started by infra/stack.py as a user would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from stages import dedup, filter, ingest, launch, tokenize, tokenizer
from stages.config import load_config
from stages.storage import MANIFEST
from tests.conftest import BIN, REPO, free_port, out_dir

STAGES = ["ingest", "filter", "dedup", "tokenizer", "tokenize", "train", "evaluate"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    port, s3_port = free_port(), free_port()
    cmd = [sys.executable, str(REPO / "infra" / "stack.py"), "--state", str(state), "--port", str(port)]
    up = subprocess.run([*cmd[:2], "up", *cmd[2:], "--s3", "--s3-port", str(s3_port)], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr + up.stdout
    # idempotent: a second `up` reuses what runs
    again = subprocess.run(
        [*cmd[:2], "up", *cmd[2:], "--s3", "--s3-port", str(s3_port)], capture_output=True, text=True
    )
    assert again.returncode == 0 and "running" in again.stdout, again.stderr
    yield {"api": f"http://127.0.0.1:{port}/api", "s3": f"http://127.0.0.1:{s3_port}", "state": state}
    subprocess.run([*cmd[:2], "down", *cmd[2:]], capture_output=True, text=True)


def api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def run_deployment(stack, params: dict, deployment: str = "pretrain/full") -> str:
    env = {**os.environ, "PREFECT_API_URL": stack["api"]}
    proc = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", deployment, "--watch", "--params", json.dumps(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}\n{server_logs(stack)}"
    return re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)


def server_logs(stack) -> str:
    serve_log = stack["state"] / "serve.log"
    return serve_log.read_text(errors="replace")[-8000:] if serve_log.exists() else ""


def task_states(stack, flow_run_id: str) -> dict[str, str]:
    runs = api(stack["api"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {run["name"].rsplit("-", 1)[0]: run["state"]["type"] for run in runs}


def artifacts(stack, flow_run_id: str) -> dict[str, dict]:
    found = api(stack["api"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}


def assert_run_completed(stack, flow_run_id: str) -> None:
    states = task_states(stack, flow_run_id)
    assert {name: states.get(name) for name in STAGES} == {name: "COMPLETED" for name in STAGES}
    found = artifacts(stack, flow_run_id)
    training = {"train-progress", "train-loss-curve", "train-metrics"}
    assert {f"{s}-stats" for s in STAGES} | {"data-funnel", "plan"} | training <= set(found)
    assert found["train-progress"]["type"] == "progress" and found["train-progress"]["data"] == 100.0
    assert found["train-loss-curve"]["type"] == "image"
    assert found["train-loss-curve"]["data"].startswith("data:image/png;base64,iVBORw0KGgo")  # the PNG signature
    rows = json.loads(found["train-metrics"]["data"])
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 60 and rows[-1]["loss"] < rows[0]["loss"]


def test_pretrain_full_local(stack, tmp_path):
    root = tmp_path / "outputs"
    flow_run = run_deployment(stack, {"overrides": {"storage.root": str(root)}})
    assert_run_completed(stack, flow_run)
    cfg = load_config("tiny", {"storage.root": str(root)})
    for stage in (ingest, filter, dedup, tokenizer, tokenize):
        manifest = json.loads((out_dir(stage, cfg) / MANIFEST).read_text())
        assert manifest["files"] and all(f["bytes"] > 0 for f in manifest["files"].values()), stage
    run = Path(launch.run_uri(cfg))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert (run / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    eval_rows = json.loads(artifacts(stack, flow_run)["eval-metrics"]["data"])
    assert {(r["task"], r["metric"]) for r in eval_rows} >= {("heldout_ppl", "bits_per_byte"), ("heldout_mc", "acc")}

    # Any checkpoint, evaluated from the `evaluate/checkpoint` deployment with a suite of its own.
    first = run / "step-000030"
    params = {"checkpoint": str(first), "suite": ["heldout_ppl"], "overrides": {"storage.root": str(root)}}
    eval_run = run_deployment(stack, params, deployment="evaluate/checkpoint")
    assert task_states(stack, eval_run) == {"evaluate": "COMPLETED"}
    assert (first / "eval" / "results.json").is_file()
    rows = json.loads(artifacts(stack, eval_run)["eval-metrics"]["data"])
    assert {r["metric"] for r in rows} >= {"bits_per_byte"} and all(r["task"] == "heldout_ppl" for r in rows)
    results = run / "step-000060" / "eval" / "results.json"
    bpb = json.loads(results.read_text())["results"]["heldout_ppl"]["bits_per_byte,none"]
    assert 0 < bpb < 8

    # A dry run with a forced stage: the plan only, everything else up to date, no stage task runs.
    dry = run_deployment(stack, {"overrides": {"storage.root": str(root)}, "force": ["evaluate"], "dry_run": True})
    assert task_states(stack, dry) == {}
    table = artifacts(stack, dry)["plan"]["data"]
    for stage in STAGES[:-1]:
        assert f"| {stage} | skip |" in table, table
    assert "| evaluate | run | forced |" in table


def test_pretrain_full_s3(stack):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    # the storage is what this run adds to the local one: the sample's JSONL part is enough input for it
    overrides = {
        "storage.root": f"s3://pretrain-tiny/{prefix}",
        "storage.endpoint_url": stack["s3"],
        "ingest.inputs": [str(REPO / "data" / "sample" / "docs.jsonl.gz")],
    }
    flow_run = run_deployment(stack, {"preset": "tiny-s3", "overrides": overrides})
    assert_run_completed(stack, flow_run)
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=stack["s3"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="pretrain-tiny", Prefix=prefix)["Contents"]]
    assert any(re.match(rf"{prefix}/tokens/\w+/train/index.json", k) for k in keys)
    assert any(re.match(rf"{prefix}/train/\w+/step-\d+/meta.json", k) for k in keys)
    assert any(k.endswith("/eval/results.json") for k in keys)
