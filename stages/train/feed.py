"""What a rank's batches come from: the run's dataset through litdata (`loader.Epochs`), or a `Mixture` of the
sources of `train.mixture`, and the validation batches of each; per-source counts for the metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train import loader as loader_lib
from stages.train.data import mixture_sources
from stages.train.mixture import Mixture, Source
from stages.train.protocol import log


def load_val_batches(cfg: PipelineConfig, device: torch.device, data: str | None = None) -> list[torch.Tensor]:
    """A few validation batches of the run's dataset (or `data`), identical in count on every rank (FSDP forwards
    are collectives)."""
    uri = loader_lib.dataset_uri(cfg, "val", data)
    index = storage.join(uri, loader_lib.INDEX)
    if not storage.exists(index, cfg.storage) or not storage.read_json(index, cfg.storage).get("chunks"):
        # (a small corpus can leave the split empty, which litdata refuses to open)
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


def source_counts(mixture: Mixture, state: dict, world: int, seq_len: int) -> dict[str, dict]:
    """Per source over all ranks (they draw alike): tokens trained on, epochs over it, exhausted or not."""
    counts = mixture.counts(state)
    return {
        name: {"tokens": c["blocks"] * world * seq_len, "epochs": c["epochs"], "exhausted": c["exhausted"]}
        for name, c in counts.items()
    }
