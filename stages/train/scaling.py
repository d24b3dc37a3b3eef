"""Model size, training FLOPs, token budget and MFU, computed from the config alone (no torch, no weights).

The launcher, the trainer, the benchmarks and run planning all need these numbers before (or without) building a
model, so they are plain arithmetic here; tests check `count_params` against an instantiated model.

FLOPs per token of training (PaLM, appendix B; what torchtitan and nanoGPT report):

    6 * N_matmul + 12 * n_layers * seq_len * dim

- `N_matmul`: parameters that take part in a matrix multiply per token: every attention and feed-forward weight
  plus the output projection (counted even when tied to the embedding: the lookup is free, the projection is
  not); norms and the embedding lookup are left out. Forward is 2 FLOPs per weight and token, backward twice
  that: 6.
- the attention scores (QK^T) and the weighted sum (AV): 2 * 2 * seq_len * dim forward per layer and token, so
  12 * n_layers * seq_len * dim for training, not halved for the causal mask (the convention; kernels that skip
  the masked half do less work than this counts).

MFU = achieved FLOP/s / (peak FLOP/s per device * devices), with the achieved figure = FLOPs per token * tokens/s.
Peaks are dense bf16 tensor-core figures from the vendors' data sheets; a CPU has no such table entry, so on CPU
only achieved FLOP/s is reported. Activation checkpointing recomputes the forward: its extra work is not counted,
so MFU stays comparable across settings (what PaLM calls MFU as opposed to HFU).

Token budget when `train.max_steps` and `train.max_tokens` are unset: Chinchilla's tokens = k * parameters
(Hoffmann et al. 2022, k about 20), parameters counted in full, embeddings included.
"""

from __future__ import annotations

import math

from stages.core.config import ModelConfig, TrainConfig

# Dense bf16 peak FLOP/s per device, matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def model_shape(cfg: ModelConfig) -> str:
    """The resolved model in a few words, as training announces it (a preset by override shows what it gave)."""
    preset = f"preset {cfg.preset}: " if cfg.preset else ""
    return (
        f"{preset}dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads or cfg.n_heads} KV heads, "
        f"feed-forward {ffn_hidden_dim(cfg)}"
    )


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(2 * (4 * cfg.dim) / 3)
    return cfg.ffn_multiple_of * math.ceil(hidden / cfg.ffn_multiple_of)


def _layer_matmul_params(cfg: ModelConfig) -> int:
    head_dim = cfg.dim // cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    attention = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv  # wq, wo; wk, wv
    return attention + 3 * cfg.dim * ffn_hidden_dim(cfg)


def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: its weights and its two norms."""
    return _layer_matmul_params(cfg) + 2 * cfg.dim


def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of `stages.model.Transformer(cfg, vocab_size)`, a tied output projection counted once."""
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    embedding = vocab_size * cfg.dim
    output = 0 if cfg.tie_embeddings else vocab_size * cfg.dim
    return embedding + cfg.n_layers * _layer_matmul_params(cfg) + norms + output


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6 * N_matmul + 12 * n_layers * seq_len * dim."""
    n_matmul = cfg.n_layers * _layer_matmul_params(cfg) + vocab_size * cfg.dim
    return 6 * n_matmul + 12 * cfg.n_layers * seq_len * cfg.dim


def tokens_per_step(train: TrainConfig) -> int:
    return train.global_batch() * train.seq_len


def planned_steps(model: ModelConfig, train: TrainConfig, vocab_size: int) -> tuple[int, str]:
    """Optimizer steps of the run and where the number comes from."""
    if train.max_steps is not None:
        return train.max_steps, "train.max_steps"
    steps = max(1, math.ceil(token_budget(model, train, vocab_size) / tokens_per_step(train)))
    if train.max_tokens is not None:
        return steps, f"train.max_tokens {train.max_tokens:,}"
    return steps, f"Chinchilla: {train.chinchilla_multiplier:g} x {count_params(model, vocab_size):,} parameters"


def token_budget(model: ModelConfig, train: TrainConfig, vocab_size: int) -> float:
    """Tokens the run is to see when its length is not given in steps: max_tokens, else Chinchilla's k x N."""
    if train.max_tokens is not None:
        return train.max_tokens
    return train.chinchilla_multiplier * count_params(model, vocab_size)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (a CPU, an unlisted GPU)."""
    if not device_name:
        return None
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None
