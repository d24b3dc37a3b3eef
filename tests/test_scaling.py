"""Model presets, parameter and FLOP counts, the token budget and the training config's consistency checks."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from stages.core.config import MODEL_PRESET_DIR, ConfigError, load_config
from stages.core.presets import CONFIG_PATH_ENV
from stages.train import scaling
from stages.train.model import Transformer

PRESETS = {"llama-1m": (4096, 1e6), "llama-10m": (32000, 1e7), "llama-100m": (32000, 1e8), "llama-1b": (128256, 1e9)}


@pytest.fixture(autouse=True)
def _presets_in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path))  # (a preset by path must be inside an allowed directory)


def preset_config(tmp_path, name: str, **model):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({"ingest": {"inputs": ["x"]}, "model": {"preset": name, **model}}))
    return load_config(path)


def test_every_preset_file_is_listed():
    assert sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_the_model(tmp_path, name):
    vocab, nominal = PRESETS[name]
    cfg = preset_config(tmp_path, name)
    with torch.device("meta"):  # no memory for the weights, even at 1B
        model = Transformer(cfg.model, vocab)
    counted = scaling.count_params(cfg.model, vocab)
    assert counted == model.num_params()
    assert nominal * 0.75 < counted < nominal * 1.5, f"{name}: {counted:,} parameters"

    # FLOPs per token from the definition: 6 x every matmul weight (the tied output projection included) plus the
    # attention's 12 x layers x seq_len x dim.
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    seq_len = 256
    assert scaling.flops_per_token(cfg.model, vocab, seq_len) == 6 * matmul + 12 * cfg.model.n_layers * seq_len * (
        cfg.model.dim
    )


def test_fields_given_beside_a_preset_win(tmp_path):
    cfg = preset_config(tmp_path, "llama-100m", n_layers=3)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (768, 3, 4)
    missing = r"model\.preset 'llama-7t': no such file .*llama-7t.yaml \(known in .*: llama-100m"
    with pytest.raises(ConfigError, match=missing):
        preset_config(tmp_path, "llama-7t")


def test_token_budget_order_max_steps_max_tokens_chinchilla():
    cfg = load_config("tiny", {"train.max_steps": None, "train.global_batch_size": 32})
    per_step = 32 * cfg.train.seq_len
    params = scaling.count_params(cfg.model, 4096)
    steps, why = scaling.planned_steps(cfg.model, cfg.train, 4096)
    assert steps == math.ceil(20 * params / per_step) and why.startswith("Chinchilla: 20 x")
    cfg.train.chinchilla_multiplier = 5
    assert scaling.planned_steps(cfg.model, cfg.train, 4096)[0] == math.ceil(5 * params / per_step)
    cfg.train.max_tokens = 10 * per_step + 1
    assert scaling.planned_steps(cfg.model, cfg.train, 4096) == (11, f"train.max_tokens {10 * per_step + 1:,}")
    assert scaling.planned_steps(load_config("tiny").model, load_config("tiny").train, 4096) == (60, "train.max_steps")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.max_tokens": 1000}, "set max_steps or max_tokens, not both"),
        ({"train.global_batch_size": 20}, "global_batch_size 20 is not a multiple of micro_batch_size 8 x 2"),
        ({"train.nnodes": 2}, "nnodes > 1 needs rdzv_endpoint"),
        ({"train.grad_spike_factor": 0.5}, "train.grad_spike_factor"),
    ],
)
def test_inconsistent_training_config_fails_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_gradient_accumulation_reaches_the_global_batch():
    cfg = load_config("tiny", {"train.global_batch_size": 64})
    assert (cfg.train.global_batch(), cfg.train.grad_accum_steps()) == (64, 4)
    assert load_config("tiny").train.grad_accum_steps() == 1


def test_peak_flops_table():
    assert scaling.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert scaling.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert scaling.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert scaling.peak_flops(None) is None and scaling.peak_flops("Some Future GPU") is None
