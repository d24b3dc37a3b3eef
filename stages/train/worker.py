"""Per-rank training: `python -m stages.train.worker --config-json FILE --run-json FILE`, under torchrun.

One file, torchtitan's shape at nanoGPT's size:
- process group: NCCL on CUDA, gloo on CPU (`train.device`: auto | cpu | cuda); a 1-D device mesh;
- model: `stages.train.model.Transformer`, optionally compiled and with activation checkpointing per block, then
  (`data_parallel: fsdp`) built on the meta device, FSDP2 `fully_shard` on each block and on the root, materialized
  and initialized shard by shard from a fixed seed (`train.dtype` bf16: bf16 parameters in compute with fp32
  gradient reduction), or (`ddp`) DistributedDataParallel, whose bucketed all-reduce overlaps backward and beats
  per-block gathers when the model fits one device (autocast to `train.dtype`, as for one process);
- data: stages/train/loader.py, litdata's StreamingDataLoader over `{root}/tokens/train` in blocks of seq_len + 1
  tokens, split per rank by litdata, reshuffled every epoch; epochs repeat until the run's last step. Or
  (`train.mixture`) several such datasets drawn from by weight block by block (stages/train/mixture.py), with tokens
  and epochs per source in the metrics and a source capped by max_epochs either dropped from the draws or ending
  the run at its last full step (its checkpoint is then the final one, `data_exhausted` in its meta.json);
- steps: `global_batch_size` sequences per optimizer step through gradient accumulation (FSDP2 reduces gradients
  on the last micro-batch only, as does DDP); the run's length from max_steps, max_tokens or the Chinchilla multiplier
  (stages/train/scaling.py); AdamW (weight decay on matrices only), LambdaLR with linear warmup then cosine decay to
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
  URI loads that checkpoint; otherwise `initial_checkpoint` gives starting weights only (continued pretraining:
  one of our checkpoints or a Hugging Face Llama directory, whose padded vocabulary, if any, the model keeps);
- observability: rank 0 prints `METRIC {json}` per step (loss, lr, grad norm, tokens/s, FLOP/s, MFU on known
  GPUs, peak memory, validation loss every `val_every` steps) and `SUMMARY {json}` at the end (parsed by
  `stages.train.stage`) and keeps the run folder's metrics.jsonl and, with `train.tensorboard`, TensorBoard event
  files in its tensorboard/ (stages/train/metrics.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.parallel import process_alive
from stages.train import loader as loader_lib
from stages.train import scaling
from stages.train.checkpointer import Checkpointer, pick_resume
from stages.train.checkpoints import step_uri
from stages.train.data import mixture_sources, model_vocab_size, tokenizer_uri, tokenizer_vocab_size
from stages.train.feed import make_reader, source_counts, validation_sets
from stages.train.metrics import MetricsLog, device_peak_flops, emit, peak_memory_mb
from stages.train.mixture import DataExhausted, Mixture
from stages.train.model import Transformer, document_ids
from stages.train.protocol import LAUNCHER_PID_ENV, METRIC_PREFIX, SUMMARY_PREFIX, log


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm went bad; the message names the step."""


# ---------------------------------------------------------------------------------------------------------------
# distributed setup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: PipelineConfig) -> tuple[torch.device, Any]:
    if "RANK" not in os.environ:  # plain `python -m stages.train.worker`: a world of one
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


def compute_dtype(cfg: PipelineConfig, device: torch.device) -> torch.dtype:
    """`train.dtype` resolved: auto is bfloat16 on CUDA, float32 elsewhere."""
    name = cfg.train.dtype if cfg.train.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name)


def build_model(cfg: PipelineConfig, vocab_size: int, device: torch.device, mesh) -> torch.nn.Module:
    """The model on `device`, initialized from `train.seed` (the same values however it is sharded).

    With FSDP, torchtitan's order: built on the meta device (no memory), sharded, materialized (`to_empty`: each
    rank allocates its shards only), then initialized shard by shard, so a rank never holds more than its shards
    and one full matrix (Transformer.init_weights), and a model larger than one device can start. One process and
    DDP hold the whole model anyway: built on the device directly.
    """
    t = cfg.train
    sharded = mesh.size() > 1 and t.data_parallel == "fsdp"
    with torch.device("meta" if sharded else device):
        model = Transformer(cfg.model, vocab_size)
    model.checkpoint_activations = t.activation_checkpointing
    if t.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names, and so checkpoints, stay the same
    if sharded:
        dtype = compute_dtype(cfg, device)
        # bf16: gathered parameters in bf16, gradients reduced in fp32; fp32: no casts at all.
        low = dtype != torch.float32
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        for module in [*model.layers, model]:
            fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
        model.to_empty(device=device)
    model.init_weights(t.seed)
    if mesh.size() == 1 or sharded:
        # One process has nothing to shard: FSDP would only add its hooks and copies; autocast stands in for its
        # mixed-precision policy (lm_loss). DCP checkpoints load either way.
        return model
    # DDP: autocast as for one process; gradients are reduced in fp32 buckets.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
