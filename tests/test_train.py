"""Real distributed training runs: torchrun with 2 CPU ranks, FSDP2, litdata, DCP, local disk and a moto S3 server.

The data is built here from real text (docstrings of Python standard-library modules) with a small byte-level BPE
trained in the test and `litdata.optimize(..., item_loader=TokensLoader())`, the same layout the tokenize stage
writes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.evaluate import lm as harness
from stages.train import report as train_report
from stages.train import scaling
from stages.train.metrics import MetricsLog
from stages.train.stage import child_config_json, run_training, run_uri, torchrun_command
from stages.train.worker import DivergenceGuard, TrainingDiverged

EOS = "<|endoftext|>"
BIG_BATCH = 24  # sequences per rank per step in the runs that must cross an epoch boundary
MICRO = 12  # ... reached as 2 micro-batches of 12: gradient accumulation
DIVERGING_LR = 1e6  # weights blow up at once: the gradient norm is NaN by step 3
MODULES = [
    "json",
    "csv",
    "argparse",
    "collections",
    "functools",
    "itertools",
    "re",
    "pathlib",
    "subprocess",
    "typing",
    "logging",
    "textwrap",
    "string",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "heapq",
    "bisect",
    "shutil",
    "tempfile",
    "unittest",
    "difflib",
    "inspect",
    "contextlib",
    "dataclasses",
]


# ----------------------------------------------------------------------------------------------------------------
# data


def _documents() -> list[str]:
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and friends
        for name in MODULES:
            _module_docs(name, docs)
    return docs


def _module_docs(name: str, docs: list[str]) -> None:
    mod = importlib.import_module(name)
    for obj in [mod, *(getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_"))]:
        doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
        if doc and len(doc) > 80 and doc not in docs:
            docs.append(doc)


def _to_tokens(ids: list[int]):
    import torch

    return torch.tensor(ids, dtype=torch.int32)


def write_splits(folder: Path, splits: dict[str, list[list[int]]]) -> None:
    """{folder}/{split}/: each split's documents (token ids) as litdata TokensLoader chunks, as the tokenize stage
    writes them."""
    from litdata import TokensLoader, optimize

    for split, items in splits.items():
        optimize(
            fn=_to_tokens,
            inputs=items,
            output_dir=str(folder / split),
            item_loader=TokensLoader(),
            chunk_bytes="1MB",
            num_workers=1,
        )


def build_token_data(root: Path) -> Path:
    """A root holding tokens/{train,val} (litdata TokensLoader chunks) and tokens/tokenizer.json: a dataset made
    outside the pipeline, which runs name with train.data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = _documents()
    assert len(docs) > 300

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        docs,
        trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    (root / "tokens").mkdir()
    tok.save(str(root / "tokens" / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids = [enc.ids + [eos] for enc in tok.encode_batch(docs)]

    n_val = len(ids) // 10
    write_splits(root / "tokens", {"val": ids[:n_val], "train": ids[n_val:]})
    assert (root / "tokens" / "train" / "index.json").is_file()
    return root


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return build_token_data(tmp_path_factory.mktemp("token_data"))


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory) -> Path:
    """litdata's local chunk cache for every run of this module (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("litdata_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_CACHE_DIR", str(path))
        yield path


def make_cfg(root: str, **train) -> PipelineConfig:
    settings = dict(
        data=f"{root}/tokens",
        nproc_per_node=2,
        seq_len=64,
        micro_batch_size=8,
        max_steps=30,
        warmup_steps=5,
        checkpoint_every=10,
        lr=3e-3,
        min_lr=3e-4,
        loader_workers=0,
    )
    settings.update(train)
    return PipelineConfig.model_validate(
        {
            "name": "test-train",
            "storage": {"root": root},
            "ingest": {"inputs": ["unused"]},
            "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
            "train": settings,
        }
    )


def run_dir(cfg: PipelineConfig) -> Path:
    """The run's folder, {root}/train/{version}: its checkpoints, metrics.jsonl and loss curve."""
    return Path(run_uri(cfg))


def run(cfg: PipelineConfig) -> tuple[dict, list[str], list[dict]]:
    lines: list[str] = []
    result = run_training(cfg, on_line=lines.append)
    metrics = [json.loads(line.split("METRIC ", 1)[1]) for line in lines if line.startswith("METRIC ")]
    return result, lines, metrics


# ----------------------------------------------------------------------------------------------------------------
# launcher pieces (no training)


def test_child_config_has_no_secrets_and_command_shape():
    cfg = make_cfg("s3://bucket/run")
    cfg.storage.access_key_id = "AKIA-SECRET-ID"
    cfg.storage.secret_access_key = "very-secret-key"
    text = child_config_json(cfg)
    assert "AKIA-SECRET-ID" not in text and "very-secret-key" not in text
    assert PipelineConfig.model_validate_json(text).storage.root == "s3://bucket/run"

    cmd = torchrun_command(cfg, "/tmp/c.json", "/tmp/r.json")
    assert "--standalone" in cmd
    assert cmd[-6:] == ["-m", "stages.train.worker", "--config-json", "/tmp/c.json", "--run-json", "/tmp/r.json"]
    cfg.train.rdzv_endpoint, cfg.train.nnodes = "10.0.0.1:29400", 2
    cmd = torchrun_command(cfg, "/tmp/c.json", "/tmp/r.json")
    assert "--standalone" not in cmd and cmd[cmd.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400"


def test_missing_tokens_fail_before_launch(tmp_path):
    started = time.time()
    with pytest.raises(FileNotFoundError, match="tokens/train/index.json"):
        run_training(make_cfg(str(tmp_path / "nothing")), on_line=lambda line: None)
    assert time.time() - started < 5


# ----------------------------------------------------------------------------------------------------------------
# local disk


REFERENCE = dict(max_steps=30, checkpoint_every=15, val_every=10, micro_batch_size=MICRO, global_batch_size=4 * MICRO)


@pytest.fixture(scope="module")
def reference_run(token_data, tmp_path_factory):
    """30 uninterrupted steps on 2 ranks, 2 micro-batches each per step, checkpoints at 15 and 30."""
    root = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), **REFERENCE)
    result, lines, metrics = run(cfg)
    return cfg, run_dir(cfg), result, metrics, lines


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((ckpt / "meta.json").read_text())
    return harness.load_model(str(ckpt), meta).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_train_two_ranks_local(reference_run):
    cfg, ckpts, result, metrics, lines = reference_run
    assert ckpts.parent.name == "train"  # {root}/train/{version}

    assert not result["skipped"]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert result["steps"] == 30 and result["start_step"] == 0
    assert result["final_loss"] < result["first_loss"] - 0.5, (result["first_loss"], result["final_loss"])
    assert result["initial_loss"] == metrics[0]["loss"]
    assert result["val_loss"] is not None and result["val_loss"] < result["first_loss"]
    assert result["tokens_seen"] == 30 * 4 * MICRO * 64
    assert any("(2 micro-batches of 12 per rank)" in line for line in lines)
    # ~27 full batches of 24 per rank per epoch: the run goes on into a second epoch.
    assert any("epoch 2 starts" in line for line in lines)
    assert result["params"] > 0 and result["tokens_per_s"] > 0

    # Monitoring: FLOPs from the config, achieved FLOP/s, no MFU on a CPU (no peak to divide by), memory, lr.
    vocab = json.loads((ckpts / "step-000030" / "meta.json").read_text())["vocab_size"]
    assert result["flops_per_token"] == scaling.flops_per_token(cfg.model, vocab, 64)
    assert result["flops_per_s"] > 0 and result["mfu"] is None and result["peak_memory_mb"] > 0
    assert all(m["max_steps"] == 30 and m["flops_per_s"] > 0 and m["memory_mb"] > 0 for m in metrics)
    assert [m["step"] for m in metrics if "val_loss" in m] == [10, 20, 30]
    assert metrics[4]["lr"] == pytest.approx(3e-3) and metrics[-1]["lr"] < metrics[10]["lr"]

    ckpt = ckpts / "step-000030"
    assert result["checkpoint"] == str(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 30 and meta["vocab_size"] == 512 and meta["model"]["dim"] == 64
    assert meta["tokenizer_uri"] == f"{cfg.train.data}/tokenizer.json" and meta["data_uri"] == cfg.train.data
    # lineage: the run's version names its folder and is the digest of what it is a function of
    assert meta["run_version"] == ckpts.name == storage.version_of(meta["run_identity"])
    assert set(meta["run_identity"]) == {"code", "config", "inputs"} and set(meta["run_identity"]["inputs"]) == {"data"}
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    assert (ckpts / "step-000015" / "meta.json").is_file()
    logged = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "flops_per_s", "mfu"} <= set(logged[0])
    print(
        f"\nlocal run: {result['seconds']:.1f}s, {result['tokens_per_s']} tokens/s, "
        f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f}, val {result['val_loss']:.3f}"
    )

    # The same config again: complete and matching, so nothing is launched.
    started = time.time()
    again, lines, _ = run(cfg)
    assert again["skipped"] and again["final_loss"] == result["final_loss"] and time.time() - started < 5
    assert not any(line.startswith("METRIC ") for line in lines)


