"""What a training run reports: rank 0's metrics.jsonl and TensorBoard event files, the METRIC and SUMMARY lines
the launcher parses, and the peak memory and FLOP/s figures they carry.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
from pathlib import Path

import torch

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train import scaling
from stages.train.checkpoints import METRICS

TENSORBOARD = "tensorboard"  # the run folder's event files (`tensorboard --logdir RUN`), beside metrics.jsonl
# The record's keys TensorBoard plots, by tag (the record's step is the global step). A mixture's per-source
# validation losses go to val/loss/<source>.
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "val_loss": "val/loss",
}


class EventFiles:
    """Rank 0's records as TensorBoard scalars in `{run}/tensorboard/`, through torch.utils.tensorboard's
    SummaryWriter: straight into the run folder on a local disk; for an object store (which has no append) into a
    local temporary folder whose event files are uploaded at each checkpoint and at the end, as metrics.jsonl is
    rewritten then. A resumed run's writer starts a new event file with purge_step one past the step it resumes
    from: TensorBoard then hides what an earlier attempt logged after its last checkpoint (steps this run logs
    again, as metrics.jsonl drops their lines), and keeps that checkpoint's own step, which is not logged again."""

    def __init__(self, cfg: PipelineConfig, run: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # (here: tensorboard and protobuf load only when used)

        self.cfg = cfg
        self.uri = storage.join(run, TENSORBOARD)
        self.remote = storage.is_remote(self.uri)
        self.folder = tempfile.mkdtemp(prefix="tensorboard-") if self.remote else storage.filesystem(self.uri)[1]
        self.writer = SummaryWriter(self.folder, purge_step=start_step + 1)

    def add(self, record: dict) -> None:
        step = record["step"]
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        for source, loss in (record.get("val_loss_by_source") or {}).items():
            self.writer.add_scalar(f"val/loss/{source}", loss, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            self._upload()

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _upload(self) -> None:
        """Every event file of this writer's folder (each whole: this run's own, and small)."""
        for path in sorted(Path(self.folder).iterdir()):
            dest = storage.join(self.uri, path.name)
            with open(path, "rb") as src, storage.atomic_write(dest, self.cfg.storage) as f:
                shutil.copyfileobj(src, f)


class MetricsLog:
    """Rank 0's metrics.jsonl: one line per step, appended as they happen on a local disk; an object store has no
    append, so there the file is rewritten at each checkpoint and at the end. On start, lines after the step
    being resumed from (left by a run that crashed after its last checkpoint) are dropped. With
    `train.tensorboard`, the same records go to TensorBoard event files as well (EventFiles)."""

    def __init__(self, cfg: PipelineConfig, run: str, start_step: int):
        self.cfg = cfg
        self.events: EventFiles | None = None
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
        if cfg.train.tensorboard:
            self.events = EventFiles(cfg, run, start_step)

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self._fh:
            self._fh.write(line + "\n")
            self._fh.flush()
        if self.events:
            self.events.add(record)

    def flush(self) -> None:
        if self.remote or not getattr(self, "_fh", None):
            with storage.atomic_write(self.uri, self.cfg.storage, "w") as f:
                f.write("".join(line + "\n" for line in self.lines))
        if self.events:
            self.events.flush()

    def close(self) -> None:
        if self.events:  # (first: flush() below then has no writer to flush and upload a second time)
            self.events.close()
            self.events = None
        if self._fh:
            self._fh.close()
            self._fh = None
        else:
            self.flush()


def emit(prefix: str, record: dict) -> None:
    print(prefix + json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set: Linux's VmHWM, which starts afresh at exec. (getrusage's ru_maxrss
    survives exec: a process started by a bigger one reports its parent's peak until it outgrows it.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (elsewhere: KiB on Linux, bytes on macOS)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA's allocator peak, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def device_peak_flops(device: torch.device) -> float | None:
    return scaling.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
