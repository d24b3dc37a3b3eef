"""Checks that need several ranks, run under torchrun by tests/test_train_gpu_paths.py: `python -m
tests.rank_checks CHECK OVERRIDES_JSON`; each rank prints one `RESULT {json}` line."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from stages.core.config import load_config
from stages.train.metrics import peak_rss_mb
from stages.train.model import Transformer
from stages.train.worker import build_model, setup_distributed

VOCAB = 4096


def init(overrides: dict) -> dict:
    """build_model's start: how much the rank's peak memory grew, against the model's size and the growth of
    building the whole model as before (the control); whether its values are the whole model's for the seed."""
    cfg = load_config("tiny", {"train.device": "cpu", **overrides})
    device, mesh = setup_distributed(cfg)
    warm = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_layers": 1})})
    build_model(warm, VOCAB, device, mesh)  # (FSDP's and DTensor's lazy imports and op tables: not the model's)
    before = peak_rss_mb()
    model = build_model(cfg, VOCAB, device, mesh)
    grown = peak_rss_mb() - before
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()) * 4
    before = peak_rss_mb()
    whole = Transformer(cfg.model, VOCAB)
    whole.init_weights(cfg.train.seed)
    control = peak_rss_mb() - before
    ours, theirs = dict(model.named_parameters()), dict(whole.named_parameters())
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in ours.items()}
    return {
        "rank": dist.get_rank(),
        "grown_mb": grown,
        "control_mb": control,
        "model_mb": sum(p.numel() for p in whole.parameters()) * 4 / 2**20,
        "local_mb": local / 2**20,
        "same_names": list(ours) == list(theirs),
        "same_values": all(torch.equal(full[n], theirs[n].detach()) for n in theirs),
        "tied": model.output.weight is model.tok_embeddings.weight,
    }


def memory(overrides: dict) -> dict:
    """One process's training steps (the trainer's pieces, synthetic tokens): how much its peak memory grew from
    before the model was built, beside the budget planner's figure for the same config."""
    from stages.train import budget
    from stages.train.worker import build_optimizer, compute_dtype, keep_freed_memory, lm_loss

    vocab = overrides.pop("vocab", VOCAB)
    cfg = load_config("tiny", {"train.device": "cpu", "train.nproc_per_node": 1, **overrides})
    device, mesh = setup_distributed(cfg)
    keep_freed_memory()  # (as the trainer does on CPU)
    dtype = compute_dtype(cfg, device)

    def steps(cfg, vocab: int, count: int) -> int:
        t, gen = cfg.train, torch.Generator().manual_seed(0)
        model = build_model(cfg, vocab, device, mesh)
        optimizer = build_optimizer(model, cfg)
        for _ in range(count):
            block = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1), generator=gen)
            lm_loss(model, block, device, None, dtype).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return sum(p.numel() for p in model.parameters())

    # A step of a minimal model first: the runtime's own start (thread pools, allocator arenas, the autograd
    # engine) is then behind the high-water mark, and the growth measured after it is the model's.
    steps(load_config("tiny", {"model.dim": 32, "model.n_layers": 1, "model.n_heads": 2,
                               "train.micro_batch_size": 1, "train.seq_len": 16}), 256, 1)  # fmt: skip
    before = peak_rss_mb()
    params = steps(cfg, vocab, 3)
    return {"grown_mb": peak_rss_mb() - before, "planned": budget.memory_per_gpu(cfg, vocab, 1), "params": params}


if __name__ == "__main__":
    check, overrides = sys.argv[1], json.loads(sys.argv[2])
    result = {"init": init, "memory": memory}[check](overrides)
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