def sigkill_torchrun_at(step: int):
    """An on_line callback that SIGKILLs torchrun and every rank at once (a lost machine) once `step` is logged.

    The ranks run in sessions of their own (torch.distributed.elastic starts them so), hence one by one."""

    def on_line(line: str) -> None:
        if line.startswith("METRIC ") and json.loads(line[len("METRIC ") :])["step"] == step:
            (torchrun,) = [p for p in psutil.Process().children() if "torch.distributed.run" in p.cmdline()]
            procs = [torchrun, *torchrun.children(recursive=True)]
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            # torchrun itself is reaped by the launcher's Popen (reaping it here would hide its exit code)
            psutil.wait_procs([p for p in procs if p.ppid() != os.getpid()], timeout=10)

    return on_line


def test_sigkilled_run_resumes_exactly(reference_run, token_data, tmp_path):
    """SIGKILL torchrun and its ranks after the step-15 checkpoint, rerun: it resumes at 15 and reproduces the
    uninterrupted run's losses and final weights bit for bit (model, optimizer, scheduler, RNG and data order)."""
    _, ref_run, reference, ref_metrics, _ = reference_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), **REFERENCE)

    with pytest.raises(RuntimeError, match="torchrun exited with code"):
        run_training(cfg, on_line=sigkill_torchrun_at(20))
    ckpts = run_dir(cfg)
    assert ckpts.name == ref_run.name  # same config and data content, elsewhere: the same version
    assert (ckpts / "step-000015" / "meta.json").is_file()
    assert not (ckpts / "step-000030").exists()

    result, lines, metrics = run(cfg)
    assert any("resumed from" in line and "step-000015" in line for line in lines)
    assert [m["step"] for m in metrics] == list(range(16, 31))
    assert any("epoch 2 starts" in line for line in lines)  # restored mid-epoch 1, then on into epoch 2
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics[15:]]
    assert [m["grad_norm"] for m in metrics] == [m["grad_norm"] for m in ref_metrics[15:]]
    assert result["final_loss"] == reference["final_loss"] and result["val_loss"] == reference["val_loss"]
    assert_same_weights(ckpts / "step-000030", ref_run / "step-000030")
    # metrics.jsonl: the killed run's lines after step 15 were dropped on resume, so each step appears once.
    logged = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert [m["loss"] for m in logged] == [m["loss"] for m in ref_metrics]


