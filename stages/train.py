"""Per-rank training entry point: `python -m stages.train --config-json FILE`, run under torchrun.

One file, torchtitan's shape at nanoGPT's size:
- process group: NCCL on CUDA, gloo on CPU (`train.device`: auto | cpu | cuda); a 1-D device mesh;
- model: `stages.model.Transformer` built with a fixed seed on every rank, optionally compiled and with activation
  checkpointing per block, then (`data_parallel: fsdp`) FSDP2 `fully_shard` on each block and on the root (bf16
  parameters with fp32 gradient reduction on CUDA, fp32 on CPU) or (`ddp`) DistributedDataParallel, whose
  bucketed all-reduce overlaps backward and beats per-block gathers when the model fits one device;
- data: stages/loader.py, litdata's StreamingDataLoader over `{root}/tokens/train` in blocks of seq_len + 1
  tokens, split per rank by litdata, reshuffled every epoch; epochs repeat until the run's last step. Or
  (`train.mixture`) several such datasets drawn from by weight block by block (stages/mixture.py), with tokens
  and epochs per source in the metrics and a source capped by max_epochs either dropped from the draws or ending
  the run at its last full step (its checkpoint is then the final one, `data_exhausted` in its meta.json);
- steps: `global_batch_size` sequences per optimizer step through gradient accumulation (FSDP2 reduces gradients
  on the last micro-batch only, as does DDP); the run's length from max_steps, max_tokens or the Chinchilla multiplier
  (stages/scaling.py); AdamW (weight decay on matrices only), LambdaLR with linear warmup then cosine decay to
  `min_lr`, gradient clipping;
- a guard: a loss or gradient norm that is not finite, or a gradient norm beyond `grad_spike_factor` x the recent
  median, stops the run before the optimizer step with an error naming the step; checkpoints already written
  stay, and no later one is written;
- checkpoints with torch.distributed.checkpoint (DCP) to `{root}/checkpoints/step-NNNNNN`: sharded model and
  optimizer, scheduler, step, tokens seen, the guard's history, and per rank the RNG states and the data-loader
  position. `meta.json` is written last by rank 0 and is the completion marker: a folder without it is ignored
  (and overwritten), so a crash during a save never resumes from half a checkpoint. Saves can run in the
  background (`async_checkpoint`: DCP async_save on its own gloo group, meta.json once it has finished); the
  newest `keep_last` complete checkpoints are kept. DCP reshards on load: a checkpoint of N ranks loads on M.
- start: `resume: auto` loads the latest complete checkpoint (not beyond the last step), `none` starts fresh, a
  URI loads that checkpoint; otherwise `initial_checkpoint` gives starting weights only (continued pretraining);
- observability: rank 0 prints `METRIC {json}` per step (loss, lr, grad norm, tokens/s, FLOP/s, MFU on known
  GPUs, peak memory, validation loss every `val_every` steps) and `SUMMARY {json}` at the end (parsed by
  `stages.launch`) and keeps `{root}/checkpoints/metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import resource
import socket
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from stages import loader as loader_lib
from stages import scaling, storage
from stages.checkpoints import META, METRICS, complete_checkpoints, dcp_reader, dcp_writer, step_uri
from stages.config import PipelineConfig
from stages.launch import (
    LAUNCHER_PID_ENV,
    METRIC_PREFIX,
    SUMMARY_PREFIX,
    mixture_sources,
    run_identity,
    run_uri,
    tokenizer_uri,
    tokenizer_vocab_size,
)
from stages.mixture import DataExhausted, Mixture, Source
from stages.model import Transformer, document_ids
from stages.parallel import process_alive


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm went bad; the message names the step."""


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


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    Each CPU step allocates and frees the same large tensors (the logits and their gradient: batch x seq_len x
    vocab floats). By default glibc serves blocks that large with mmap and returns them on free, or trims the heap,
    so every step faults its pages in again, zero-filled by the kernel. 300 steps of the tiny preset on one process:
    2.8M minor faults and 23.1 s by default; 0.12M and 19.2 s with the thresholds raised here (what
    `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` in the environment would do; set here so every launcher
    gets it). The cost: memory freed at the top of the heap stays with the process, which holds its peak anyway.
    glibc caps the mmap threshold at 32 MiB on 64-bit: larger blocks are still mapped. Returns False where the C
    library has no mallopt (musl, macOS), which changes nothing but speed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def make_deterministic(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        # warn_only: an op without a deterministic kernel (some attention backwards) warns instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=True)
    # On CPU the kernels this model uses already give the same bits for the same inputs and thread count (the
    # SIGKILL-resume test compares weights bit for bit); the flag would only switch some, such as the embedding's
    # backward, to slower variants (about 8% of a step for the tiny model).


# ---------------------------------------------------------------------------------------------------------------
# model and optimizer


def build_model(cfg: PipelineConfig, vocab_size: int, device: torch.device, mesh) -> Transformer:
    # Every rank builds the same full model from the same seed, then keeps only its shard. Fine at the sizes this
    # pipeline trains on CPU; a multi-billion model would be built on the meta device instead.
    t = cfg.train
    model = Transformer(cfg.model, vocab_size)
    model.init_weights(t.seed)
    model.to(device)
    model.checkpoint_activations = t.activation_checkpointing
    if t.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names, and so checkpoints, stay the same
    if mesh.size() == 1:
        # One process has nothing to shard: FSDP would only add its hooks and copies. bf16 autocast on CUDA
        # stands in for its mixed-precision policy (see lm_loss); DCP checkpoints load either way.
        return model
    if t.data_parallel == "ddp":
        # bf16 autocast on CUDA as for one process; gradients are reduced in fp32 buckets.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()  # fp32 on CPU
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients across ranks only when `sync` (the step's last micro-batch): accumulation stays local."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: PipelineConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each parameter for all of Adam's updates, torchtitan's default) on CPU too, where
    # torch >= 2.4 has it: a tiny model's step spends about 3% of its time in the per-tensor loop it replaces.
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def lr_at(step: int, cfg: PipelineConfig, max_steps: int) -> float:
    """Learning rate for (1-based) `step`: linear warmup, then cosine from lr to min_lr at max_steps."""
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(1, max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: PipelineConfig, max_steps: int):
    # LambdaLR's epoch counts finished optimizer steps: after k of them the next step is k + 1.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_at(k + 1, cfg, max_steps) / cfg.train.lr)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


class DivergenceGuard:
    """Stops a run whose loss or gradient norm is not finite, or whose gradient norm spikes.

    Every rank sees the same all-reduced loss and the same global gradient norm, so all raise together (no rank is
    left waiting in a collective). The history travels in checkpoints so a resumed run judges as the original.
    """

    WINDOW = 20
    MIN_HISTORY = 3

    def __init__(self, factor: float | None, warmup_steps: int, history: list[float] | None = None):
        self.factor = factor
        self.warmup_steps = warmup_steps
        self.history = list(history or [])[-self.WINDOW :]

    def check(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> None:
        where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else "; no checkpoint was written"
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise TrainingDiverged(f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite{where}")
        if self.factor and step > self.warmup_steps and len(self.history) >= self.MIN_HISTORY:
            median = statistics.median(self.history)
            if grad_norm > self.factor * median:
                raise TrainingDiverged(
                    f"step {step}: gradient norm {grad_norm:.4g} is {grad_norm / median:.1f}x the median "
                    f"{median:.4g} of the last {len(self.history)} steps (train.grad_spike_factor "
                    f"{self.factor:g}){where}"
                )
        self.history = (self.history + [grad_norm])[-self.WINDOW :]


# ---------------------------------------------------------------------------------------------------------------
# data


def load_val_batches(cfg: PipelineConfig, device: torch.device, data: str | None = None) -> list[torch.Tensor]:
    """A few validation batches of the run's dataset (or `data`), identical in count on every rank (FSDP forwards
    are collectives)."""
    uri = loader_lib.dataset_uri(cfg, "val", data)
    if not storage.exists(storage.join(uri, loader_lib.INDEX), cfg.storage):
        log(f"no validation data at {uri}: val_loss is not computed")
        return []
    loader = loader_lib.make_loader(cfg, "val", batch_size=1, shuffle=False, data=data)
    items: list[torch.Tensor] = []
    want = cfg.train.val_batches * cfg.train.micro_batch_size
    for item in loader:
        items.append(item[0])
        if len(items) >= want:
            break
    count = torch.tensor([len(items) // cfg.train.micro_batch_size], device=device)  # NCCL needs device tensors
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    n = int(count.item()) * cfg.train.micro_batch_size
    stacked = torch.stack(items[:n]) if n else torch.empty(0)
    return list(stacked.split(cfg.train.micro_batch_size)) if n else []


def make_reader(cfg: PipelineConfig, device: torch.device):
    """What the trainer's batches come from: the run's dataset (`loader.Epochs`), or a `Mixture` of the sources of
    train.mixture (one loader each, a block per draw)."""
    t = cfg.train
    if not t.mixture:
        loader = loader_lib.make_loader(
            cfg, "train", batch_size=t.micro_batch_size, shuffle=True, num_workers=t.loader_workers
        )
        return loader_lib.Epochs(loader, t.micro_batch_size, log)
    sources = []
    for spec, (_, uri) in zip(t.mixture.sources, mixture_sources(cfg)):
        loader = loader_lib.make_loader(cfg, "train", 1, shuffle=True, num_workers=t.loader_workers, data=uri)
        digest = loader_lib.index_digest(cfg, "train", uri)
        sources.append(Source(spec.name, spec.weight, loader, spec.max_epochs, digest))
    mixture = Mixture(sources, t.micro_batch_size, t.seed, t.mixture.on_exhausted, log)

    def smallest(counts: list[int]) -> list[int]:
        tensor = torch.tensor(counts, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return [int(x) for x in tensor.tolist()]

    mixture.agree_epoch_blocks(smallest)
    total = sum(s.weight for s in sources)
    for s in sources:
        cap = f"max_epochs {s.max_epochs:g}" if s.max_epochs is not None else "repeats without a cap"
        log(
            f"data: source {s.name}: weight {s.weight / total:.3f}, {s.epoch_blocks:,} blocks per rank and epoch, {cap}"
        )
    return mixture


def validation_sets(cfg: PipelineConfig, device: torch.device) -> list[tuple[str | None, float, list]]:
    """(source, weight, batches) to validate on: the run's dataset, or each mixture source's val split."""
    if not cfg.train.mixture:
        return [(None, 1.0, load_val_batches(cfg, device))]
    return [
        (spec.name, spec.weight, load_val_batches(cfg, device, uri))
        for spec, (_, uri) in zip(cfg.train.mixture.sources, mixture_sources(cfg))
    ]


def evaluate_sets(model, sets, device: torch.device, eos_id: int | None) -> tuple[float | None, dict | None]:
    """The validation loss (over a mixture: the weighted mean of its sources') and, for a mixture, each source's."""
    losses = {name: (weight, evaluate(model, batches, device, eos_id)) for name, weight, batches in sets}
    scored = [(w, loss) for w, loss in losses.values() if loss is not None]
    mean = sum(w * loss for w, loss in scored) / sum(w for w, _ in scored) if scored else None
    by_source = {name: round(loss, 6) for name, (_, loss) in losses.items() if name and loss is not None}
    return mean, by_source or None


def source_counts(mixture: Mixture, state: dict, world: int, seq_len: int) -> dict[str, dict]:
    """Per source over all ranks (they draw alike): tokens trained on, epochs over it, exhausted or not."""
    counts = mixture.counts(state)
    return {
        name: {"tokens": c["blocks"] * world * seq_len, "epochs": c["epochs"], "exhausted": c["exhausted"]}
        for name, c in counts.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# loss


def lm_loss(
    model: torch.nn.Module, batch: torch.Tensor, device: torch.device, eos_id: int | None = None
) -> torch.Tensor:
    """Mean next-token loss of a batch of blocks; with `eos_id`, each document in a block is computed apart."""
    batch = batch.to(device, dtype=torch.long, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    doc_ids = document_ids(inputs, eos_id) if eos_id is not None else None
    # bf16 on CUDA: FSDP's mixed-precision policy casts sharded models; a single unsharded process autocasts.
    autocast = device.type == "cuda" and not isinstance(model, FSDPModule)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs, doc_ids=doc_ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, eos_id: int | None = None
) -> float | None:
    if not batches:
        return None
    model.eval()
    total = 0.0
    for batch in batches:
        total += lm_loss(model, batch, device, eos_id).item()
    model.train()
    return mean_over_ranks(total / len(batches), device)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _rank_key(rank: int) -> str:
    return f"rank{rank}"


def rng_state(device: torch.device) -> bytes:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return pickle.dumps(state)


def set_rng_state(blob: bytes, device: torch.device) -> None:
    state = pickle.loads(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves and loads DCP checkpoints; `meta.json`, written last by rank 0, marks one complete.

    Each rank's data-loader position and RNG states go under keys of their own (DCP keeps a single copy of a
    non-tensor value that every rank saves under the same key). With `async_checkpoint`, DCP stages the state
    in memory and writes it in a background thread over a gloo group of its own (so its collectives never
    interleave with training's); rank 0 writes meta.json once its save has finished, which for DCP's
    coordinator means every rank's data and the global metadata are written.
    """

    def __init__(self, cfg: PipelineConfig, run: str, device: torch.device, data_index: str):
        self.cfg = cfg
        self.run = run
        self.device = device
        self.data_index = data_index  # index_digest of the training data, recorded in every meta.json
        self.rank = dist.get_rank()
        self.pending: tuple[Any, str, dict] | None = None
        self.group = dist.new_group(backend="gloo") if cfg.train.async_checkpoint else None
        self.last_complete: str | None = None

    def save(self, step: int, model, optimizer, scheduler, batches, guard, train_state: dict, meta: dict) -> str:
        self.wait()
        uri = step_uri(self.run, step)
        if self.rank == 0 and storage.exists(uri, self.cfg.storage):
            storage.remove(uri, self.cfg.storage)  # an incomplete earlier attempt (no meta.json) or a stale folder
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        key = _rank_key(self.rank)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "train": {
                **train_state,
                "scheduler": pickle.dumps(scheduler.state_dict()),
                "guard": pickle.dumps(guard.history),
            },
            "loader": {key: pickle.dumps(batches.state_dict())},
            "rng": {key: rng_state(self.device)},
        }
        writer = dcp_writer(uri, self.cfg.storage)
        if self.group is not None:
            self.pending = (dcp.async_save(state, storage_writer=writer, process_group=self.group), uri, meta)
        else:
            dcp.save(state, storage_writer=writer)  # returns on every rank once .metadata is written
            self._commit(uri, meta)
        return uri

    def poll(self) -> None:
        """Commit a finished background save without waiting for one still running."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, uri, meta = self.pending
        self.pending = None
        future.result()
        self._commit(uri, meta)

    def _commit(self, uri: str, meta: dict) -> None:
        self.last_complete = uri
        if self.rank != 0:
            return
        storage.write_json(storage.join(uri, META), meta, self.cfg.storage)  # the completion marker, last
        log(f"checkpoint {uri} (val_loss {meta.get('val_loss')})")
        keep = self.cfg.train.keep_last
        if keep:
            for _, old in complete_checkpoints(self.run, self.cfg.storage)[:-keep]:
                if old != uri:
                    storage.remove(old, self.cfg.storage)

    def load(self, uri: str, model, optimizer, scheduler, reader, guard) -> dict:
        """Everything a resumed run needs; from a run with another world size, what DCP can reshard."""
        ckpt_reader = dcp_reader(uri, self.cfg.storage)
        saved = set(ckpt_reader.read_metadata().state_dict_metadata)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        train_state = {"step": 0, "tokens_seen": 0, "scheduler": b"", "guard": b""}
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "train": train_state}
        key = _rank_key(self.rank)
        loader_key = key if f"loader.{key}" in saved else _rank_key(0)
        if f"loader.{loader_key}" in saved:
            # from another world size any rank's state will do: litdata's is global and restripes itself
            state["loader"] = {loader_key: b""}
        if f"rng.{key}" in saved:
            state["rng"] = {key: b""}
        dcp.load(state, storage_reader=ckpt_reader)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(pickle.loads(state["train"]["scheduler"]))
        guard.history = pickle.loads(state["train"]["guard"])
        reader_state = pickle.loads(state["loader"][loader_key]) if "loader" in state else None
        if reader_state is not None and isinstance(reader, Mixture) == ("sources" in reader_state):
            meta = storage.read_json(storage.join(uri, META), self.cfg.storage)
            if isinstance(reader, Mixture):  # (each source checks its own data's digest)
                reader.load_state_dict(reader_state, meta.get("world_size"))
            else:
                same_data = meta.get("tokens_index_sha256") == self.data_index  # perhaps at another URI
                loader_lib.restore(reader.loader, reader_state, same_data, meta.get("world_size"), log)
        else:
            log(f"{uri} has no data-loader state for this run's data: the data order restarts")
        if "rng" in state:
            set_rng_state(state["rng"][key], self.device)
        self.last_complete = uri
        return {"step": int(state["train"]["step"]), "tokens_seen": int(state["train"]["tokens_seen"])}

    def load_weights(self, uri: str, model) -> None:
        """Only the model's weights (continued pretraining from another run's checkpoint)."""
        if not storage.exists(storage.join(uri, META), self.cfg.storage):
            raise FileNotFoundError(f"train.initial_checkpoint {uri}: no {META}, not a complete checkpoint")
        model_sd = get_model_state_dict(model)
        state = {"model": model_sd}
        dcp.load(state, storage_reader=dcp_reader(uri, self.cfg.storage))
        set_model_state_dict(model, state["model"])


def pick_resume(cfg: PipelineConfig, run: str, max_steps: int) -> str | None:
    """The checkpoint to resume from, per train.resume (rank 0 decides for everyone)."""
    mode = cfg.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        found = [c for c in complete_checkpoints(run, cfg.storage) if c[0] <= max_steps]
        return found[-1][1] if found else None
    if not storage.exists(storage.join(mode, META), cfg.storage):
        raise FileNotFoundError(f"train.resume {mode}: no {META}, not a complete checkpoint")
    return mode


# ---------------------------------------------------------------------------------------------------------------
# metrics


class MetricsLog:
    """Rank 0's metrics.jsonl: one line per step, appended as they happen on a local disk; an object store has no
    append, so there the file is rewritten at each checkpoint and at the end. On start, lines after the step
    being resumed from (left by a run that crashed after its last checkpoint) are dropped."""

    def __init__(self, cfg: PipelineConfig, run: str, start_step: int):
        self.cfg = cfg
        self.uri = storage.join(run, METRICS)
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA's allocator peak, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_peak_flops(device: torch.device) -> float | None:
    return scaling.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def train(cfg: PipelineConfig) -> dict:
    t = cfg.train
    device, mesh = setup_distributed(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    make_deterministic(t.seed, device)
    if device.type == "cpu":  # (on CUDA the big tensors live in the caching allocator, which already keeps them)
        keep_freed_memory()
    global_batch = t.global_batch()
    if global_batch % (t.micro_batch_size * world):
        raise ValueError(
            f"train.global_batch_size {global_batch} is not a multiple of micro_batch_size {t.micro_batch_size} x "
            f"{world} processes"
        )
    accum = global_batch // (t.micro_batch_size * world)

    vocab_size = tokenizer_vocab_size(cfg)
    identity = run_identity(cfg)
    run = run_uri(cfg, identity)
    with storage.open_uri(tokenizer_uri(cfg), "rb", cfg.storage) as f:
        tokenizer_json = f.read()
    tokenizer_sha256 = hashlib.sha256(tokenizer_json).hexdigest()
    eos_id = None
    if t.document_masking:  # documents in a block end with EOS (stages/tokenize.py)
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_str(tokenizer_json.decode()).token_to_id(cfg.tokenizer.eos_token)
        if eos_id is None:
            raise ValueError(f"train.document_masking: {tokenizer_uri(cfg)} has no {cfg.tokenizer.eos_token!r} token")
    max_steps, budget_source = scaling.planned_steps(cfg.model, t, vocab_size)
    flops_per_token = scaling.flops_per_token(cfg.model, vocab_size, t.seq_len)
    peak = device_peak_flops(device)
    model = build_model(cfg, vocab_size, device, mesh)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    guard = DivergenceGuard(t.grad_spike_factor, t.warmup_steps)
    checkpointer = Checkpointer(cfg, run, device, loader_lib.index_digest(cfg, "train"))
    tokens_per_step = global_batch * t.seq_len
    log(
        f"world={world} device={device.type} backend={dist.get_backend()}; model {n_params:,} parameters "
        f"({scaling.model_shape(cfg.model)}), vocab {vocab_size}, {flops_per_token:,} FLOPs/token; {max_steps} steps "
        f"({budget_source}) of {global_batch} sequences = {tokens_per_step:,} tokens ({accum} micro-batches of "
        f"{t.micro_batch_size} per rank)"
    )

    reader = make_reader(cfg, device)
    val_sets = validation_sets(cfg, device)

    choice = [pick_resume(cfg, run, max_steps) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    step, tokens_seen, resumed_from = 0, 0, choice[0]
    if resumed_from is not None:
        state = checkpointer.load(resumed_from, model, optimizer, scheduler, reader, guard)
        step, tokens_seen = state["step"], state["tokens_seen"]
        log(f"resumed from {resumed_from} at step {step}")
    elif t.initial_checkpoint:
        checkpointer.load_weights(t.initial_checkpoint, model)
        log(f"initial weights from {t.initial_checkpoint}")
    start_step = step

    metrics = MetricsLog(cfg, run, start_step) if rank == 0 else None
    batches = loader_lib.Batches(reader)
    data_exhausted = None  # why a `stop` mixture ended the run early

    first_loss = final_loss = val_loss = None
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0"))  # on this node (stages/launch.py sets it)

    def run_summary(ckpt: str | None) -> dict:  # the run so far (reads the loop's variables when called)
        summary = _summary(
            step,
            first_loss,
            final_loss,
            val_loss,
            tokens_seen,
            (step - start_step) * tokens_per_step,
            train_seconds,
            ckpt,
            n_params,
            start_step,
            flops_per_token,
            peak and peak * world,
            peak_memory_mb(device),
        )
        if isinstance(reader, Mixture):
            summary["sources"] = source_counts(reader, batches.state_dict(), world, t.seq_len)
        if data_exhausted:
            summary["data_exhausted"] = data_exhausted
        return summary

    def save_checkpoint(val_now: float | None, final: bool) -> None:
        meta = {
            "step": step,
            "tokens_seen": tokens_seen,
            "train_loss": final_loss,
            "val_loss": val_now,
            "model": cfg.model.model_dump(),
            "vocab_size": vocab_size,
            "tokenizer_uri": tokenizer_uri(cfg),
            "tokenizer_sha256": tokenizer_sha256,
            "git_commit": storage.git_commit(),
            "data_uri": cfg.train.data,
            # lineage: the run's version (its folder) and what it is a function of
            "run_version": run.rsplit("/", 1)[1],
            "run_identity": identity,
            "tokens_index_sha256": checkpointer.data_index,
            "world_size": world,
            "seq_len": t.seq_len,
            "max_steps": max_steps,
        }
        if t.mixture:  # lineage: where each source was read (what each holds is in run_identity["mixture"])
            meta["mixture"] = {spec.name: uri for spec, (_, uri) in zip(t.mixture.sources, mixture_sources(cfg))}
        if data_exhausted:
            meta["data_exhausted"] = data_exhausted
        if final:
            meta["summary"] = run_summary(step_uri(run, step))
        checkpointer.save(
            step, model, optimizer, scheduler, batches, guard, {"step": step, "tokens_seen": tokens_seen}, meta
        )
        if metrics:
            metrics.flush()

    started = time.time()
    train_seconds = 0.0
    model.train()
    try:
        while step < max_steps:
            if os.getppid() != parent or not process_alive(launcher):
                # torchrun, or the process that launched it (the flow run's), was killed: SIGKILL gives neither a
                # chance to stop us, and carrying on would race the run that replaces them for the same checkpoints.
                print(f"[train] rank {rank}: torchrun or its launcher is gone, stopping at step {step}", flush=True)
                os._exit(1)
            tick = time.perf_counter()
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                try:
                    batch = batches.next()
                except DataExhausted as exc:  # on every rank at the same micro-batch: they draw alike
                    data_exhausted = str(exc)
                    break
                with gradient_sync(model, micro == accum - 1):
                    loss = lm_loss(model, batch, device, eos_id) / accum
                    loss.backward()
                loss_sum += loss.detach()
            if data_exhausted:
                optimizer.zero_grad(set_to_none=True)  # the step's micro-batches so far are dropped with it
                step -= 1
                log(f"{data_exhausted}: stopping after step {step} of {max_steps}")
                break
            grad_norm = _local(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)).item()
            loss_value = mean_over_ranks(loss_sum.item(), device)
            guard.check(step, loss_value, grad_norm, checkpointer.last_complete)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - tick
            train_seconds += dt
            checkpointer.poll()
            first_loss = loss_value if first_loss is None else first_loss
            final_loss = loss_value

            val_now = val_by_source = None
            if step % t.val_every == 0 or step == max_steps:
                val_loss, val_by_source = evaluate_sets(model, val_sets, device, eos_id)
                val_now = val_loss
            if rank == 0:
                flops_per_s = flops_per_token * tokens_per_step / dt
                record = {
                    "step": step,
                    "max_steps": max_steps,
                    "loss": round(loss_value, 6),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 6),
                    "tokens_per_s": round(tokens_per_step / dt, 1),
                    "flops_per_s": round(flops_per_s),
                    "mfu": round(flops_per_s / (peak * world), 4) if peak else None,
                    "memory_mb": round(peak_memory_mb(device), 1),
                    "elapsed": round(time.time() - started, 3),
                    "tokens_seen": tokens_seen,
                }
                if val_now is not None:
                    record["val_loss"] = round(val_now, 6)
                if val_by_source:
                    record["val_loss_by_source"] = val_by_source
                if isinstance(reader, Mixture):  # (the state after this step's batches, not the one read ahead)
                    record["sources"] = source_counts(reader, batches.state_dict(), world, t.seq_len)
                metrics.append(record)
                emit(METRIC_PREFIX, record)

            if step % t.checkpoint_every == 0 or step == max_steps:
                save_checkpoint(val_now, final=step == max_steps)
        if data_exhausted:  # the step reached is the run's last: its checkpoint says why, with the summary
            if step == 0:
                raise RuntimeError(f"{data_exhausted} before the first step")
            val_loss = evaluate_sets(model, val_sets, device, eos_id)[0]
            save_checkpoint(val_loss, final=True)
        checkpointer.wait()
    except TrainingDiverged:
        checkpointer.wait()  # a save still running in the background is a good checkpoint: let it complete
        raise
    finally:
        if metrics:
            metrics.close()

    if start_step >= max_steps:  # nothing left to do: report what the checkpoint holds
        val_loss = evaluate_sets(model, val_sets, device, eos_id)[0]
    summary = run_summary(checkpointer.last_complete)
    if rank == 0:
        emit(SUMMARY_PREFIX, summary)
    dist.barrier()
    return summary


def _summary(
    step,
    first_loss,
    final_loss,
    val_loss,
    tokens_seen,
    tokens_this_run,
    seconds,
    ckpt,
    n_params,
    start_step,
    flops_per_token,
    total_peak_flops,
    memory_mb,
) -> dict:
    tokens_per_s = tokens_this_run / seconds if seconds > 0 else None
    flops_per_s = flops_per_token * tokens_per_s if tokens_per_s else None
    return {
        "steps": step,
        "start_step": start_step,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "val_loss": val_loss,
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "flops_per_token": flops_per_token,
        "flops_per_s": round(flops_per_s) if flops_per_s else None,
        "mfu": round(flops_per_s / total_peak_flops, 4) if flops_per_s and total_peak_flops else None,
        "peak_memory_mb": round(memory_mb, 1),
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
