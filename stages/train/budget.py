"""The compute and cost plan of a training run, from the config alone: what it will cost before it is paid for.

    python -m stages.tools.budget [PRESET] [--set section.field=value ...]

Every pretrain run shows it as a markdown artifact before its first stage, and `preflight` rejects a config that
cannot run, with the numbers, before any work starts:
- the state per GPU does not fit the planned hardware's memory (`budget.hardware[0]` x `budget.usable_memory`);
- one optimizer step holds more tokens than the whole token budget (max_tokens or Chinchilla's).

What it states (stages/train/scaling.py for parameters, FLOPs and the step count):
- parameters, training FLOPs per token, token budget and where it comes from, steps, total FLOPs;
- per hardware entry: wall time = total FLOPs / (peak x `budget.mfu` x GPUs) and cost = GPU-hours x price. Peaks
  and prices are the config's (data-sheet bf16 peaks; prices an assumption to set);
- memory per GPU under FSDP (estimates, compute in `train.dtype` with fp32 master weights):
  - state: 16 bytes per parameter (fp32 weights, gradients, Adam's two moments), sharded over the GPUs;
  - gathered weights: copies in the compute dtype of every block when `reshard_after_forward` is off, else of
    two blocks (the one computing and the one prefetched);
  - activations per micro-batch: what autograd keeps per token and block (`saved_per_token`: 8.5 dim + 3 kv
    width + 4 ffn width elements, from the model's code; attention scores never stored, as fused SDPA kernels
    and flex_attention keep none) in the compute dtype (`train.dtype`; auto plans bf16), only each block's
    input with activation checkpointing plus one block recomputed; logits, fp32: 12 x seq x batch x vocab
    (three copies at backward's start). Checked against measured peaks on CPU (tests/test_budget.py);
- disk: token shards at 4 bytes per token (the tokenize stage's int32), for the dataset when it exists else for
  the token budget; checkpoints at 12 bytes per parameter (fp32 weights and Adam's moments) times those kept.
"""

from __future__ import annotations

import math

from stages.core.config import ConfigError, PipelineConfig
from stages.train import scaling

GIB = 2**30
STATE_BYTES_PER_PARAM = 16  # fp32 weights, fp32 gradients, Adam's two fp32 moments
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights and the two moments (gradients are not saved)
TOKEN_BYTES = 4  # int32 tokens in the LitData shards (stages/tokenize/stage.py)


def vocab_size(cfg: PipelineConfig) -> int:
    """The vocabulary the model will have: a Hugging Face base model's (train.initial_checkpoint), else a given
    tokenizer's (tokenizer.path: a tokenizer.json or a tokenizer directory), else the size the tokenizer stage trains
    to (byte-level BPE reaches it on any real corpus)."""
    from stages.core import storage
    from stages.tokenizer.bpe import load_given
    from stages.train import pretrained

    start = cfg.train.initial_checkpoint
    if start and pretrained.is_model_directory(start, cfg.storage):
        return pretrained.read_model_config(start, cfg.storage)[1]
    if cfg.tokenizer.path and storage.exists(cfg.tokenizer.path, cfg.storage):
        return load_given(cfg.tokenizer.path, cfg.storage).get_vocab_size()
    return cfg.tokenizer.vocab_size


def saved_per_token(m) -> float:
    """Elements autograd keeps per token in one block (stages/train/model.py), counted from its code and checked
    with saved-tensor hooks: both norms' inputs and outputs (4h), q and k before and after the rotation and v
    (2h + 3 h_kv), attention's output and the copy wo reads (2h), SwiGLU's w1 and w3 outputs, silu's output and
    the product w2 reads (4f), and about 1.5h of small ones (the norms' scales, attention's log-sum-exp, the
    rotation's tables)."""
    kv = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    return 8.5 * m.dim + 3 * kv + 4 * scaling.ffn_hidden_dim(m)


def memory_per_gpu(cfg: PipelineConfig, vocab: int, gpus: int) -> dict[str, float]:
    m, t = cfg.model, cfg.train
    params = scaling.count_params(m, vocab)
    per_layer = scaling.layer_params(m)
    width = 4 if t.dtype == "float32" else 2  # (auto plans for budget.hardware's GPUs: bf16)
    tokens = t.seq_len * t.micro_batch_size
    one_layer = tokens * saved_per_token(m) * width
    if t.activation_checkpointing:  # each block's input kept, one block's activations recomputed at a time
        activations = m.n_layers * tokens * m.dim * width + one_layer
    else:
        activations = m.n_layers * one_layer
    gathered = width * (m.n_layers if not t.reshard_after_forward else min(2, m.n_layers)) * per_layer
    parts = {
        "state": STATE_BYTES_PER_PARAM * params / gpus,
        "gathered weights": gathered if gpus > 1 else 0.0,
        "activations": activations,
        # fp32 at backward's start: log-softmax's output (saved), its gradient and the logits' gradient
        "logits": 3 * 4 * tokens * vocab,
    }
    return {**parts, "total": sum(parts.values())}


