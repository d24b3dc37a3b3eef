"""What a training run reports: rank 0's metrics.jsonl, the METRIC and SUMMARY lines the launcher parses, and
the peak memory and FLOP/s figures they carry.
"""

from __future__ import annotations

import json
import resource

import torch

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train import scaling
from stages.train.checkpoints import METRICS


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