def test_async_checkpoints_keep_last_and_match_sync(reference_run, token_data, tmp_path):
    """Background saves change nothing in the numbers; keep_last=1 leaves only the newest checkpoint."""
    _, ref_run, _, ref_metrics, _ = reference_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), **REFERENCE, async_checkpoint=True, keep_last=1)
    result, _, metrics = run(cfg)
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    assert sorted(p.name for p in run_dir(cfg).glob("step-*")) == ["step-000030"]
    assert result["checkpoint"] == str(run_dir(cfg) / "step-000030")
    assert_same_weights(run_dir(cfg) / "step-000030", ref_run / "step-000030")


@pytest.mark.parametrize("nproc", [1, 4])
def test_checkpoint_of_two_ranks_resumes_on_other_world_sizes(reference_run, token_data, tmp_path, nproc):
    """The step-15 checkpoint of 2 ranks resumes on 1 rank (4 micro-batches per step) and on 4 (one each): same
    global batch, weights and optimizer resharded by DCP, the loader restriped by litdata."""
    _, ref_run, _, ref_metrics, _ = reference_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), **{**REFERENCE, "max_steps": 17, "nproc_per_node": nproc})
    shutil.copytree(ref_run / "step-000015", run_dir(cfg) / "step-000015")  # picked by resume: auto
    result, lines, metrics = run(cfg)
    assert any("resumed from" in line and "step-000015" in line for line in lines)
    assert [m["step"] for m in metrics] == [16, 17]
    # Trained weights carried over: the loss continues where the 2-rank run was, far below the untrained one.
    losses, ref_losses = [m["loss"] for m in metrics], [m["loss"] for m in ref_metrics[15:17]]
    if nproc == 1:
        # litdata restripes the position: the same samples, so the same losses up to summation order
        assert losses == pytest.approx(ref_losses, abs=1e-4)
    else:
        # 2 ranks were further into the epoch than each of 4 holds samples: litdata cannot restripe that, and
        # the next epoch starts instead (said in the log); the trained weights still carry the loss
        assert any("cannot be restriped onto 4; epoch 2 starts" in line for line in lines)
        assert abs(losses[0] - ref_losses[0]) < 0.3 and losses[0] < ref_metrics[0]["loss"] - 0.5
    assert result["tokens_seen"] == 17 * 4 * MICRO * 64


