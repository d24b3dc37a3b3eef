"""End to end through a real Prefect server: `prefect deployment run pretrain/full --watch` on the sample corpus,
locally and with shards and checkpoints on a local S3 endpoint, started by infra/stack.py as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from stages.core import failpoints
from stages.core.config import load_config
from stages.core.storage import MANIFEST
from stages.pipeline import PIPELINE
from stages.train.stage import child_config_json
from tests.conftest import BIN, REPO, docs_in, free_port, out_dir

DATA = [stage.name for stage in PIPELINE.dataset_part]  # the stages training depends on
# The S3 credentials of the stack's flow runs (moto takes any): distinctive, so a scan can tell they leaked nowhere.
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
COMPLETED: dict[str, str] = {}  # flow runs later tests look at, by the test that made them
SECRET_ENV = {"AWS_ACCESS_KEY_ID": "AKIAE2ESCANKEY000042", "AWS_SECRET_ACCESS_KEY": "e2e/Never-In-Any-Output+7f3a9c"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    port, s3_port = free_port(), free_port()
    cmd = [sys.executable, str(REPO / "infra" / "stack.py"), "--state", str(state), "--port", str(port)]
    # the flow runs' S3 credentials come from the serving process's environment, and so do the failpoints
    env = {**os.environ, **SECRET_ENV, failpoints.ENV: str(state / "failpoints")}
    (state / "failpoints").mkdir()
    up = subprocess.run(
        [*cmd[:2], "up", *cmd[2:], "--s3", "--s3-port", str(s3_port)], capture_output=True, text=True, env=env
    )
    assert up.returncode == 0, up.stderr + up.stdout
    # idempotent: a second `up` reuses what runs
    again = subprocess.run(
        [*cmd[:2], "up", *cmd[2:], "--s3", "--s3-port", str(s3_port)], capture_output=True, text=True, env=env
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
    # Reads only (filters are POSTs that change nothing), so a slow answer is asked again: on two busy cores,
    # training beside the server has kept SQLite-backed Prefect from answering for over 30 s.
    for attempt in range(3):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except TimeoutError:
            if attempt == 2:
                raise


def run_deployment(stack, params: dict, deployment: str = "pretrain/full") -> str:
    """A flow run of `deployment`, waited for until it ends; it must complete. (This polls the API rather than use
    `prefect deployment run --watch`, which follows the run over the events websocket: under load the CLI has
    subscribed after a short run's last event and then waited forever.)"""
    flow_run = start_deployment(stack, params, deployment)
    state = wait_for_end(stack, flow_run)
    assert state == "COMPLETED", f"{deployment} {params}: {state}\n{server_logs(stack)}"
    return flow_run


def start_deployment(stack, params: dict, deployment: str = "pretrain/full") -> str:
    """Schedule a flow run of `deployment` now and return its id without waiting for it."""
    env = {**os.environ, "PREFECT_API_URL": stack["api"]}
    cmd = [str(BIN / "prefect"), "deployment", "run", deployment, "--params", json.dumps(params)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout).group(1)


def server_logs(stack) -> str:
    serve_log = stack["state"] / "serve.log"
    return serve_log.read_text(errors="replace")[-8000:] if serve_log.exists() else ""


def task_states(stack, flow_run_id: str) -> dict[str, str]:
    """Each task's state; after a retry, that of its latest run."""
    runs = api(stack["api"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    runs.sort(key=lambda run: run["expected_start_time"] or "")
    return {run["name"].rsplit("-", 1)[0]: run["state"]["type"] for run in runs}


def task_edges(stack, flow_run_id: str) -> dict[str, set[str]]:
    """For each task, the tasks it waited for: the edges the UI's graph draws."""
    runs = api(stack["api"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    names = {run["id"]: run["name"].rsplit("-", 1)[0] for run in runs}
    return {names[run["id"]]: {names[i["id"]] for i in run["task_inputs"].get("wait_for", [])} for run in runs}


def flow_run_logs(stack, flow_run_id: str, seconds: float = 60) -> list[str]:
    """Every log line of a flow run that has ended. Its state is final before the run's last log batch reaches the
    server (Prefect ships logs every 2 s), so this waits for the flow's own closing line first."""
    deadline = time.monotonic() + seconds
    while True:
        entries, page = [], None
        while page is None or len(page) == 200:
            body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "offset": len(entries)}
            page = api(stack["api"], "/logs/filter", body)
            entries += page
        closing = [e for e in entries if e["task_run_id"] is None and e["message"].startswith("Finished in state")]
        if closing or time.monotonic() > deadline:
            return [entry["message"] for entry in entries]
        time.sleep(0.5)


def wait_for_end(stack, flow_run_id: str, seconds: float = 900) -> str:
    """The flow run's final state type, once it has one."""
    deadline = time.monotonic() + seconds
    while (state := api(stack["api"], f"/flow_runs/{flow_run_id}")["state"]["type"]) not in FINAL:
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {state}"
        time.sleep(0.5)
    return state


def training_processes(stack) -> list[psutil.Process]:
    """torchrun and its ranks started by this stack's flow runs (not by tests running beside this file)."""
    serve = psutil.Process(int((stack["state"] / "serve.pid").read_text()))
    found = []
    for process in serve.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "stages.train.worker" in process.cmdline():
                found.append(process)
    return found


def kill_training_once_checkpointed(stack, root: Path, step: int, seconds: float = 600) -> None:
    """SIGKILL every training rank (a lost machine) once the run has its checkpoint at `step`."""
    deadline = time.monotonic() + seconds
    while not list(root.glob(f"train/*/step-{step:06d}/meta.json")):
        assert time.monotonic() < deadline, f"no checkpoint at step {step} under {root}"
        time.sleep(0.2)
    ranks = training_processes(stack)  # torchrun and its ranks: the whole machine is lost
    assert ranks, "no training rank to kill"
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)


def artifacts(stack, flow_run_id: str) -> dict[str, dict]:
    found = api(stack["api"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    found.sort(key=lambda a: a["created"])  # after a retry: the latest of each key
    return {a["key"]: a for a in found if a["key"]}


def assert_run_completed(stack, flow_run_id: str) -> None:
    states = task_states(stack, flow_run_id)
    assert {name: states.get(name) for name in PIPELINE.names} == {name: "COMPLETED" for name in PIPELINE.names}
    found = artifacts(stack, flow_run_id)
    training = {"train-progress", "train-loss-curve", "train-metrics"}
    training |= {"train-samples"}
    assert {f"{s}-stats" for s in PIPELINE.names} | {"data-funnel", "plan", "compute-plan"} | training <= set(found)
    assert "| steps | 60 of 2,048 tokens |" in found["compute-plan"]["data"]
    assert "- greedy: " in found["train-samples"]["data"]
    assert found["train-progress"]["type"] == "progress" and found["train-progress"]["data"] == 100.0
    assert found["train-loss-curve"]["type"] == "image"
    assert found["train-loss-curve"]["data"].startswith("data:image/png;base64,iVBORw0KGgo")  # the PNG signature
    rows = json.loads(found["train-metrics"]["data"])
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 60 and rows[-1]["loss"] < rows[0]["loss"]


def test_pretrain_full_local(stack, tmp_path):
    root = tmp_path / "outputs"
    # The run loses its training processes after the step-30 checkpoint and fails in its train stage; retried
    # as the UI's Retry button does (`prefect flow-run retry`), the data stages skip and training resumes at 30.
    env = {**os.environ, "PREFECT_API_URL": stack["api"]}
    params = {"overrides": {"storage.root": str(root)}}
    cmd = [str(BIN / "prefect"), "deployment", "run", "pretrain/full", "--watch", "--params", json.dumps(params)]
    watching = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_training_once_checkpointed(stack, root, 30)
    out, _ = watching.communicate(timeout=300)
    flow_run = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    assert api(stack["api"], f"/flow_runs/{flow_run}")["state"]["type"] == "FAILED", out[-3000:]
    assert task_states(stack, flow_run)["train"] == "FAILED"
    retried = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert wait_for_end(stack, flow_run) == "COMPLETED", server_logs(stack)
    assert_run_completed(stack, flow_run)
    logs = flow_run_logs(stack, flow_run)
    for stage in DATA:
        assert sum(f"{stage}: up to date at" in line for line in logs) == 1, stage  # skipped by the retry only
    # the task graph has the registry's edges: each task after those whose outputs it reads
    assert task_edges(stack, flow_run) == {s.name: set(s.inputs.values()) for s in PIPELINE.stages}
    assert any("resumed from" in line and "step-000030" in line for line in logs)
    COMPLETED["local_root"] = str(root)
    cfg = load_config("tiny", {"storage.root": str(root)})
    for stage in PIPELINE.dataset_part:
        manifest = json.loads((out_dir(stage.name, cfg) / MANIFEST).read_text())
        assert manifest["files"] and all(f["bytes"] > 0 for f in manifest["files"].values()), stage
    run = Path(PIPELINE.output("train", cfg).uri)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.0
    assert (run / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    eval_rows = json.loads(artifacts(stack, flow_run)["eval-metrics"]["data"])
    assert {(r["task"], r["metric"]) for r in eval_rows} >= {("heldout_ppl", "bits_per_byte"), ("heldout_mc", "acc")}
    # the demo's bounded slice of the standard benchmarks, with chance and the published figures beside it
    scale = {(r["task"], r["metric"]): r for r in eval_rows}
    assert scale[("lambada_openai", "perplexity")]["pythia_160m"] == 38.0649 and scale[("piqa", "acc")]["chance"] == 0.5
    stats = json.loads((run / "step-000060" / "eval" / "stats.json").read_text())
    assert stats["benchmarks_limit"] == 20 and len(stats["benchmarks"]) == 9

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

    # Lineage of an evaluation: down through the checkpoint and every data stage to the raw files.
    shown = subprocess.run(
        [sys.executable, "-m", "stages.tools.lineage", str(results), "--json"], capture_output=True, text=True, cwd=REPO
    )
    assert shown.returncode == 0, shown.stderr
    tree = json.loads(shown.stdout)
    kinds, node = [], tree
    while node["inputs"]:
        kinds.append(node["kind"])
        node = node["inputs"][0]  # the first input: the data path (tokenize's second is the tokenizer)
    chain = [PIPELINE.training_data]  # (each stage's documents come from its `docs` input)
    while "docs" in PIPELINE[chain[-1]].inputs:
        chain.append(PIPELINE[chain[-1]].inputs["docs"])
    assert kinds + [node["kind"]] == ["evaluate", "checkpoint", *chain]
    checkpoint = tree["inputs"][0]
    assert checkpoint["step"] == 60 and checkpoint["run_version"] == run.name and checkpoint["git_commit"]
    assert checkpoint["tokenizer_sha256"] == checkpoint["inputs"][0]["tokenizer_sha256"]
    assert [n["kind"] for n in checkpoint["inputs"][0]["inputs"]] == ["dedup", "tokenizer"]
    assert any(raw.endswith("docs.jsonl.gz") for raw in node["raw_inputs"])

    # A dry run with a forced stage: the plan only, everything else up to date, no stage task runs.
    dry = run_deployment(stack, {"overrides": {"storage.root": str(root)}, "force": ["evaluate"], "dry_run": True})
    assert task_states(stack, dry) == {}
    table = artifacts(stack, dry)["plan"]["data"]
    for stage in PIPELINE.names[:-1]:
        assert f"| {stage} | skip |" in table, table
    assert "| evaluate | run | forced |" in table


def test_continued_pretraining_from_a_hugging_face_model(stack, tmp_path):
    """The continue-hf preset: models/base-llama (a LlamaForCausalLM directory transformers wrote) continued on the
    sample. The data stages of the local run are reused; the tokenizer stage loads the model's tokenizer; the
    first step's loss is transformers' loss of that model on the first batch; the evaluation's first rows are the
    base model's scores; lineage names the directory and its files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.tools import lineage
    from stages.train import loader
    from stages.train.stage import resolved

    base = REPO / "models" / "base-llama"
    assert (base / "config.json").is_file(), "models/base-llama is built by `make install` (infra/build_base_model.py)"
    root = COMPLETED.get("local_root", str(tmp_path / "outputs"))  # (alone, the data stages run here first)
    overrides = {"storage.root": root, "train.nproc_per_node": 1, "train.max_steps": 10, "train.checkpoint_every": 10,
                 "train.val_every": 10, "evaluate.suite_limit": 4}  # fmt: skip
    flow_run = run_deployment(stack, {"preset": "continue-hf", "overrides": overrides})
    assert_run_completed_stages(stack, flow_run)
    logs = flow_run_logs(stack, flow_run)
    if "local_root" in COMPLETED:
        assert all(sum(f"{stage}: up to date at" in line for line in logs) == 1 for stage in DATA[:3]), logs
    cfg = load_config("continue-hf", overrides)
    assert cfg.tokenizer.path == str(base) and cfg.tokenizer.eos_token == "</s>"

    # the tokenizer stage's tokenizer is the model's: the same ids as transformers' own tokenizer of the directory
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(out_dir("tokenizer", cfg) / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(base, local_files_only=True)
    text = "Continued pretraining starts from a published model and trains on the user's own text."
    assert ours.encode(text).ids == theirs(text, add_special_tokens=False)["input_ids"]

    # step 1's loss (before its update) is transformers' loss of the base model on the run's first batch
    run = Path(PIPELINE.output("train", cfg).uri)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    cfg = resolved(cfg, PIPELINE.upstream("train", cfg))
    batch = next(iter(loader.make_loader(cfg, "train", cfg.train.micro_batch_size, shuffle=True)))
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(batch[:, :-1].long()).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].long().flatten()).item()
    assert first["step"] == 1 and abs(first["loss"] - expected) < 1e-4, (first["loss"], expected)

    # the evaluation table starts with the base model's rows; the checkpoint's rows carry their change from them
    rows = json.loads(artifacts(stack, flow_run)["eval-metrics"]["data"])
    assert rows[0]["model"] == "base model" and rows[-1]["model"] == "step 10"
    base_rows = {(r["task"], r["metric"]): r["value"] for r in rows if r["model"] == "base model"}
    for r in (r for r in rows if r["model"] == "step 10" and r["value"] is not None):
        assert r["change_from_base"] == pytest.approx(r["value"] - base_rows[(r["task"], r["metric"])])
    bpb = {r["model"]: r["value"] for r in rows if (r["task"], r["metric"]) == ("heldout_ppl", "bits_per_byte")}
    assert bpb["step 10"] < bpb["base model"]  # (a random base model: ten steps on the sample already help)
    hellaswag = next(r for r in rows if (r["task"], r["metric"]) == ("hellaswag", "acc_norm"))
    assert hellaswag["gpt2_124m"] == 0.3114 and hellaswag["chance"] == 0.25

    # lineage names the base model directory and the fingerprints of its files
    tree = lineage.lineage(str(run / "step-000010"))
    assert tree["base_model"]["uri"] == str(base)
    assert {"config.json", "model.safetensors"} <= set(tree["base_model"]["files"])


def test_ablation_of_two_variants_with_two_seeds(stack, tmp_path):
    """`pretrain/ablate` through the server: two data variants (the tiny preset, and without the Gopher quality
    rule), two seeds each, one held-out set none trained on; the table, plot and verdict as artifacts, the summary
    with every run's lineage beside the runs."""
    root = COMPLETED.get("local_root", str(tmp_path / "outputs"))  # (its ingest output is shared, not rebuilt)
    overrides = {"storage.root": root, "train.nproc_per_node": 1, "train.max_steps": 8, "train.checkpoint_every": 8,
                 "train.val_every": 8, "evaluate.suite": None, "evaluate.every_steps": None}  # fmt: skip
    variants = {"baseline": {}, "no-gopher-quality": {"filter.gopher_quality.enabled": False}}
    params = {"variants": variants, "seeds": [1, 2], "overrides": overrides}
    flow_run = run_deployment(stack, params, deployment="pretrain/ablate")
    assert api(stack["api"], f"/flow_runs/{flow_run}")["state"]["type"] == "COMPLETED", server_logs(stack)
    found = artifacts(stack, flow_run)
    rows = json.loads(found["ablation"]["data"])
    assert [r["variant"] for r in rows] == ["baseline", "no-gopher-quality"]
    uri = found["ablation"]["description"].split(": held-out ")[0]  # (the ablation's folder opens the description)
    summary = json.loads((Path(uri) / "results.json").read_text())
    base, ablated = (summary["variants"][name] for name in variants)
    assert set(base["per_seed"]) == {"1", "2"} and base["per_seed"]["1"] != base["per_seed"]["2"]  # seeds differ
    assert ablated["docs_kept"] > base["docs_kept"]  # the Gopher rule removes documents of the sample
    assert len(base["lineage"]) == 2 and base["lineage"][0]["kind"] == "checkpoint"
    assert (Path(uri) / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert found["ablation-plot"]["data"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert ("seed spread" in summary["verdict"]) and summary["verdict"] in found["ablation-verdict"]["data"]
    # one held-out set, taken before any variant tokenized, and no variant trained on it
    heldout = [json.loads(line) for line in Path(summary["heldout"]).read_text().splitlines()]
    for name in variants:
        run_checkpoint = summary["variants"][name]["checkpoints"][0]
        meta = json.loads((Path(run_checkpoint) / "meta.json").read_text())
        tokens = json.loads((Path(meta["data_uri"]) / MANIFEST).read_text())
        assert tokens["counts"]["removed"]["decontaminated"] >= len(heldout), name
        assert meta["tokenizer_sha256"] == summary["variants"]["baseline"]["lineage"][0]["tokenizer_sha256"], name
    # the shared ingest is built once: the second variant finds it up to date
    logs = flow_run_logs(stack, flow_run)
    assert sum("ingest: up to date at" in line for line in logs) >= 1
    states = task_states(stack, flow_run)
    assert all(state == "COMPLETED" for state in states.values()) and "train" in states
    COMPLETED["ablation"] = flow_run


def assert_run_completed_stages(stack, flow_run_id: str) -> None:
    states = task_states(stack, flow_run_id)
    assert {name: states.get(name) for name in PIPELINE.names} == {name: "COMPLETED" for name in PIPELINE.names}


def flow_process(flow_run_id: str) -> psutil.Process:
    """The process running a flow run: the serving process's child with the run's id in its environment (the
    stage's worker processes inherit that environment too; they are its children)."""

    def runs_it(process: psutil.Process | None) -> bool:
        try:
            return process is not None and process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id
        except psutil.Error:
            return False

    top = [p for p in psutil.process_iter() if runs_it(p) and not runs_it(p.parent())]
    assert len(top) == 1, top
    return top[0]


def test_flow_process_killed_in_every_stage_then_retried(stack, tmp_path):
    """SIGKILL of the process running the flow (a lost node) in each of the seven stages, one after the other: each
    time the run is Crashed within seconds, everything it started stops with it, and `prefect flow-run retry`
    resumes: a stage with work units from its finished units, training from its last checkpoint, the others by
    building again. The data stages' outputs equal those of the uninterrupted run of the same data config
    (test_pretrain_full_local), file for file; the training run's steps are each logged once.

    Where the kill lands: in training, once its step-20 checkpoint is saved; elsewhere at a failpoint
    (stages/core/failpoints.py) that holds the stage until the kill: the data stages with work units once their first
    unit is done, the others with all their files written and no manifest yet. On the sample most stages take well
    under a second, which a kill timed from outside would not hit every time."""
    reference = COMPLETED.get("local_root")
    assert reference, "needs the outputs of test_pretrain_full_local"
    root = tmp_path / "outputs"
    # (a shorter training run than the reference's: the data stages do not read the train section)
    overrides = {"storage.root": str(root), "train.max_steps": 40, "train.checkpoint_every": 20}
    console = stack["state"] / "serve.log"  # what the flow runs print, through the serving process
    console_start = console.stat().st_size
    flow_run = start_deployment(stack, {"overrides": overrides})
    env = {**os.environ, "PREFECT_API_URL": stack["api"]}
    holds = stack["state"] / "failpoints"
    # a stage with work units once its first unit is done, the others with their files written, uncommitted
    points = {s.name: f"{s.name}.{'unit-done' if s.units else 'commit'}" for s in PIPELINE.stages}
    del points["train"]  # (killed once it has checkpointed)
    for name in points.values():
        (holds / name).touch()
    for stage in PIPELINE.names:
        if stage == "train":
            reached = lambda: list(root.glob("train/*/step-000020/meta.json"))  # noqa: E731
        else:
            reached = (holds / f"{points[stage]}.reached").exists
        deadline = time.monotonic() + 300
        while not reached():
            assert time.monotonic() < deadline, f"{stage} never got that far"
            time.sleep(0.05)
        flow_process(flow_run).send_signal(signal.SIGKILL)
        if stage != "train":  # the retry goes past this point
            (holds / points[stage]).unlink()
            (holds / f"{points[stage]}.reached").unlink()
        assert wait_for_end(stack, flow_run, seconds=60) == "CRASHED"
        assert task_states(stack, flow_run)[stage] != "COMPLETED"
        deadline = time.monotonic() + 60
        while stage == "train" and training_processes(stack):
            assert time.monotonic() < deadline, "training outlived the flow run's process"
            time.sleep(0.2)
        retried = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run], env=env,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert retried.returncode == 0, retried.stdout + retried.stderr
    assert wait_for_end(stack, flow_run) == "COMPLETED", server_logs(stack)
    assert set(task_states(stack, flow_run).values()) == {"COMPLETED"}
    # The resumes, from the console: Prefect ships a run's logs to the server every 2 s, so a killed process's last
    # lines reach only its console, and here most kills come within a second or two of the previous retry's resume.
    printed = console.read_bytes()[console_start:].decode(errors="replace")
    for stage in DATA:
        assert f"{stage}: resuming an interrupted build of {root}" in printed, stage
    for stage in [s.name for s in PIPELINE.stages if s.units]:
        assert re.search(rf"{stage}: [1-9]\d* of \d+ units already done, resuming", printed), stage
    logs = flow_run_logs(stack, flow_run)
    assert any("resumed from" in line and "step-000020" in line for line in logs)
    # each retry takes back the locks its killed attempt held instead of waiting for those leases to run out
    assert any("train: released the lock an earlier, killed attempt of this flow run held" in line for line in logs)
    # (a lease held by a killed attempt would cost 45-60 s; a busy server can make taking a free slot cost a few)
    waits = [int(m.group(1)) for line in logs if (m := re.match(r"\w+: waited (\d+) s", line))]
    assert not [w for w in waits if w >= 30], waits
    for stage in DATA:
        made, uninterrupted = (json.loads((out_dir(stage, load_config("tiny", {"storage.root": str(r)})) / MANIFEST)
                                          .read_text()) for r in (root, reference))  # fmt: skip
        assert made["files"] == uninterrupted["files"] and made["digest"] == uninterrupted["digest"], stage
    run = Path(PIPELINE.output("train", load_config("tiny", overrides)).uri)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))
    assert "evaluate: step 40 already evaluated" not in printed  # built again after the kill
    assert json.loads((run / "step-000040" / "eval" / MANIFEST).read_text())["files"]
    # (That a resumed run's losses and weights equal an uninterrupted run's, bit for bit, is shown where it is
    # cheaper: tests/test_train.py.)


def novel_documents(count: int, seed: int) -> list[str]:
    """English documents like no sample text (sentences drawn from a small grammar), which pass the filters."""
    adj = ("quiet bright narrow ancient gentle heavy golden hollow rapid silver distant humble curious steady brave "
           "wooden frozen dusty crowded open").split()  # fmt: skip
    noun = ("farmer river teacher market bridge village painter engine garden harbor student kitchen mountain window "
            "library sailor forest lantern meadow traveler").split()  # fmt: skip
    verb = "watched crossed repaired visited painted followed described carried noticed praised opened measured".split()
    place = "near behind beyond under beside across inside around".split()
    rng = random.Random(seed)

    def sentence() -> str:
        a, n, v = (lambda: rng.choice(adj)), (lambda: rng.choice(noun)), (lambda: rng.choice(verb))
        return (f"The {a()} {n()} {v()} the {n()} {rng.choice(place)} the {a()} {n()}, and then {v()} a {a()} {n()} "
                f"with the {n()}.")  # fmt: skip

    return [" ".join(sentence() for _ in range(14)) for _ in range(count)]


def test_data_refresh_adds_only_new_files_then_continues_pretraining(stack, tmp_path):
    """`pretrain/data-refresh`, scheduled from config: the first run records the full pipeline's output as
    version 1; after a new raw file lands, the next ingests only that file, drops its copies of documents already
    kept, tokenizes it with the same tokenizer as version 2, and continues pretraining from the last checkpoint."""
    root = COMPLETED.get("local_root")
    assert root, "needs the outputs of test_pretrain_full_local"
    deployment = api(stack["api"], "/deployments/name/pretrain/data-refresh")
    assert [(s["schedule"]["cron"], s["active"]) for s in deployment["schedules"]] == [("0 3 * * *", True)]

    first = run_deployment(stack, {"overrides": {"storage.root": root}}, deployment="pretrain/data-refresh")
    assert set(task_states(stack, first).values()) == {"COMPLETED"}
    logs = flow_run_logs(stack, first)
    for stage in DATA:
        assert any(f"{stage}: up to date at" in line for line in logs), stage  # pretrain/full built them
    cfg = load_config("tiny", {"storage.root": root})
    v1 = json.loads((Path(root) / "dataset" / "v00001.json").read_text())
    assert len(v1["parts"]) == 1 and sorted(v1["parts"][0]["raw_files"]) == sorted(cfg.ingest.inputs)
    assert v1["parts"][0]["tokens"] == PIPELINE.output("tokenize", cfg).uri

    # A new raw file: 40 new documents, two documents the dataset already has and one nearly.
    kept = [d.text for d in docs_in(out_dir("dedup", cfg))][:3]
    rows = novel_documents(40, seed=1) + kept[:2] + [kept[2].replace(".", ";", 1)]
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "2026-11-26.jsonl").write_text("".join(json.dumps({"id": f"new{i}", "text": t}) + "\n"
                                                    for i, t in enumerate(rows)))  # fmt: skip
    overrides = {
        "storage.root": root,
        "ingest.inputs": [*cfg.ingest.inputs, str(drops / "*.jsonl")],
        "refresh.continue_training": True,
        "refresh.continue_steps": 20,
    }
    second = run_deployment(stack, {"overrides": overrides}, deployment="pretrain/data-refresh")
    states = task_states(stack, second)
    assert states == {s: "COMPLETED" for s in PIPELINE.names}, states
    v2 = json.loads((Path(root) / "dataset" / "v00002.json").read_text())
    assert v2["parts"][0] == v1["parts"][0] and len(v2["parts"]) == 2
    new = v2["parts"][1]
    assert list(new["raw_files"]) == [str(drops / "2026-11-26.jsonl")]
    assert new["tokenizer_sha256"] == v1["tokenizer"]["sha256"] == v2["tokenizer"]["sha256"]
    stats = {a["key"]: a for a in artifacts(stack, second).values()}
    ingested = {r["metric"]: r["value"] for r in json.loads(stats["ingest-stats"]["data"])}
    assert ingested["records_in"] == "43"  # only the new file
    deduped = {r["metric"]: r["value"] for r in json.loads(stats["dedup-stats"]["data"])}
    assert deduped["seen_before.removed"] == "3" and deduped["seen_before.parts"] == "1"
    assert new["docs"] == 40 and v2["docs"] == v1["docs"] + 40
    assert "Version 2" in stats["dataset-version"]["data"]

    # Continued pretraining on the new part, from pretrain/full's last checkpoint.
    trained = json.loads((Path(root) / "dataset" / "v00002.trained.json").read_text())
    base_run = Path(PIPELINE.output("train", cfg).uri)
    assert trained["from"] == str(base_run / "step-000060") and trained["step"] == 20
    read = lambda run: [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(trained["run"])[0] < read(base_run)[0] - 1.0  # it starts from trained weights, not from scratch
    shown = subprocess.run([sys.executable, "-m", "stages.tools.lineage", trained["checkpoint"], "--json"],
                           capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    tokens = json.loads(shown.stdout)["inputs"][0]
    assert (tokens["kind"], tokens["uri"], tokens["dataset_version"]) == ("tokenize", new["tokens"], 2)
    part_dedup = tokens["inputs"][0]  # made from the new part's filter output, against the first part's dedup
    made_from = sorted((n["kind"], n["uri"]) for n in part_dedup["inputs"])
    assert made_from == [("dedup", v1["parts"][0]["dedup"]), ("filter", new["filter"])]

    # Nothing new since: no new version, no stage runs.
    third = run_deployment(stack, {"overrides": overrides}, deployment="pretrain/data-refresh")
    assert task_states(stack, third) == {}
    assert any("nothing new under ingest.inputs since version 2" in line for line in flow_run_logs(stack, third))
    assert not (Path(root) / "dataset" / "v00003.json").exists()


def test_pretrain_full_s3(stack):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    # the storage is what this run adds to the local one: the sample's JSONL part is enough input for it
    overrides = {
        "storage.root": f"s3://pretrain-tiny/{prefix}",
        "storage.endpoint_url": stack["s3"],
        # no keys in the config: the environment's (SECRET_ENV), as a deployment on AWS would get them
        "storage.access_key_id": None,
        "storage.secret_access_key": None,
        "ingest.inputs": [str(REPO / "data" / "sample" / "docs.jsonl.gz")],
    }
    # Two runs of one config at once (the deployment started twice): each output is built by one of them, the
    # other waits on the output's lock and then finds it up to date.
    both = [start_deployment(stack, {"preset": "tiny-s3", "overrides": overrides}) for _ in range(2)]
    assert [wait_for_end(stack, run) for run in both] == ["COMPLETED", "COMPLETED"], server_logs(stack)
    logs = {run: flow_run_logs(stack, run) for run in both}
    skipped = {
        stage: [run for run in both if any(f"{stage}: up to date at" in line for line in logs[run])]
        for stage in DATA
    }
    skipped["train"] = [run for run in both if any("training already complete" in line for line in logs[run])]
    skipped["evaluate"] = [run for run in both if any("already evaluated at" in line for line in logs[run])]
    assert {stage: len(runs) for stage, runs in skipped.items()} == {stage: 1 for stage in PIPELINE.names}, skipped
    assert any("waited" in line and "for another flow run building" in line for run in both for line in logs[run])
    for run in both:
        assert set(task_states(stack, run).values()) == {"COMPLETED"} and len(task_states(stack, run)) == 7
    flow_run = next(run for run in both if run not in skipped["train"])  # the run that trained
    assert_run_completed(stack, flow_run)
    COMPLETED["s3"] = flow_run
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

    # The credentials are in no log line, artifact, manifest, stats file, checkpoint meta or result.
    texts = []
    for run in both:
        texts += logs[run] + [json.dumps(a) for a in artifacts(stack, run).values()]
        texts.append(json.dumps(api(stack["api"], f"/flow_runs/{run}")))  # its parameters included
    texts += [
        client.get_object(Bucket="pretrain-tiny", Key=k)["Body"].read().decode("utf-8", "replace")
        for k in keys
        if k.endswith((".json", ".jsonl", ".md", ".txt"))
    ]
    texts += [log.read_text(errors="replace") for log in stack["state"].glob("*.log")]  # server, serve, moto
    assert len(texts) > 50
    for secret in SECRET_ENV.values():
        assert not [t for t in texts if secret in t], f"{secret} leaked"


def wait_for_text(page, pattern: str, seconds: float = 60) -> None:
    """Until the page's text matches (it renders in parts, later on a loaded machine), or fail showing it."""
    deadline = time.monotonic() + seconds
    while not re.search(pattern, text := page.inner_text("body")):
        assert time.monotonic() < deadline, f"{pattern!r} not shown:\n{text}"
        time.sleep(0.5)


def test_prefect_ui_shows_every_stage_and_artifact(stack):
    """The flow-run page in a real headless browser (Debian's chromium through Playwright), as a user sees it.
    Screenshots: test-output/ui/."""
    from playwright.sync_api import sync_playwright

    flow_run, ablation = COMPLETED.get("s3"), COMPLETED.get("ablation")
    assert flow_run, "needs the completed run of test_pretrain_full_s3"
    assert ablation, "needs the completed run of test_ablation_of_two_variants_with_two_seeds"
    shots = REPO / "test-output" / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    browser_path = shutil.which("chromium")
    assert browser_path, "chromium is not installed (`make test` installs Debian's package)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(stack["api"].removesuffix("/api") + f"/runs/flow-run/{flow_run}")
            page.get_by_text("Completed").first.wait_for(timeout=60_000)  # the run's state badge
            page.get_by_text("7 Task runs").first.wait_for(timeout=30_000)
            page.screenshot(path=shots / "flow-run.png", full_page=True)

            page.get_by_text("Task Runs", exact=True).first.click()
            page.get_by_text("(7 Completed)").wait_for(timeout=30_000)
            for stage in PIPELINE.names:  # (the counts render before the list under them, and each row on its own time)
                page.get_by_text(re.compile(rf"^{stage}-\w+$")).first.wait_for(timeout=60_000)
                wait_for_text(page, rf"\n{stage}-\w+\nCompleted\n")
            page.screenshot(path=shots / "task-runs.png", full_page=True)

            page.get_by_text("Artifacts", exact=True).first.click()
            expected = {f"{s}-stats" for s in PIPELINE.names} | {"plan", "data-funnel", "eval-metrics", "train-metrics"}
            expected |= {"filter-rule-gopher-quality", "filter-rule-language", "dedup-clusters"}  # (the browsers)
            for name in sorted(expected | {"train-loss-curve", "train-progress"}):
                # each card renders on its own time under load: wait for every one, never read the page once
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=shots / "artifacts.png", full_page=True)

            # a rule's browser opens as markdown: removed documents with the measured value against the threshold
            page.get_by_text("filter-rule-gopher-quality", exact=True).first.click()
            page.get_by_text("Filter: gopher_quality").first.wait_for(timeout=60_000)
            page.get_by_text(re.compile(r"kept when at least")).first.wait_for(timeout=30_000)
            page.screenshot(path=shots / "filter-rule.png", full_page=True)

            page.goto(stack["api"].removesuffix("/api") + f"/runs/flow-run/{ablation}")  # the ablation's artifacts
            page.get_by_text("Artifacts", exact=True).first.click()
            for name in ("ablation", "ablation-plot", "ablation-verdict"):
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=shots / "ablation.png", full_page=True)
        finally:
            browser.close()
    for name in ("flow-run", "task-runs", "artifacts", "filter-rule", "ablation"):
        assert (shots / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_s3_keys_from_an_aws_credentials_block(stack, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials

    from flows.credentials import resolve_credentials
    from stages.core import storage
    from stages.core.config import ConfigError
    from stages.tools.preflight import preflight

    # No AWS keys anywhere in this process's environment: only the block can authenticate the writes below.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    key_id, secret = "AKIABLOCKKEY00000077", "block/Secret-Only+In-The-Block"
    prefix = f"s3://pretrain-tiny/block-{uuid.uuid4().hex[:8]}"
    overrides = {
        "storage.root": prefix,
        "storage.endpoint_url": None,  # the block's, too
        "storage.access_key_id": None,
        "storage.secret_access_key": None,
        "storage.credentials_block": "e2e-s3-keys",
    }
    with temporary_settings({PREFECT_API_URL: stack["api"]}):
        AwsCredentials(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            aws_client_parameters={"endpoint_url": stack["s3"]},
        ).save("e2e-s3-keys", overwrite=True)
        cfg = load_config("tiny-s3", overrides)
        with pytest.raises(ConfigError, match="storage.credentials_block"):
            preflight(cfg)  # an unresolved block is never taken for "no keys"
        resolved = resolve_credentials(cfg)
        with pytest.raises(ConfigError, match="storage.credentials_block: no AwsCredentials block 'nope'"):
            resolve_credentials(load_config("tiny-s3", {**overrides, "storage.credentials_block": "nope"}))
    s = resolved.storage
    assert (s.endpoint_url, s.region, s.access_key_id.get_secret_value()) == (stack["s3"], "us-east-1", key_id)
    assert secret not in repr(resolved) and secret not in child_config_json(resolved)
    preflight(resolved)  # probes the bucket with the block's keys
    storage.write_json(storage.join(prefix, "probe.json"), {"by": "the block's keys"}, resolved.storage)
    assert storage.read_json(storage.join(prefix, "probe.json"), resolved.storage) == {"by": "the block's keys"}

    # Through the deployment: a block that does not exist fails the flow run before any stage starts.
    missing = {**overrides, "storage.credentials_block": "nope"}
    bad = start_deployment(stack, {"preset": "tiny-s3", "overrides": missing})
    assert wait_for_end(stack, bad, seconds=120) == "FAILED"
    assert task_states(stack, bad) == {}
    assert any("storage.credentials_block" in line for line in flow_run_logs(stack, bad))
