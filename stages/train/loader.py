"""The token loader the trainer reads with: litdata's StreamingDataset and StreamingDataLoader over the
tokenize stage's shards, local or on any S3 endpoint.

- blocks of `block_size` tokens (seq_len + 1: inputs and shifted targets) from litdata's TokensLoader;
- shuffled per epoch with the training seed; litdata splits the chunks per rank (from torch.distributed) and
  per DataLoader worker, so ranks and workers read disjoint samples;
- `state_dict()` / `load_state_dict()` of the StreamingDataLoader resume mid-epoch at exactly the next sample
  (tests/test_loader.py), which is what the trainer's checkpoints store;
- the local chunk cache is `$PRETRAIN_CACHE_DIR/litdata/<split>-<digest of URI and index.json>` (default root
  ~/.cache/pretrain-pipeline): fixed, because litdata's loader state records it, and keyed by content, so a
  rebuilt dataset at the same URI never reads stale chunks;
- `check_dataset` runs first: a wrong endpoint, rejected credentials or a missing dataset fail in seconds with
  an error that says which, where litdata itself would retry for minutes.
"""

from __future__ import annotations

import copy
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train.data import data_uri

CACHE_ENV = "PRETRAIN_CACHE_DIR"  # local root for litdata's chunk cache; default ~/.cache/pretrain-pipeline
INDEX = "index.json"


class DatasetUnavailable(RuntimeError):
    """The token dataset cannot be read; `kind` is endpoint, credentials or missing."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def dataset_uri(cfg: PipelineConfig, split: str, data: str | None = None) -> str:
    """`split` of the tokenized dataset `data` (a mixture's source), by default the run's (train.data)."""
    return storage.join(data or data_uri(cfg), split)


def check_dataset(uri: str, cfg: PipelineConfig) -> bytes:
    """The dataset's index.json, or within seconds an error naming what is wrong."""
    if storage.is_remote(uri):
        try:
            storage.probe_s3(uri, cfg.storage, key=INDEX)
        except storage.StorageError as exc:
            raise DatasetUnavailable(exc.kind, f"token dataset {uri}: {exc}") from None
    index = storage.join(uri, INDEX)
    if not storage.exists(index, cfg.storage):
        raise DatasetUnavailable("missing", f"token dataset {uri}: no {INDEX} (run the tokenize stage first)")
    with storage.open_uri(index, "rb", cfg.storage) as f:
        return f.read()


def index_digest(cfg: PipelineConfig, split: str, data: str | None = None) -> str:
    """sha256 of the split's index.json (chunk names, sizes and sample counts): identifies the dataset's layout."""
    return hashlib.sha256(check_dataset(dataset_uri(cfg, split, data), cfg)).hexdigest()


def relocated_state(state: dict, loader) -> dict:
    """A loader state saved while the same dataset lived elsewhere (a copied or moved storage root), pointed at
    where it is now. litdata refuses a state whose recorded location differs; call this only after checking that
    the dataset is the same one (`index_digest`)."""
    dataset = loader.dataset
    state = {**state, "dataset": dict(state["dataset"])}
    state["dataset"].update(
        input_dir_path=dataset.input_dir.path,
        input_dir_url=dataset.input_dir.url,
        cache_dir_path=dataset.cache_dir.path,
    )
    return state


def cache_dir(uri: str, index: bytes, split: str) -> str:
    key = hashlib.sha256(uri.encode() + b"\0" + index).hexdigest()[:16]
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "pretrain-pipeline")
    path = os.path.join(root, "litdata", f"{split}-{key}")
    os.makedirs(path, exist_ok=True)
    return path


def make_dataset(
    cfg: PipelineConfig, split: str, shuffle: bool, block_size: int | None = None, data: str | None = None
):
    from litdata import StreamingDataset, TokensLoader

    uri = dataset_uri(cfg, split, data)
    index = check_dataset(uri, cfg)
    options = storage.prepare_litdata(cfg.storage)
    return StreamingDataset(
        input_dir=uri if storage.is_remote(uri) else storage.filesystem(uri)[1],
        item_loader=TokensLoader(block_size=block_size or cfg.train.seq_len + 1),
        shuffle=shuffle,
        seed=cfg.train.seed,
        storage_options=options if storage.is_remote(uri) else None,
        cache_dir=cache_dir(uri, index, split),
        # litdata's default is True only when distributed; always True keeps a saved state loadable on any number
        # of processes (litdata checks that the setting matches).
        drop_last=True,
    )