def test_ddp_matches_fsdp_and_checkpoints_cross_over(reference_run, token_data, tmp_path):
    """data_parallel: ddp resumes the FSDP run's step-15 checkpoint and gives its losses and gradient norms (with
    gradient accumulation under no_sync); FSDP then resumes DDP's step-16 checkpoint and gives the same step 17."""
    _, ref_run, _, ref_metrics, _ = reference_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    ref = ref_metrics[15:17]

    from_15 = str(ref_run / "step-000015")
    ddp = make_cfg(
        str(root), **{**REFERENCE, "max_steps": 17, "checkpoint_every": 1}, data_parallel="ddp", resume=from_15
    )
    _, lines, metrics = run(ddp)
    assert any("step-000015" in line and "resumed from" in line for line in lines)
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in ref], abs=1e-4)
    assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-3)

    # (Step 17 only: the lr after a resume comes from the checkpoint, later ones from this run's max_steps.)
    ddp_16 = str(run_dir(ddp) / "step-000016")
    _, lines, metrics = run(make_cfg(str(root), **{**REFERENCE, "max_steps": 17, "resume": ddp_16}))
    assert any("step-000016" in line and "resumed from" in line for line in lines)
    assert [m["loss"] for m in metrics] == pytest.approx([ref[1]["loss"]], abs=1e-4)
    assert metrics[0]["grad_norm"] == pytest.approx(ref[1]["grad_norm"], rel=1e-3)

    with pytest.raises(ValueError, match="applies to data_parallel: fsdp only"):
        make_cfg(str(root), data_parallel="ddp", reshard_after_forward=False)


def test_initial_checkpoint_gives_weights_only(reference_run, token_data, tmp_path):
    """Continued pretraining: another run's weights, a fresh step count, schedule and optimizer."""
    _, ref_run, reference, ref_metrics, _ = reference_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    ckpt = ref_run / "step-000030"
    result, lines, metrics = run(make_cfg(str(root), max_steps=3, warmup_steps=2, initial_checkpoint=str(ckpt)))
    assert any(f"initial weights from {ckpt}" in line for line in lines)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[0]["lr"] == pytest.approx(1.5e-3)
    assert abs(metrics[0]["loss"] - reference["final_loss"]) < 0.3
    assert metrics[0]["loss"] < reference["first_loss"] - 0.5

    shutil.copytree(token_data, tmp_path / "other")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        run_training(make_cfg(str(tmp_path / "other"), initial_checkpoint=str(tmp_path / "nope")), lambda _: None)


@pytest.fixture(scope="module")
def short_run(token_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("short") / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), max_steps=20, checkpoint_every=10)
    return run_dir(cfg), *run(cfg)


