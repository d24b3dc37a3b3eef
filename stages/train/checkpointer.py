"""Checkpoints of a training run with torch.distributed.checkpoint (DCP): save (in the background with
`async_checkpoint`), commit (`meta.json`, last, by rank 0), keep the newest `keep_last`, load (resharding to
another world size), load only the weights (continued pretraining), and pick where a run resumes.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train import loader as loader_lib
from stages.train import pretrained
from stages.train.checkpoints import META, complete_checkpoints, dcp_reader, dcp_writer, step_uri
from stages.train.mixture import Mixture
from stages.train.protocol import log


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
        """Only the model's weights (continued pretraining): from another run's checkpoint, or from a Hugging Face
        Llama directory (stages/train/pretrained.py), which every rank reads whole and keeps its shard of."""
        if pretrained.is_model_directory(uri, self.cfg.storage):
            theirs, vocab = pretrained.read_model_config(uri, self.cfg.storage)
            ours = model.module if isinstance(model, DistributedDataParallel) else model
            if vocab != ours.vocab_size:
                raise ValueError(f"train.initial_checkpoint {uri}: its vocabulary is {vocab}, the run's tokenizer "
                                 f"has {ours.vocab_size} (tokenizer.path: the model's own tokenizer)")  # fmt: skip
            weights = pretrained.state_dict(uri, theirs, self.cfg.storage)
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
            return
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