def make_loader(
    cfg: PipelineConfig, split: str, batch_size: int, shuffle: bool, num_workers: int = 0, data: str | None = None
):
    from litdata import StreamingDataLoader

    return StreamingDataLoader(
        make_dataset(cfg, split, shuffle, data=data), batch_size=batch_size, num_workers=num_workers
    )


def restore(loader, state: dict, same_data: bool, saved_world_size, log: Callable[[str], None]) -> None:
    """Put `loader` at a saved position. `same_data`: the dataset is the one the state was saved from (its index
    digest), perhaps at another URI. A position saved by fewer ranks further into the epoch than one of today's
    ranks holds samples cannot be restriped by litdata: the next epoch (reshuffled) starts instead."""
    if same_data:
        state = relocated_state(state, loader)
    if state["num_samples_yielded"] > len(loader.dataset):
        log(
            f"data: the position saved by {saved_world_size} ranks cannot be restriped onto "
            f"{loader.dataset.distributed_env.world_size}; epoch {state['current_epoch'] + 1} starts"
        )
        loader.current_epoch = state["current_epoch"]
    else:
        loader.load_state_dict(state)


class Epochs:
    """Endless full batches from one StreamingDataLoader: a new epoch (reshuffled by litdata) when one runs out.

    Each rank draws its own batches; ranks need not agree on epoch boundaries since every step takes exactly one
    batch per rank. An incomplete last batch is skipped so every step sees `batch_size` sequences.
    """

    def __init__(self, loader, batch_size: int, log: Callable[[str], None] = print):
        self.loader = loader
        self.batch_size = batch_size
        self.log = log
        self._it = None

    def read(self):
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                empty_epochs += 1
                self.log(f"data: epoch {self.loader.current_epoch} done, epoch {self.loader.current_epoch + 1} starts")
                if empty_epochs > 1:
                    raise RuntimeError(
                        f"training data gives this rank no full batch of {self.batch_size} sequences per epoch: "
                        "lower train.micro_batch_size / seq_len / nproc or tokenize more text"
                    ) from None
                continue
            if batch.shape[0] == self.batch_size:
                return batch
            # an incomplete final batch: skip it (its samples count as consumed in the loader's state)

    def state_dict(self) -> dict:
        return self.loader.state_dict()


class Batches:
    """The trainer's batches from a reader (`Epochs` of one dataset, or a `stages.train.mixture.Mixture`), read ahead.

    The next batch is read by a background thread while the current one trains (litdata's reading is Python
    work that a forward/backward, which releases the GIL, hides; a loader worker process would compete for the
    cores instead). So that checkpoints stay exact, the thread takes the reader's state right after each batch
    and `state_dict()` returns the state after the last batch handed out, never after the one read ahead. An
    exception of the reader (a mixture's source exhausted) is raised by the `next` call that would have got the
    batch.
    """

    def __init__(self, reader):
        self.reader = reader
        self._queue: queue.Queue | None = None
        self._state: dict | None = None

    def _read_ahead(self) -> None:
        assert self._queue is not None
        try:
            while True:
                batch = self.reader.read()
                # A copy: after a load_state_dict litdata hands out its one restored dict, updated in place by every
                # later state_dict() call, so a reference would run ahead with the reading.
                self._queue.put((batch, copy.deepcopy(self.reader.state_dict())))
        except BaseException as exc:  # handed to the training thread, which raises it
            self._queue.put(exc)

    def next(self):
        if self._queue is None:
            self._queue = queue.Queue(maxsize=1)  # one batch ahead
            threading.Thread(target=self._read_ahead, name="batches", daemon=True).start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """The reader's state after the last batch returned by `next` (its own state before the first)."""
        return self._state if self._state is not None else self.reader.state_dict()
