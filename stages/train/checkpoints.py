"""Which checkpoints of a run are complete: shared by the trainer, its launcher and evaluation.

A run's folder is `{root}/train/{version}` (the train stage's output, stages/train/stage.py); a checkpoint is its
`step-NNNNNN/`, a torch.distributed.checkpoint (DCP) folder, complete only once its `meta.json` exists, which the
trainer writes last. Everything that picks a checkpoint goes through `complete_checkpoints`, so "complete" means
the same thing to resume, skip and evaluate.
"""

from __future__ import annotations

import re

from stages.core import storage
from stages.core.config import StorageConfig

META = "meta.json"
METRICS = "metrics.jsonl"  # rank 0's per-step records, beside the checkpoints
_STEP_DIR = re.compile(r"step-(\d+)$")


def step_uri(run: str, step: int) -> str:
    return storage.join(run, f"step-{step:06d}")


def run_of(ckpt: str) -> str:
    """The run folder a checkpoint belongs to."""
    head, _, name = ckpt.rstrip("/").rpartition("/")
    if not _STEP_DIR.search(name):
        raise ValueError(f"{ckpt}: not a checkpoint folder (RUN/step-N)")
    return head


def complete_checkpoints(run: str, storage_cfg: StorageConfig | None = None) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint of the run folder `run` that has its meta.json, oldest first."""
    found = []
    for meta_uri in storage.expand(storage.join(run, "step-*", META), storage_cfg):
        ckpt = meta_uri.rsplit("/", 1)[0]
        match = _STEP_DIR.search(ckpt)
        if match:
            found.append((int(match.group(1)), ckpt))
    return sorted(found)


def latest_checkpoint(run: str, storage_cfg: StorageConfig | None = None) -> tuple[int, str, dict] | None:
    """The newest complete checkpoint as (step, uri, meta), or None."""
    found = complete_checkpoints(run, storage_cfg)
    if not found:
        return None
    step, ckpt = found[-1]
    return step, ckpt, storage.read_json(storage.join(ckpt, META), storage_cfg)


def dcp_reader(uri: str, storage_cfg: StorageConfig | None = None):
    """A DCP storage reader for a local folder or an object-store URI (through fsspec/s3fs)."""
    if storage.is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # not re-exported in torch 2.13

        return FsspecReader(uri, **storage.storage_options(storage_cfg))
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(storage.filesystem(uri)[1])


def dcp_writer(uri: str, storage_cfg: StorageConfig | None = None):
    if storage.is_remote(uri):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(uri, **storage.storage_options(storage_cfg))
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(storage.filesystem(uri)[1])


def final_checkpoint(run: str, max_steps: int, storage_cfg: StorageConfig | None = None) -> tuple[str, dict] | None:
    """The run's last checkpoint as (uri, meta) once it has finished: the one at max_steps, or one where a mixture
    source ran out under `on_exhausted: stop` (its meta names it under `data_exhausted`)."""
    found = complete_checkpoints(run, storage_cfg)
    for step, ckpt in reversed(found):
        if step > max_steps:
            continue
        meta = storage.read_json(storage.join(ckpt, META), storage_cfg)
        if step == max_steps or meta.get("data_exhausted"):
            return ckpt, meta
        return None
    return None