def estimate(cfg: PipelineConfig, dataset_tokens: int | None = None) -> dict:
    """The plan's figures. `dataset_tokens`: the tokenized dataset's size when it exists (stages/tools/budget.py
    finds it), which sizes the shards on disk; else they are sized from the token budget."""
    t, b = cfg.train, cfg.budget
    vocab = vocab_size(cfg)
    params = scaling.count_params(cfg.model, vocab)
    per_token = scaling.flops_per_token(cfg.model, vocab, t.seq_len)
    steps, source = scaling.planned_steps(cfg.model, t, vocab)
    per_step = scaling.tokens_per_step(t)
    tokens = steps * per_step
    total_flops = per_token * tokens
    gpus = b.gpus or t.world_size()
    hardware = []
    for hw in b.hardware:
        seconds = total_flops / (hw.peak_tflops * 1e12 * b.mfu * gpus)
        hardware.append(
            {
                "name": hw.name,
                "hours": seconds / 3600,
                "gpu_hours": seconds / 3600 * gpus,
                "usd": seconds / 3600 * gpus * hw.usd_per_gpu_hour,
                "memory_gib": hw.memory_gib,
            }
        )
    data_tokens = dataset_tokens
    kept = t.keep_last or math.ceil(steps / t.checkpoint_every)
    return {
        "params": params,
        "vocab": vocab,
        "flops_per_token": per_token,
        "steps": steps,
        "budget_source": source,
        "tokens_per_step": per_step,
        "tokens": tokens,
        "total_flops": total_flops,
        "gpus": gpus,
        "mfu": b.mfu,
        "hardware": hardware,
        "memory": memory_per_gpu(cfg, vocab, gpus),
        "disk": {
            "shards": (data_tokens if data_tokens is not None else tokens) * TOKEN_BYTES,
            "shards_from": "the tokenized dataset" if data_tokens is not None else "the token budget",
            "checkpoints": kept * CHECKPOINT_BYTES_PER_PARAM * params,
            "checkpoints_kept": kept,
        },
    }


def problems(cfg: PipelineConfig, est: dict) -> list[str]:
    """Why the config cannot run as planned (empty: it can), each with its numbers and the fields to change."""
    found = []
    target = cfg.budget.hardware[0]
    usable = target.memory_gib * cfg.budget.usable_memory * GIB
    memory = est["memory"]
    if memory["total"] > usable:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in memory.items() if k != "total")
        found.append(
            f"model.*/train.*: about {memory['total'] / GIB:.1f} GiB per GPU ({parts} GiB) over {est['gpus']} GPUs "
            f"does not fit {target.name}'s {usable / GIB:.1f} usable GiB (budget.hardware[0]); use more GPUs "
            "(train.nproc_per_node, train.nnodes), a smaller micro_batch_size or activation_checkpointing"
        )
    if cfg.train.max_steps is None:
        budget = int(scaling.token_budget(cfg.model, cfg.train, est["vocab"]))
        if est["tokens_per_step"] > budget:
            found.append(
                f"train.global_batch_size: one step is {est['tokens_per_step']:,} tokens, more than the whole token "
                f"budget of {budget:,} ({est['budget_source']}); lower the batch or raise the budget"
            )
    return found


def check(cfg: PipelineConfig) -> dict:
    """The estimate, or ConfigError naming what does not fit."""
    est = estimate(cfg)
    found = problems(cfg, est)
    if found:
        raise ConfigError("the compute plan rejects this config: " + "; ".join(found))
    return est


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.2g} s"


def markdown(est: dict) -> str:
    mem, disk = est["memory"], est["disk"]
    lines = [
        "| quantity | value |",
        "|---|---:|",
        f"| parameters | {est['params']:,} (vocab {est['vocab']:,}) |",
        f"| training FLOPs per token | {est['flops_per_token']:,} |",
        f"| token budget | {est['tokens']:,} ({est['budget_source']}) |",
        f"| steps | {est['steps']:,} of {est['tokens_per_step']:,} tokens |",
        f"| total training FLOPs | {est['total_flops']:.3g} |",
        f"| memory per GPU (estimate) | {_size(mem['total'])}: state {_size(mem['state'])}, gathered weights "
        f"{_size(mem['gathered weights'])}, activations {_size(mem['activations'])}, logits {_size(mem['logits'])} |",
        f"| disk, token shards | {_size(disk['shards'])} ({disk['shards_from']}) |",
        f"| disk, checkpoints | {_size(disk['checkpoints'])} ({disk['checkpoints_kept']} kept) |",
        "",
        "| hardware | GPUs | MFU (assumed) | wall time | GPU-hours | cost (USD) | memory per GPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for hw in est["hardware"]:
        lines.append(
            f"| {hw['name']} | {est['gpus']} | {est['mfu']:.0%} | {_duration(hw['hours'])} | {hw['gpu_hours']:.3g} | "
            f"{hw['usd']:,.2f} | {hw['memory_gib']:g} GiB |"
        )
    return "\n".join(lines) + "\n"
