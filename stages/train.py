"""Per-rank training entry point: `python -m stages.train --config-json FILE`, run under torchrun.

One file, torchtitan's shape at nanoGPT's size:
- process group: NCCL on CUDA, gloo on CPU (`train.device`: auto | cpu | cuda); a 1-D device mesh;
- model: `stages.model.Transformer` built with a fixed seed on every rank, then FSDP2 `fully_shard` on each
  block and on the root (bf16 parameters with fp32 gradient reduction on CUDA, fp32 on CPU);
- data: stages/loader.py, litdata's StreamingDataLoader over `{root}/tokens/train` in blocks of seq_len + 1
  tokens, split per rank by litdata, reshuffled every epoch; epochs repeat until `max_steps`;
- AdamW (weight decay on matrices only), linear warmup then cosine decay to `min_lr`, gradient clipping;
- checkpoints with torch.distributed.checkpoint (DCP) to `{root}/checkpoints/step-NNNNNN`: sharded model and
  optimizer, step counters and each rank's data-loader position. `meta.json` is written last by rank 0 and is
  the completion marker: a checkpoint folder without it is ignored (and overwritten), so a crash during a save
  never resumes from half a checkpoint. On start the latest complete checkpoint (not beyond max_steps) is
  loaded, so re-running the same command resumes where the last run stopped.
- observability: rank 0 prints `METRIC {json}` per step and `SUMMARY {json}` at the end (parsed by
  `stages.launch`) and keeps `{root}/checkpoints/metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from stages import loader as loader_lib
from stages import storage
from stages.checkpoints import META, checkpoint_uri, checkpoints_uri, complete_checkpoints, dcp_reader, dcp_writer
from stages.config import PipelineConfig
from stages.launch import METRIC_PREFIX, SUMMARY_PREFIX, run_digest, tokens_manifest_digest
from stages.model import Transformer

METRICS = "metrics.jsonl"
VAL_BATCHES = 4  # validation batches per rank (of micro_batch_size sequences)


def log(msg: str) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"[train] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: PipelineConfig) -> tuple[torch.device, Any]:
    if "RANK" not in os.environ:  # plain `python -m stages.train`: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return device, mesh


def make_deterministic(seed: int, device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)
    # warn_only: an op without a deterministic kernel (some CUDA attention backwards) warns instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------------------------------------------
# model and optimizer


def build_model(cfg: PipelineConfig, vocab_size: int, device: torch.device, mesh) -> Transformer:
    # Every rank builds the same full model from the same seed, then keeps only its shard. Fine at the sizes this
    # pipeline trains on CPU; a multi-billion model would be built on the meta device instead.
    model = Transformer(cfg.model, vocab_size)
    model.init_weights(cfg.train.seed)
    model.to(device)
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 on CPU
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_optimizer(model: torch.nn.Module, cfg: PipelineConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8, foreach=device.type == "cuda")


def lr_at(step: int, cfg: PipelineConfig) -> float:
    """Learning rate for (1-based) `step`: linear warmup, then cosine from lr to min_lr at max_steps."""
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


# ---------------------------------------------------------------------------------------------------------------
# data


def load_val_batches(cfg: PipelineConfig, device: torch.device) -> list[torch.Tensor]:
    """A few validation batches, identical in count on every rank (FSDP forwards are collectives)."""
    uri = loader_lib.dataset_uri(cfg, "val")
    if not storage.exists(storage.join(uri, loader_lib.INDEX), cfg.storage):
        log(f"no validation data at {uri}: val_loss is not computed")
        return []
    loader = loader_lib.make_loader(cfg, "val", batch_size=1, shuffle=False)
    items: list[torch.Tensor] = []
    want = VAL_BATCHES * cfg.train.micro_batch_size
    for item in loader:
        items.append(item[0])
        if len(items) >= want:
            break
    count = torch.tensor([len(items) // cfg.train.micro_batch_size], device=device)  # NCCL needs device tensors
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    n = int(count.item()) * cfg.train.micro_batch_size
    stacked = torch.stack(items[:n]) if n else torch.empty(0)
    return list(stacked.split(cfg.train.micro_batch_size)) if n else []


# ---------------------------------------------------------------------------------------------------------------
# loss


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, dtype=torch.long, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float | None:
    if not batches:
        return None
    model.eval()
    total = 0.0
    for batch in batches:
        total += lm_loss(model, batch, device).item()
    model.train()
    return mean_over_ranks(total / len(batches), device)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _loader_key(rank: int) -> str:
    return f"rank{rank}"


def save_checkpoint(step: int, model, optimizer, loader, train_state: dict, meta: dict, cfg: PipelineConfig) -> str:
    uri = checkpoint_uri(cfg, step)
    rank = dist.get_rank()
    if rank == 0 and storage.exists(uri, cfg.storage):
        storage.remove(uri, cfg.storage)  # an incomplete earlier attempt (no meta.json) or a stale folder
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {
        "model": model_sd,
        "optim": optim_sd,
        "train": dict(train_state),
        # Each rank's loader position under its own key (DCP keeps one copy of identical non-tensor keys).
        "loader": {_loader_key(rank): pickle.dumps(loader.state_dict())},
    }
    dcp.save(state, storage_writer=dcp_writer(uri, cfg.storage))  # returns on every rank once .metadata is written
    if rank == 0:
        storage.write_json(storage.join(uri, META), meta, cfg.storage)  # the completion marker, last
    dist.barrier()
    return uri


def load_checkpoint(uri: str, model, optimizer, loader, cfg: PipelineConfig) -> dict:
    rank = dist.get_rank()
    reader = dcp_reader(uri, cfg.storage)
    saved_keys = set(reader.read_metadata().state_dict_metadata)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "train": {"step": 0, "tokens_seen": 0}}
    key = _loader_key(rank)
    if f"loader.{key}" not in saved_keys and f"loader.{_loader_key(0)}" in saved_keys:
        key = _loader_key(0)  # a different world size now: litdata restripes from any rank's (global) state
    has_loader = f"loader.{key}" in saved_keys
    if has_loader:
        state["loader"] = {key: b""}
    dcp.load(state, storage_reader=dcp_reader(uri, cfg.storage))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if has_loader:
        loader.load_state_dict(pickle.loads(state["loader"][key]))
    else:
        log(f"{uri} has no data-loader state: the data order restarts")
    return state["train"]


# ---------------------------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """Rank 0's metrics.jsonl: one line per step, appended as they happen on a local disk; an object store has no
    append, so there the file is rewritten at each checkpoint and at the end. On start, lines after the step
    being resumed from (left by a run that crashed after its last checkpoint) are dropped."""

    def __init__(self, cfg: PipelineConfig, start_step: int):
        self.cfg = cfg
        self.uri = storage.join(checkpoints_uri(cfg), METRICS)
        self.remote = storage.is_remote(self.uri)
        self.lines: list[str] = []
        if storage.exists(self.uri, cfg.storage) and start_step > 0:
            with storage.open_uri(self.uri, "r", cfg.storage) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= start_step:
                            self.lines.append(line.rstrip("\n"))
                    except (ValueError, KeyError, TypeError):
                        continue
        self.flush()
        self._fh = None
        if not self.remote:
            self._fh = open(storage.filesystem(self.uri)[1], "a")

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self._fh:
            self._fh.write(line + "\n")
            self._fh.flush()

    def flush(self) -> None:
        if self.remote or not getattr(self, "_fh", None):
            with storage.atomic_write(self.uri, self.cfg.storage, "w") as f:
                f.write("".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        else:
            self.flush()


def emit(prefix: str, record: dict) -> None:
    print(prefix + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# main


def load_tokenizer_vocab(cfg: PipelineConfig) -> tuple[int, str]:
    from tokenizers import Tokenizer

    uri = storage.join(cfg.storage.root, "tokenizer", "tokenizer.json")
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        tok = Tokenizer.from_str(f.read().decode("utf-8"))
    return tok.get_vocab_size(), uri


def train(cfg: PipelineConfig) -> dict:
    t = cfg.train
    device, mesh = setup_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    make_deterministic(t.seed, device)
    log(f"world={world} device={device.type} backend={dist.get_backend()}")

    vocab_size, tokenizer_uri = load_tokenizer_vocab(cfg)
    model = build_model(cfg, vocab_size, device, mesh)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg, device)
    log(f"model: {n_params:,} parameters, vocab {vocab_size}")

    loader = loader_lib.make_loader(
        cfg, "train", batch_size=t.micro_batch_size, shuffle=True, num_workers=t.loader_workers
    )
    val_batches = load_val_batches(cfg, device)

    # Resume from the latest complete checkpoint not beyond max_steps; rank 0 decides for everyone.
    choice = [None]
    if rank == 0:
        found = [c for c in complete_checkpoints(cfg.storage.root, cfg.storage) if c[0] <= t.max_steps]
        choice = [found[-1] if found else None]
    dist.broadcast_object_list(choice, src=0)
    step, tokens_seen, resumed_from = 0, 0, None
    if choice[0] is not None:
        resumed_from = choice[0][1]
        state = load_checkpoint(resumed_from, model, optimizer, loader, cfg)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        log(f"resumed from {resumed_from} at step {step}")
    start_step = step

    tokens_digest = tokens_manifest_digest(cfg)
    digest = run_digest(cfg, tokens_digest)
    metrics = MetricsLog(cfg, start_step) if rank == 0 else None
    batches = loader_lib.Batches(loader, t.micro_batch_size, log)
    tokens_per_step = t.micro_batch_size * t.seq_len * world

    first_loss = final_loss = val_loss = None
    last_ckpt = resumed_from
    started = time.time()
    train_seconds = 0.0
    model.train()
    while step < t.max_steps:
        tick = time.time()
        step += 1
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batches.next()
        loss = lm_loss(model, batch, device)
        loss.backward()
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = mean_over_ranks(loss.detach().item(), device)
        tokens_seen += tokens_per_step
        dt = time.time() - tick
        train_seconds += dt
        first_loss = loss_value if first_loss is None else first_loss
        final_loss = loss_value
        if rank == 0:
            record = {
                "step": step,
                "loss": round(loss_value, 6),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens_per_s": round(tokens_per_step / dt, 1),
                "elapsed": round(time.time() - started, 3),
                "tokens_seen": tokens_seen,
            }
            metrics.append(record)
            emit(METRIC_PREFIX, record)

        if step % t.checkpoint_every == 0 or step == t.max_steps:
            val_loss = evaluate(model, val_batches, device)
            meta = {
                "step": step,
                "tokens_seen": tokens_seen,
                "train_loss": final_loss,
                "val_loss": val_loss,
                "model": cfg.model.model_dump(),
                "vocab_size": vocab_size,
                "tokenizer_uri": tokenizer_uri,
                "run_digest": digest,
                "tokens_digest": tokens_digest,
                "world_size": world,
                "seq_len": t.seq_len,
            }
            if step == t.max_steps:
                meta["summary"] = _summary(
                    step,
                    first_loss,
                    final_loss,
                    val_loss,
                    tokens_seen,
                    (step - start_step) * tokens_per_step,
                    train_seconds,
                    checkpoint_uri(cfg, step),
                    n_params,
                    start_step,
                )
            last_ckpt = save_checkpoint(
                step, model, optimizer, loader, {"step": step, "tokens_seen": tokens_seen}, meta, cfg
            )
            if metrics:
                metrics.flush()
            log(f"checkpoint {last_ckpt} (val_loss {val_loss})")

    if start_step >= t.max_steps:  # nothing left to do: report what the checkpoint holds
        val_loss = evaluate(model, val_batches, device)
    summary = _summary(
        step,
        first_loss,
        final_loss,
        val_loss,
        tokens_seen,
        (step - start_step) * tokens_per_step,
        train_seconds,
        last_ckpt,
        n_params,
        start_step,
    )
    if rank == 0:
        metrics.close()
        emit(SUMMARY_PREFIX, summary)
    dist.barrier()
    return summary


def _summary(
    step, first_loss, final_loss, val_loss, tokens_seen, tokens_this_run, seconds, ckpt, n_params, start_step
) -> dict:
    return {
        "steps": step,
        "start_step": start_step,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "val_loss": val_loss,
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_this_run / seconds, 1) if seconds > 0 else None,
        "checkpoint": ckpt,
        "params": n_params,
    }


@record  # torchrun's failure summary then carries the exception instead of "To enable traceback see ..."
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-json", required=True, help="file holding PipelineConfig as JSON")
    args = parser.parse_args(argv)
    with open(args.config_json) as f:
        cfg = PipelineConfig.model_validate_json(f.read())
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