def test_resume_continues_at_step(short_run, tmp_path):
    short_ckpts, first, _, metrics = short_run
    assert [m["step"] for m in metrics] == list(range(1, 21))
    root = tmp_path / "run"
    shutil.copytree(short_ckpts.parent.parent, root)
    cfg = make_cfg(str(root), max_steps=30, checkpoint_every=10)
    # Another max_steps is another run (its schedule differs), in a folder of its own: nothing to resume ...
    assert run_dir(cfg) != root / "train" / short_ckpts.name
    # ... until the 20-step run's folder is copied there (as one continues a run by hand).
    shutil.copytree(root / "train" / short_ckpts.name, run_dir(cfg))

    # A checkpoint folder without meta.json (a save that crashed) must be ignored.
    (run_dir(cfg) / "step-000025").mkdir()
    (run_dir(cfg) / "step-000025" / ".metadata").write_bytes(b"garbage")

    second, lines, metrics = run(cfg)
    assert not second["skipped"]
    assert any("resumed from" in line and "step-000020" in line for line in lines)
    assert [m["step"] for m in metrics] == list(range(21, 31))
    assert second["start_step"] == 20 and second["steps"] == 30
    assert second["tokens_seen"] == 30 * 2 * 8 * 64
    # Continues from the trained state: no jump back to the untrained loss.
    assert second["first_loss"] < first["first_loss"] - 0.5
    assert (run_dir(cfg) / "step-000030" / "meta.json").is_file()
    logged = [json.loads(line)["step"] for line in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 31))

    # resume: none starts over from step 1 whatever checkpoints exist.
    fresh, _, metrics = run(make_cfg(str(root), max_steps=3, checkpoint_every=10, resume="none"))
    assert [m["step"] for m in metrics] == [1, 2, 3] and fresh["first_loss"] == first["first_loss"]

    # force with a token (a flow run's id) trains from scratch once; the same token again (a retry of that flow
    # run) keeps what it trained.
    lines: list[str] = []
    forced = run_training(make_cfg(str(root), max_steps=3, checkpoint_every=10), lines.append, force="flow-run-1")
    assert not forced["skipped"] and any("training from scratch (forced)" in line for line in lines)
    again = run_training(make_cfg(str(root), max_steps=3, checkpoint_every=10), lines.append, force="flow-run-1")
    assert again["skipped"] and any("not forced again" in line for line in lines)


def scalars(folder: str) -> dict[str, dict[int, float]]:
    """A TensorBoard log folder's scalars as TensorBoard shows them: by tag, value per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_events_beside_metrics_jsonl(short_run, moto_endpoint, tmp_path):
    ckpts, _, _, _ = short_run
    logged = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    shown = scalars(str(ckpts / "tensorboard"))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(shown)
    assert shown["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in logged})  # (float32 there)
    assert shown["val/loss"] == pytest.approx({r["step"]: r["val_loss"] for r in logged if "val_loss" in r})

    # Resumed from a checkpoint at step 2 after steps 3 and 4 were logged: TensorBoard shows the new step 3 alone.
    cfg = make_cfg(str(tmp_path))
    for start, steps in ((0, [1, 2, 3, 4]), (2, [3])):
        log = MetricsLog(cfg, str(tmp_path / "resumed"), start)
        for step in steps:
            log.append({"step": step, "loss": step * (10.0 if start else 1.0)})
        log.close()
    assert scalars(str(tmp_path / "resumed" / "tensorboard"))["train/loss"] == {1: 1.0, 2: 2.0, 3: 30.0}

    # On S3: event files written locally, uploaded at each flush (a checkpoint), the local copy gone at the end.
    import boto3

    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bucket")
    remote = make_cfg("s3://bucket/root")
    remote.storage.endpoint_url, remote.storage.region = moto_endpoint, "us-east-1"
    log = MetricsLog(remote, "s3://bucket/root/run", 0)
    log.append({"step": 1, "loss": 5.0})
    log.flush()
    (uploaded,) = storage.expand("s3://bucket/root/run/tensorboard/", remote.storage)
    local = Path(log.events.folder)
    log.close()
    assert not local.exists()
    with storage.open_uri(uploaded, "rb", remote.storage) as src:
        (tmp_path / "downloaded").mkdir()
        (tmp_path / "downloaded" / uploaded.rsplit("/", 1)[1]).write_bytes(src.read())
    assert scalars(str(tmp_path / "downloaded"))["train/loss"] == {1: 5.0}

    # train.tensorboard false: metrics.jsonl alone.
    cfg.train.tensorboard = False
    MetricsLog(cfg, str(tmp_path / "off"), 0).close()
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["metrics.jsonl"]


def test_activation_checkpointing_changes_nothing_but_memory(short_run, token_data, tmp_path):
    _, _, _, eager = short_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    _, _, metrics = run(make_cfg(str(root), max_steps=20, checkpoint_every=10, activation_checkpointing=True))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in eager]


def test_compiled_blocks_match_eager(short_run, token_data, tmp_path):
    """torch.compile per block (inductor on CPU): the losses of the eager run (warmup steps: same learning rates)."""
    _, _, _, eager = short_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    _, _, metrics = run(make_cfg(str(root), max_steps=5, checkpoint_every=5, compile=True))
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in eager[:5]], abs=1e-4)


def test_document_masking_trains_on_two_ranks(short_run, token_data, tmp_path):
    """train.document_masking through FSDP2 on 2 ranks: the documents of a block are computed apart (the model's
    tests show what that means), so the losses are not the plain causal run's, and the run learns."""
    _, _, _, causal = short_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    result, _, metrics = run(make_cfg(str(root), max_steps=10, checkpoint_every=10, document_masking=True))
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert losses != [m["loss"] for m in causal[:10]]
    assert losses[0] == pytest.approx(causal[0]["loss"], abs=0.5)  # (the same untrained model on the same data)
    assert losses[-1] < losses[0] and result["val_loss"] is not None


