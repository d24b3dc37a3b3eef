"""The baseline of bench/train_throughput.py: nanoGPT's training loop around the pipeline's own Transformer.

    torchrun --standalone --nproc_per_node N bench/nanogpt_loop.py CONFIG_JSON STEPS SKIP RESULT_JSON

Deliberately plain, as in nanoGPT's train.py: all training tokens in one array, batches cut at random offsets,
AdamW with the trainer's settings, warmup + cosine, gradient clipping, loss.item() every step. With WORLD_SIZE > 1
the config's train.data_parallel picks DistributedDataParallel (nanoGPT's choice) or FSDP2 (fully_shard per block
and at the root with the config's reshard_after_forward, the trainer's layout). Rank 0 writes the steady-state
tokens/s (of the median step after SKIP) to RESULT_JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from stages.core.config import PipelineConfig
from stages.train import loader as loader_lib
from stages.train.data import tokenizer_vocab_size
from stages.train.model import Transformer


def all_tokens(cfg: PipelineConfig) -> np.ndarray:
    """Every training token, read once through litdata (the files the trainer streams)."""
    dataset = loader_lib.make_dataset(cfg, "train", shuffle=False, block_size=cfg.train.seq_len + 1)
    return np.concatenate([np.asarray(block) for block in dataset])


def main() -> None:
    config_json, steps, skip, result = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = PipelineConfig.model_validate_json(open(config_json).read())
    t = cfg.train
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if ddp else 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(t.seed + rank)

    vocab = tokenizer_vocab_size(cfg)  # (the config's train.data is set by the caller)
    data = torch.from_numpy(all_tokens(cfg).astype(np.int64))
    model = Transformer(cfg.model, vocab)
    model.init_weights(t.seed)
    model.to(device)
    raw = model
    if ddp and t.data_parallel == "ddp":
        model = DistributedDataParallel(model)
    elif ddp:
        for block in model.layers:
            fully_shard(block, reshard_after_forward=t.reshard_after_forward)
        fully_shard(model, reshard_after_forward=t.reshard_after_forward)
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=device.type == "cuda",
    )

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - t.seq_len - 1, (t.micro_batch_size,))
        x = torch.stack([data[i : i + t.seq_len] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + t.seq_len] for i in ix])
        return x.to(device), y.to(device)

    def lr_at(step: int) -> float:
        if t.warmup_steps and step <= t.warmup_steps:
            return t.lr * step / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, steps - t.warmup_steps))
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))

    step_seconds: list[float] = []
    for step in range(1, steps + 1):
        tick = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x, y = get_batch()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if step > skip:
            step_seconds.append(time.perf_counter() - tick)
    world = dist.get_world_size() if ddp else 1
    if rank == 0:
        # the median step: robust to the odd step another process on the machine slows down
        tokens_per_step = t.micro_batch_size * t.seq_len * world
        with open(result, "w") as f:
            json.dump({"tokens_per_s": tokens_per_step / statistics.median(step_seconds)}, f)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