# loss


def lm_loss(
    model: torch.nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Mean next-token loss of a batch of blocks; with `eos_id`, each document in a block is computed apart; in
    `dtype` (compute_dtype) on any device: FSDP's mixed-precision policy casts a sharded model, and one process or
    DDP autocasts."""
    batch = batch.to(device, dtype=torch.long, non_blocking=True)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    doc_ids = document_ids(inputs, eos_id) if eos_id is not None else None
    autocast = dtype != torch.float32 and not isinstance(model, FSDPModule)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        logits = model(inputs, doc_ids=doc_ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    device: torch.device,
    eos_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> float | None:
    if not batches:
        return None
    model.eval()
    total = 0.0
    for batch in batches:
        total += lm_loss(model, batch, device, eos_id, dtype).item()
    model.train()
    return mean_over_ranks(total / len(batches), device)


def evaluate_sets(model, sets, device: torch.device, eos_id: int | None,
                  dtype: torch.dtype) -> tuple[float | None, dict | None]:  # fmt: skip
    """The validation loss (over a mixture: the weighted mean of its sources') and, for a mixture, each source's."""
    losses = {name: (weight, evaluate(model, batches, device, eos_id, dtype)) for name, weight, batches in sets}
    scored = [(w, loss) for w, loss in losses.values() if loss is not None]
    mean = sum(w * loss for w, loss in scored) / sum(w for w, _ in scored) if scored else None
    by_source = {name: round(loss, 6) for name, (_, loss) in losses.items() if name and loss is not None}
    return mean, by_source or None


# ---------------------------------------------------------------------------------------------------------------
# the run


def accumulation_steps(t, world: int) -> int:
    global_batch = t.global_batch()
    if global_batch % (t.micro_batch_size * world):
        raise ValueError(
            f"train.global_batch_size {global_batch} is not a multiple of micro_batch_size {t.micro_batch_size} x "
            f"{world} processes"
        )
    return global_batch // (t.micro_batch_size * world)


def read_tokenizer(cfg: PipelineConfig) -> tuple[str, int | None]:
    """The run's tokenizer's sha256, and with document masking its EOS id (documents in a block end with it)."""
    with storage.open_uri(tokenizer_uri(cfg), "rb", cfg.storage) as f:
        tokenizer_json = f.read()
    eos_id = None
    if cfg.train.document_masking:
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_str(tokenizer_json.decode()).token_to_id(cfg.tokenizer.eos_token)
        if eos_id is None:
            raise ValueError(f"train.document_masking: {tokenizer_uri(cfg)} has no {cfg.tokenizer.eos_token!r} token")
    return hashlib.sha256(tokenizer_json).hexdigest(), eos_id


class Trainer:
    """One rank's run: built from the config and the run's folder and identity (from the launcher), then `fit`.
    The loop's state (step, tokens seen, losses) lives on the instance, which the checkpoint's meta.json and the
    summary read."""

    def __init__(self, cfg: PipelineConfig, run: str, identity: dict):
        t = self.t = cfg.train
        self.cfg, self.run, self.identity = cfg, run, identity
        self.device, mesh = setup_distributed(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        make_deterministic(t.seed, self.device)
        if self.device.type == "cpu":  # (on CUDA the big tensors live in the caching allocator, which keeps them)
            keep_freed_memory()
        self.accum = accumulation_steps(t, self.world)
        self.vocab_size = model_vocab_size(cfg, tokenizer_vocab_size(cfg))  # (a base model may pad it)
        self.tokenizer_sha256, self.eos_id = read_tokenizer(cfg)
        self.max_steps, budget_source = scaling.planned_steps(cfg.model, t, self.vocab_size)
        self.flops_per_token = scaling.flops_per_token(cfg.model, self.vocab_size, t.seq_len)
        self.peak = device_peak_flops(self.device)
        self.dtype = compute_dtype(cfg, self.device)
        self.model = build_model(cfg, self.vocab_size, self.device, mesh)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.max_steps)
        self.guard = DivergenceGuard(t.grad_spike_factor, t.warmup_steps)
        self.checkpointer = Checkpointer(cfg, run, self.device, loader_lib.index_digest(cfg, "train"))
        self.tokens_per_step = t.global_batch() * t.seq_len
        log(
            f"world={self.world} device={self.device.type} backend={dist.get_backend()} dtype={self.t.dtype} "
            f"({str(self.dtype).removeprefix('torch.')}); model {self.n_params:,} "
            f"parameters ({scaling.model_shape(cfg.model)}), vocab {self.vocab_size}, {self.flops_per_token:,} "
            f"FLOPs/token; {self.max_steps} steps ({budget_source}) of {t.global_batch()} sequences = "
            f"{self.tokens_per_step:,} tokens ({self.accum} micro-batches of {t.micro_batch_size} per rank)"
        )
        self.reader = make_reader(cfg, self.device)
        self.val_sets = validation_sets(cfg, self.device)
        self.step = self.tokens_seen = 0
        self.first_loss = self.final_loss = self.val_loss = None
        self.data_exhausted: str | None = None  # why a `stop` mixture ended the run early
        self.train_seconds = 0.0
        self.start_step = self.resume()
        self.metrics = MetricsLog(cfg, run, self.start_step) if self.rank == 0 else None
        self.batches = loader_lib.Batches(self.reader)

    def resume(self) -> int:
        """Load the checkpoint train.resume picks (rank 0 decides for everyone), else the initial weights."""
        choice = [pick_resume(self.cfg, self.run, self.max_steps) if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is not None:
            parts = (self.model, self.optimizer, self.scheduler, self.reader, self.guard)
            state = self.checkpointer.load(choice[0], *parts)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            log(f"resumed from {choice[0]} at step {self.step}")
        elif self.t.initial_checkpoint:
            self.checkpointer.load_weights(self.t.initial_checkpoint, self.model)
            log(f"initial weights from {self.t.initial_checkpoint}")
        return self.step

    def fit(self) -> dict:
        parent = os.getppid()
        launcher = int(os.environ.get(LAUNCHER_PID_ENV, "0"))  # on this node (stages/train/stage.py sets it)
        self.started = time.time()
        self.model.train()
        try:
            while self.step < self.max_steps:
                if os.getppid() != parent or not process_alive(launcher):
                    # torchrun, or the process that launched it (the flow run's), was killed: SIGKILL gives neither
                    # a chance to stop us, and carrying on would race the run that replaces them.
                    print(f"[train] rank {self.rank}: torchrun or its launcher is gone, stopping at step {self.step}",
                          flush=True)  # fmt: skip
                    os._exit(1)
                if not self.train_step():
                    break
            if self.data_exhausted:  # the step reached is the run's last: its checkpoint says why
                if self.step == 0:
                    raise RuntimeError(f"{self.data_exhausted} before the first step")
                self.val_loss = evaluate_sets(self.model, self.val_sets, self.device, self.eos_id, self.dtype)[0]
                self.save_checkpoint(self.val_loss, final=True)
            self.checkpointer.wait()
        except TrainingDiverged:
            self.checkpointer.wait()  # a save still running in the background is a good checkpoint: let it complete
            raise
        finally:
            if self.metrics:
                self.metrics.close()
        if self.start_step >= self.max_steps:  # nothing left to do: report what the checkpoint holds
            self.val_loss = evaluate_sets(self.model, self.val_sets, self.device, self.eos_id, self.dtype)[0]
        summary = self.summary(self.checkpointer.last_complete)
        if self.rank == 0:
            emit(SUMMARY_PREFIX, summary)
        dist.barrier()
        return summary

    def accumulate(self) -> torch.Tensor | None:
        """Forward and backward over the step's micro-batches: the summed loss, or None when a mixture source ran
        out (on every rank at the same micro-batch: they draw alike)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            try:
                batch = self.batches.next()
            except DataExhausted as exc:
                self.data_exhausted = str(exc)
                return None
            with gradient_sync(self.model, micro == self.accum - 1):
                loss = lm_loss(self.model, batch, self.device, self.eos_id, self.dtype) / self.accum
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self) -> bool:
        """One optimizer step, with its metrics, validation and checkpoint when due; False when the data ran out."""
        tick = time.perf_counter()
        self.step += 1
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = self.accumulate()
        if loss_sum is None:
            self.optimizer.zero_grad(set_to_none=True)  # the step's micro-batches so far are dropped with it
            self.step -= 1
            log(f"{self.data_exhausted}: stopping after step {self.step} of {self.max_steps}")
            return False
        grad_norm = _local(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)).item()
        loss_value = mean_over_ranks(loss_sum.item(), self.device)
        self.guard.check(self.step, loss_value, grad_norm, self.checkpointer.last_complete)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += self.tokens_per_step
        dt = time.perf_counter() - tick
        self.train_seconds += dt
        self.checkpointer.poll()
        self.first_loss = loss_value if self.first_loss is None else self.first_loss
        self.final_loss = loss_value
        val_now = val_by_source = None
        if self.step % self.t.val_every == 0 or self.step == self.max_steps:
            found = evaluate_sets(self.model, self.val_sets, self.device, self.eos_id, self.dtype)
            self.val_loss, val_by_source = found
            val_now = self.val_loss
        if self.rank == 0:
            self.record(lr, loss_value, grad_norm, dt, val_now, val_by_source)
        if self.step % self.t.checkpoint_every == 0 or self.step == self.max_steps:
            self.save_checkpoint(val_now, final=self.step == self.max_steps)
        return True

    def record(self, lr: float, loss: float, grad_norm: float, dt: float, val_now, val_by_source) -> None:
        """Rank 0's per-step record: to metrics.jsonl and, as a METRIC line, to the launcher."""
        flops_per_s = self.flops_per_token * self.tokens_per_step / dt
        record = {
            "step": self.step,
            "max_steps": self.max_steps,
            "loss": round(loss, 6),
            "lr": lr,
            "grad_norm": round(grad_norm, 6),
            "tokens_per_s": round(self.tokens_per_step / dt, 1),
            "flops_per_s": round(flops_per_s),
            "mfu": round(flops_per_s / (self.peak * self.world), 4) if self.peak else None,
            "memory_mb": round(peak_memory_mb(self.device), 1),
            "elapsed": round(time.time() - self.started, 3),
            "tokens_seen": self.tokens_seen,
        }
        if val_now is not None:
            record["val_loss"] = round(val_now, 6)
        if val_by_source:
            record["val_loss_by_source"] = val_by_source
        if isinstance(self.reader, Mixture):  # (the state after this step's batches, not the one read ahead)
            record["sources"] = source_counts(self.reader, self.batches.state_dict(), self.world, self.t.seq_len)
        self.metrics.append(record)
        emit(METRIC_PREFIX, record)

    def save_checkpoint(self, val_now: float | None, final: bool) -> None:
        t, cfg = self.t, self.cfg
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_loss": self.final_loss,
            "val_loss": val_now,
            "model": cfg.model.model_dump(),
            "vocab_size": self.vocab_size,
            "tokenizer_uri": tokenizer_uri(cfg),
            "tokenizer_sha256": self.tokenizer_sha256,
            "git_commit": storage.git_commit(),
            "data_uri": t.data,
            # lineage: the run's version (its folder) and what it is a function of
            "run_version": self.run.rsplit("/", 1)[1],
            "run_identity": self.identity,
            "tokens_index_sha256": self.checkpointer.data_index,
            "world_size": self.world,
            "seq_len": t.seq_len,
            "max_steps": self.max_steps,
        }
        if t.mixture:  # lineage: where each source was read (what each holds is in the identity's inputs)
            meta["mixture"] = {spec.name: uri for spec, (_, uri) in zip(t.mixture.sources, mixture_sources(cfg))}
        if self.data_exhausted:
            meta["data_exhausted"] = self.data_exhausted
        if final:
            meta["summary"] = self.summary(step_uri(self.run, self.step))
        train_state = {"step": self.step, "tokens_seen": self.tokens_seen}
        parts = (self.model, self.optimizer, self.scheduler, self.batches, self.guard)
        self.checkpointer.save(self.step, *parts, train_state, meta)
        if self.metrics:
            self.metrics.flush()

    def summary(self, ckpt: str | None) -> dict:
        """The run so far: steps, losses, tokens, throughput, MFU, peak memory, the checkpoint."""
        tokens_this_run = (self.step - self.start_step) * self.tokens_per_step
        tokens_per_s = tokens_this_run / self.train_seconds if self.train_seconds > 0 else None
        flops_per_s = self.flops_per_token * tokens_per_s if tokens_per_s else None
        total_peak = self.peak and self.peak * self.world
        summary = {
            "steps": self.step,
            "start_step": self.start_step,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "val_loss": self.val_loss,
            "tokens_seen": self.tokens_seen,
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
            "flops_per_token": self.flops_per_token,
            "flops_per_s": round(flops_per_s) if flops_per_s else None,
            "mfu": round(flops_per_s / total_peak, 4) if flops_per_s and total_peak else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "checkpoint": ckpt,
            "params": self.n_params,
        }
        if isinstance(self.reader, Mixture):
            summary["sources"] = source_counts(self.reader, self.batches.state_dict(), self.world, self.t.seq_len)
        if self.data_exhausted:
            summary["data_exhausted"] = self.data_exhausted
        return summary


@record  # torchrun's failure summary then carries the exception instead of "To enable traceback see ..."
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-json", required=True, help="file holding PipelineConfig as JSON")
    parser.add_argument("--run-json", required=True, help="file holding the run's folder (uri) and identity")
    args = parser.parse_args(argv)
    with open(args.config_json) as f:
        cfg = PipelineConfig.model_validate_json(f.read())
    with open(args.run_json) as f:
        run = json.load(f)
    try:
        Trainer(cfg, run["uri"], run["identity"]).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