def test_divergence_stops_the_run_naming_the_step(token_data, tmp_path):
    """A learning rate far too high: the guard stops the run at the first bad step; the checkpoint before stays."""
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    cfg = make_cfg(str(root), max_steps=30, checkpoint_every=2, warmup_steps=0, lr=DIVERGING_LR, min_lr=0.0)
    with pytest.raises(RuntimeError) as failure:
        run_training(cfg, on_line=lambda _: None)
    message = str(failure.value)
    assert "TrainingDiverged" in message and "step " in message, message
    assert "the last good checkpoint is" in message
    complete = sorted(p.parent.name for p in run_dir(cfg).glob("step-*/meta.json"))
    assert complete, "no checkpoint was completed before the divergence"


def test_two_nodes_rendezvous_on_loopback(short_run, token_data, tmp_path):
    """2 nodes x 1 process: two launchers (as on two machines sharing storage) meet through torchrun's c10d
    rendezvous on 127.0.0.1 and train one run; each returns its summary, and the losses are those of the same
    run on one node with 2 processes."""
    _, _, _, one_node = short_run
    root = tmp_path / "run"
    shutil.copytree(token_data, root)
    endpoint = f"127.0.0.1:{_free_port()}"
    cfg = make_cfg(str(root), max_steps=4, checkpoint_every=10, nproc_per_node=1, nnodes=2, rdzv_endpoint=endpoint)
    results: dict[int, tuple] = {}
    nodes = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(cfg))) for i in range(2)]
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(timeout=300)
    assert sorted(results) == [0, 1]
    (lead_metrics,) = [m for _, _, m in results.values() if m]  # rank 0's node prints the per-step records
    assert [m["loss"] for m in lead_metrics] == pytest.approx([m["loss"] for m in one_node[:4]], abs=1e-4)
    summaries = [r[0] for r in results.values()]
    assert all(s["steps"] == 4 and s["checkpoint"] == summaries[0]["checkpoint"] for s in summaries)
    # the resolved model, as training starts
    model = "(dim 64, 2 layers, 4 heads, 2 KV heads, feed-forward 192)"
    assert any("world=2" in line and model in line for _, lines, _ in results.values() for line in lines)


def test_divergence_guard_unit():
    guard = DivergenceGuard(factor=5.0, warmup_steps=2)
    with pytest.raises(TrainingDiverged, match="step 1: loss nan"):
        guard.check(1, math.nan, 1.0, None)
    with pytest.raises(TrainingDiverged, match="step 2: .*gradient norm inf"):
        guard.check(2, 3.0, math.inf, "ckpt")
    for step in range(1, 9):
        guard.check(step, 3.0, 1.0 + 0.01 * step, None)  # during warmup and after, ordinary norms pass
    guard.check(9, 3.0, 4.0, None)  # 4x the median: under the factor
    with pytest.raises(TrainingDiverged, match=r"step 10: gradient norm 20 is .*the last good checkpoint is s3://x"):
        guard.check(10, 3.0, 20.0, "s3://x")


