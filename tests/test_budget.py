"""The compute and cost plan (stages/train/budget.py): its figures follow from the config, and a config that cannot run
is rejected before any work, with the numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stages.core.config import ConfigError, load_config
from stages.tools.preflight import preflight
from stages.train import budget, scaling
from tests.conftest import REPO

# A 56B-parameter model: its state alone needs many GPUs
BIG = [
    "model.dim=8192",
    "model.n_layers=80",
    "model.n_heads=64",
    "model.n_kv_heads=8",
    "tokenizer.vocab_size=128256",
    "train.seq_len=4096",
    "train.micro_batch_size=1",
    "train.max_steps=null",
]


def test_figures_follow_from_the_config(tmp_path):
    cfg = load_config("tiny", {"storage.root": str(tmp_path)})
    est = budget.estimate(cfg)
    vocab = cfg.tokenizer.vocab_size  # (no tokenizer trained under this root yet)
    assert est["params"] == scaling.count_params(cfg.model, vocab)
    assert est["tokens"] == 60 * 16 * 128 and est["steps"] == 60 and est["budget_source"] == "train.max_steps"
    assert est["total_flops"] == est["tokens"] * scaling.flops_per_token(cfg.model, vocab, 128)
    h100, a100 = est["hardware"]
    assert h100["hours"] * 3600 == pytest.approx(est["total_flops"] / (989e12 * 0.40 * 2))
    assert h100["usd"] == pytest.approx(h100["hours"] * 2 * 2.50) and a100["hours"] > 3 * h100["hours"]
    assert est["disk"]["shards"] == est["tokens"] * 4 and est["disk"]["shards_from"] == "the token budget"
    assert est["disk"]["checkpoints"] == 3 * 12 * est["params"]
    assert est["memory"]["state"] == 16 * est["params"] / 2
    text = budget.markdown(est)
    assert "| steps | 60 of 2,048 tokens |" in text and "| H100 SXM 80GB | 2 | 40% |" in text
    # Chinchilla's budget when no length is set: 20 tokens per parameter
    chinchilla = budget.estimate(load_config("tiny", {"storage.root": str(tmp_path), "train.max_steps": None}))
    assert chinchilla["tokens"] >= 20 * chinchilla["params"] > chinchilla["tokens"] - chinchilla["tokens_per_step"]


def test_a_model_that_does_not_fit_is_rejected_before_work_with_the_numbers(tmp_path):
    cfg = load_config("tiny", [f"storage.root={tmp_path}", *BIG])
    with pytest.raises(ConfigError, match=r"GiB per GPU .* over 2 GPUs does not fit H100 SXM 80GB's 72.0 usable"):
        preflight(cfg)
    # sharded over 2 nodes of 8, with activation checkpointing and blocks resharded after forward, it fits
    more = [*BIG, "train.nproc_per_node=8", "train.nnodes=2", "train.rdzv_endpoint=node0:29400"]
    more += ["train.activation_checkpointing=true", "train.reshard_after_forward=true"]
    fits = load_config("tiny", [f"storage.root={tmp_path}", *more])
    est = budget.check(fits)
    assert est["gpus"] == 16 and est["memory"]["total"] < 72 * budget.GIB
    assert est["hardware"][0]["hours"] > 24 * 100  # (and it takes H100s months: the plan says so)


def test_a_batch_larger_than_the_token_budget_is_rejected(tmp_path):
    cfg = load_config("tiny", {"storage.root": str(tmp_path), "train.max_steps": None, "train.max_tokens": 1000})
    with pytest.raises(ConfigError, match=r"one step is 2,048 tokens, more than the whole token budget of 1,000"):
        budget.check(cfg)


def test_command_prints_the_plan_and_fails_on_a_rejected_config(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "stages.tools.budget", "tiny", "--set", f"storage.root={tmp_path}"],
                        capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert ok.returncode == 0 and "| training FLOPs per token | 5,750,784 |" in ok.stdout, ok.stderr
    sets = [arg for item in BIG for arg in ("--set", item)]
    bad = subprocess.run([sys.executable, "-m", "stages.tools.budget", "tiny", *sets], capture_output=True, text=True,
                         cwd=REPO)  # fmt: skip
    assert bad.returncode == 1 and "rejected: model.*/train.*" in bad.stderr


@pytest.mark.parametrize(
    "preset, vocab, micro_batches", [("llama-1m", 4096, (16, 32)), ("llama-10m", 32000, (4, 16))]
)
def test_memory_model_within_a_quarter_of_measured_peaks_on_cpu(preset, vocab, micro_batches):
    """The planner's memory per device against a real process's training steps (the trainer's build_model,
    fused AdamW and lm_loss; fp32, as the CPU computes), each in a fresh process: its peak resident memory's growth
    once the runtime's own start is behind it (tests/rank_checks.py: memory)."""
    import json

    for micro in micro_batches:
        overrides = {"model.preset": preset, "train.micro_batch_size": micro, "train.dtype": "float32", "vocab": vocab}
        done = subprocess.run([sys.executable, "-m", "tests.rank_checks", "memory", json.dumps(overrides)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        found = json.loads(done.stdout.split("RESULT ", 1)[1])
        planned, measured = found["planned"]["total"] / 2**20, found["grown_mb"]
        assert planned == pytest.approx(measured, rel=0.25), (micro, planned, measured, found["planned"])
