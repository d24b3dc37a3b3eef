"""The paths training takes on CUDA, run on CPU wherever torch 2.13 can: each test would fail if its path broke.

- FSDP2 with `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)` (`train.dtype: bfloat16`) over gloo on
  2 ranks: losses close to fp32's, and its DCP checkpoint resumes to the same losses;
- autocast to bf16 for one process, through the same `lm_loss` as CUDA (the dtype a parameter, not a device test);
- the model built on the meta device, sharded, materialized and initialized shard by shard: a rank's memory at
  start grows by about its shard, not the whole model, and the values are the whole model's for the seed;
- torch.compile of the blocks with activation checkpointing and document masking together, the fused AdamW (the
  trainer's only optimizer), and async DCP saves resumed.
- flex_attention with the document BlockMask, compiled: tests/test_packing.py (the dense mask's results, no token
  attending across documents).

What a CPU cannot run, and why:
- flex_attention's backward: torch 2.13 raises "FlexAttention does not support backward on CPU", so training with
  document masking on CPU takes the dense-mask SDPA path; the compiled BlockMask forward is tested, its backward
  runs only on CUDA (bench/gpu.py).
- NCCL, CUDA graphs, the caching allocator's peak-memory counters and bf16 tensor cores: there is no CPU stand-in;
  gloo runs the same collectives (all-gather, reduce-scatter) in the same dtypes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from stages.core.config import REPO_ROOT
from stages.train.model import Transformer
from stages.train.worker import build_optimizer, lm_loss
from tests import test_train
from tests.test_train import make_cfg, run, run_dir

SHORT = dict(max_steps=12, checkpoint_every=6, val_every=6, warmup_steps=3)
cache_root = test_train.cache_root  # (autouse: litdata's chunk cache under the test's temporary folder)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    return test_train.build_token_data(tmp_path_factory.mktemp("token_data"))


def copy_data(data, tmp_path, name: str) -> str:
    root = tmp_path / name
    shutil.copytree(data, root)
    return str(root)


def resumed_losses(cfg, at: int) -> list[float]:
    """Remove the checkpoints after step `at` and run again: the losses of the steps after it."""
    for ckpt in run_dir(cfg).glob("step-*"):
        if int(ckpt.name.removeprefix("step-")) > at:
            shutil.rmtree(ckpt)
    _, lines, metrics = run(cfg)
    assert any("resumed from" in line and f"step-{at:06d}" in line for line in lines)
    return [m["loss"] for m in metrics]


def test_fsdp2_bf16_mixed_precision_trains_close_to_fp32_and_resumes(token_data, tmp_path):
    fp32 = make_cfg(copy_data(token_data, tmp_path, "fp32"), **SHORT, dtype="float32")
    bf16 = make_cfg(copy_data(token_data, tmp_path, "bf16"), **SHORT, dtype="bfloat16")
    _, _, exact = run(fp32)
    _, lines, mixed = run(bf16)
    assert any("dtype=bfloat16 (bfloat16)" in line for line in lines)
    exact_losses, mixed_losses = [m["loss"] for m in exact], [m["loss"] for m in mixed]
    assert mixed_losses != exact_losses  # (bf16 did run: its rounding shows)
    # bf16 keeps 8 bits of mantissa: a loss within 2% of fp32's at every step, and the same descent
    assert mixed_losses == pytest.approx(exact_losses, rel=0.02)
    assert mixed_losses[-1] < mixed_losses[0] - 0.5
    assert resumed_losses(bf16, 6) == mixed_losses[6:]  # the bf16 run's checkpoint resumes exactly


def test_autocast_bf16_for_one_process_through_the_training_loss():
    from stages.core.config import ModelConfig

    net = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2), 512)
    net.init_weights(3)
    batch = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0))
    seen = []
    net.layers[0].feed_forward.w1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    cpu = torch.device("cpu")
    exact, mixed = lm_loss(net, batch, cpu), lm_loss(net, batch, cpu, dtype=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]  # the matmuls ran in bf16 under autocast on CPU
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(exact.item(), rel=0.01)
    mixed.backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())  # master weights and gradients stay fp32


def test_a_sharded_model_starts_in_its_shard_with_the_whole_models_values():
    """2 ranks build a 26M-parameter model (102 MB in fp32) through build_model: each rank's peak memory grows by
    about its half, where building the whole model (the control, in the same process) grows by all of it."""
    overrides = {"model.dim": 384, "model.n_layers": 16, "model.n_heads": 6}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.rank_checks", "init", json.dumps(overrides)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["same_names"] and r["same_values"] and r["tied"]
        assert r["local_mb"] == pytest.approx(r["model_mb"] / 2, rel=0.02)
        assert r["grown_mb"] < 0.65 * r["model_mb"], r  # its shard and one matrix at a time, not the model
        assert r["control_mb"] > 0.85 * r["model_mb"], r  # (the measure sees a whole model when there is one)


def test_compile_activation_checkpointing_and_document_masking_together_with_async_checkpoints(token_data, tmp_path):
    base = dict(max_steps=6, checkpoint_every=3, val_every=3, warmup_steps=3, document_masking=True)
    eager = make_cfg(copy_data(token_data, tmp_path, "eager"), **base)
    everything = make_cfg(copy_data(token_data, tmp_path, "all"), **base, compile=True,
                          activation_checkpointing=True, async_checkpoint=True)  # fmt: skip
    _, _, reference = run(eager)
    _, _, metrics = run(everything)
    losses = [m["loss"] for m in metrics]
    assert losses == pytest.approx([m["loss"] for m in reference], abs=1e-4)  # inductor's kernels, same maths
    assert resumed_losses(everything, 3) == pytest.approx(losses[3:], abs=1e-6)  # an async save, resumed


def test_the_optimizer_is_fused_adamw():
    from stages.core.config import load_config

    net = Transformer(load_config("tiny").model, 256)
    optimizer = build_optimizer(net, load_config("tiny"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_gpu_bench_smoke_runs_and_reports_every_figure(tmp_path):
    """bench/gpu.py --smoke: the GPU bench's command on CPU (llama-1m, compiled, masking off and on), every figure
    present, so the command is ready for whoever has a GPU."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "CPU"
    assert [(r["preset"], r["masking"]) for r in result["rows"]] == [("llama-1m", False), ("llama-1m", True)]
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["dtype"] == "float32"
        assert set(r["phases_s"]) == {"data", "forward", "backward", "optimizer"}
        assert all(seconds > 0 for seconds in r["phases_s"].values())
        assert sum(r["phases_s"].values()) == pytest.approx(r["step_s"], rel=0.5)
        assert r["planned_memory_mb"] > 0 and r["peak_memory_mb"] > 0 and r["loss"] > 0
    assert "| llama-1m | on |" in done.stdout and "Document masking's cost in tokens/s: llama-1m" in done.stdout