# ----------------------------------------------------------------------------------------------------------------
# S3 (a real moto server)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_endpoint(monkeypatch):
    port = _free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_train_on_s3(token_data, moto_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bucket")
    for path in token_data.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "bucket", f"run/{path.relative_to(token_data).as_posix()}")

    def cfg_for(steps: int, **train) -> PipelineConfig:
        cfg = make_cfg("s3://bucket/run", max_steps=steps, checkpoint_every=5, **train)
        cfg.storage.endpoint_url = moto_endpoint
        cfg.storage.region = "us-east-1"
        return cfg

    first, _, metrics = run(cfg_for(5))
    assert [m["step"] for m in metrics] == list(range(1, 6))
    short = run_uri(cfg_for(5))
    second, lines, metrics = run(cfg_for(10, resume=f"{short}/step-000005"))
    assert [m["step"] for m in metrics] == list(range(6, 11))
    assert any(f"resumed from {short}/step-000005" in line for line in lines)
    run_key = run_uri(cfg_for(10)).removeprefix("s3://bucket/")
    assert run_key.startswith("run/train/") and second["checkpoint"] == f"s3://bucket/{run_key}/step-000010"
    assert second["final_loss"] < first["first_loss"]

    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=f"{run_key}/")
    keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    step = "000010"
    assert {f"{run_key}/step-{step}/.metadata", f"{run_key}/step-{step}/meta.json"} <= keys
    assert sum(k.startswith(f"{run_key}/step-{step}/") and k.endswith(".distcp") for k in keys) == 2
    meta = json.loads(s3.get_object(Bucket="bucket", Key=f"{run_key}/step-000010/meta.json")["Body"].read())
    assert meta["step"] == 10 and meta["tokenizer_uri"] == "s3://bucket/run/tokens/tokenizer.json"
    logged = s3.get_object(Bucket="bucket", Key=f"{run_key}/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in logged.splitlines()] == list(range(6, 11))  # this run's steps

    # Done and matching: skipped without launching.
    again, _, _ = run(cfg_for(10))
    assert again["skipped"] and again["checkpoint"] == second["checkpoint"]


FAULTS_PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    from stages.train.worker import keep_freed_memory
    assert keep_freed_memory()
size = 16 << 20  # the tiny preset's logits: 8 x 128 x 4096 floats
for round in range(41):  # a step's logits-sized blocks, allocated, written and freed each time
    if round == 1:  # (after the first round, which faults its pages in either way)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(4)]  # (more than glibc's trim threshold, freed at once)
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """The trainer's CPU allocator setting: the same large blocks allocated and freed again do not fault their
    pages in anew (by default glibc unmaps them, and the kernel zero-fills them again on the next touch)."""

    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_PROBE, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.strip())

    default, kept = faults("default"), faults("keep")
    pages = 40 * 4 * (16 << 20) // 4096
    assert default > 0.9 * pages, default  # every round faults its pages in again (nearly all: glibc keeps a pad)
    assert kept < pages // 100, (kept, default)


# ----------------------------------------------------------------------------------------------------------------
# mixtures (train.mixture): the run's dataset and a small second source made with the same tokenizer

BOOK_MODULES = ["random", "email.message", "http.client"]
MIX = dict(max_steps=12, checkpoint_every=4, val_every=4)


@pytest.fixture(scope="module")
def mixture_data(token_data, tmp_path_factory) -> Path:
    """token_data plus books/{train,val} and books/tokenizer.json: other text, the same tokenizer."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("mixture") / "data"
    shutil.copytree(token_data, root)
    tok = Tokenizer.from_file(str(root / "tokens" / "tokenizer.json"))
    docs: list[str] = []
    for name in BOOK_MODULES:
        _module_docs(name, docs)
    ids = [enc.ids + [tok.token_to_id(EOS)] for enc in tok.encode_batch(docs)]
    splits: dict[str, list] = {"val": [], "train": []}
    # val: a full validation batch per rank (2 x 8 blocks of 65 tokens); train: about 40 blocks, an epoch of
    # which lasts about 8 steps at weight 0.3
    for split, blocks in (("val", 20), ("train", 40)):
        while sum(map(len, splits[split])) < blocks * 65:
            splits[split].append(ids.pop())
    write_splits(root / "books", splits)
    shutil.copy(root / "tokens" / "tokenizer.json", root / "books" / "tokenizer.json")
    return root


def mixture_cfg(root: Path, on_exhausted: str, **train) -> PipelineConfig:
    sources = [
        {"name": "docs", "weight": 0.7},  # (train.data: the run's own dataset)
        {"name": "books", "weight": 0.3, "data": str(root / "books"), "max_epochs": 1.0},
    ]
    return make_cfg(str(root), mixture={"sources": sources, "on_exhausted": on_exhausted}, **{**MIX, **train})


@pytest.fixture(scope="module")
def mixture_run(mixture_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture-run") / "run"
    shutil.copytree(mixture_data, root)
    cfg = mixture_cfg(root, "renormalize")
    return cfg, *run(cfg)


def test_mixture_counts_tokens_per_source_caps_epochs_and_resumes_exactly(mixture_run, mixture_data, tmp_path):
    cfg, result, lines, metrics = mixture_run
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for m in metrics:  # every token trained on is counted under one source
        assert sum(s["tokens"] for s in m["sources"].values()) == m["tokens_seen"]
    books = [m["sources"]["books"] for m in metrics]
    ran_out = next(i for i, b in enumerate(books) if b["exhausted"])
    assert 4 <= ran_out < 11, ran_out  # after the step-4 checkpoint the resume below starts from
    assert books[ran_out]["epochs"] == 1.0 and all(b == books[ran_out] for b in books[ran_out:])
    assert books[ran_out - 1]["tokens"] / metrics[ran_out - 1]["tokens_seen"] == pytest.approx(0.3, abs=0.12)
    assert any("source books exhausted after 1.00 epochs" in line and "go on over docs" in line for line in lines)
    by_source = metrics[3]["val_loss_by_source"]
    assert set(by_source) == {"docs", "books"}
    assert metrics[3]["val_loss"] == pytest.approx(0.7 * by_source["docs"] + 0.3 * by_source["books"], abs=1e-5)
    assert result["sources"]["books"]["exhausted"] and result["sources"]["docs"]["tokens"] > 0
    table = train_report.metrics_table(metrics)  # the Prefect artifact's rows
    assert table[-1]["books tokens"] == books[-1]["tokens"] and table[-1]["books epochs"] == 1.0

    # Resumed from the step-4 checkpoint (the run as a crash after step 4 leaves it; tests above kill torchrun for
    # real): across the cap, the same losses and source counts.
    root = tmp_path / "run"
    shutil.copytree(mixture_data, root)
    again = mixture_cfg(root, "renormalize")
    assert run_dir(again).name == run_dir(cfg).name  # (the sources' paths are not the run's identity)
    shutil.copytree(run_dir(cfg) / "step-000004", run_dir(again) / "step-000004")
    _, resumed_lines, resumed = run(again)
    assert any("resumed from" in line and "step-000004" in line for line in resumed_lines)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in metrics[4:]]
    assert [m["sources"] for m in resumed] == [m["sources"] for m in metrics[4:]]


def test_mixture_stop_policy_ends_the_run_where_a_source_ran_out(mixture_run, mixture_data, tmp_path):
    _, _, _, renormalized = mixture_run
    ran_out = next(m["step"] for m in renormalized if m["sources"]["books"]["exhausted"])
    root = tmp_path / "run"
    shutil.copytree(mixture_data, root)
    cfg = mixture_cfg(root, "stop")
    result, lines, metrics = run(cfg)
    assert [m["step"] for m in metrics] == list(range(1, ran_out + 1))  # the batch it ran out in was the last
    assert [m["loss"] for m in metrics] == [m["loss"] for m in renormalized[:ran_out]]
    assert result["steps"] == ran_out and "books (1.00 epochs" in result["data_exhausted"]
    meta = json.loads((run_dir(cfg) / f"step-{ran_out:06d}" / "meta.json").read_text())
    assert "on_exhausted: stop" in meta["data_exhausted"] and meta["summary"]["steps"] == ran_out
    assert meta["mixture"] == {"docs": str(root / "tokens"), "books": str(root / "books")}
    assert len(meta["run_identity"]["inputs"]["mixture"]) == 2  # each source's content digest
    assert any(f"stopping after step {ran_out} of 12" in line for line in lines)
    assert run_training(cfg, on_line=lambda _: None)["skipped"]  # the run is complete: a rerun has nothing to do


def test_mixture_source_with_another_tokenizer_fails_before_launch(mixture_data, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(mixture_data, root)
    tokenizer = json.loads((root / "books" / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|other|>"
    (root / "books" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=r"train.mixture.sources\[1\].data: .*books was tokenized with another"):
        run_training(mixture_cfg(root, "stop"), on_line=lambda _: None)
    shutil.rmtree(root / "books" / "train")
    with pytest.raises(FileNotFoundError, match=r"no tokenized training data \(train.mixture.sources\[1\].data\)"):
        run_training(mixture_cfg(root, "stop"), on_line=lambda _: None)
