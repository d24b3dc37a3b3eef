"""Mixtures: training batches drawn block by block from several token datasets, by weight (`train.mixture`).

Design:
- one litdata StreamingDataLoader per source, batch size 1 (a block per draw), shuffled and split per rank by
  litdata exactly as a single dataset is, each with its own epochs;
- the source of every block is drawn by a `random.Random` seeded with `train.seed`, the same on every rank: the
  ranks draw the same sequence of sources (each its own blocks of them). A global batch then holds the sources
  in the same shares on every rank, and a capped source runs out at the same step everywhere without a collective;
- counts per source: blocks drawn on this rank and epochs over it (blocks drawn / the source's blocks per rank);
- `max_epochs` caps the blocks drawn at max_epochs x blocks per rank (the trainer agrees on the smallest count
  over the ranks at start). A source at its cap is exhausted: `renormalize` leaves it out of the draws, the other
  weights scaled up; `stop` finishes the batch from the others, then the next read raises `DataExhausted`, and the
  trainer ends the run at its last full step. With every source exhausted, both stop;
- the state (the draw generator, per source its loader position, blocks drawn, and which are exhausted) is saved
  per rank in every checkpoint: a resumed run draws exactly the blocks the uninterrupted run would have
  (tests/test_mixture.py).

Why not litdata's CombinedStreamingDataset: it draws by weight and can stop or go on when one dataset ends
(`iterate_over_all`), but it cannot cap repetition of one source per epochs while the others go on repeating,
nor does it say how many epochs each source has had.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.train import loader as loader_lib


class DataExhausted(RuntimeError):
    """A source of a `stop` mixture reached its max_epochs (or every source did): training ends here."""


@dataclass
class Source:
    name: str
    weight: float
    loader: object  # litdata StreamingDataLoader, batch size 1
    max_epochs: float | None = None
    index_digest: str = ""  # of its train split: a saved position is relocated only onto the same data
    epoch_blocks: int = 0  # blocks per epoch on this rank (set by `Mixture`, lowered by `agree_epoch_blocks`)
    drawn: int = 0
    exhausted: bool = False
    _it: object = None

    @property
    def cap(self) -> int | None:
        return None if self.max_epochs is None else int(self.max_epochs * self.epoch_blocks)

    @property
    def epochs(self) -> float:
        return self.drawn / self.epoch_blocks if self.epoch_blocks else 0.0


class Mixture:
    """Endless batches of `batch_size` blocks, each block from a source drawn by weight."""

    def __init__(
        self,
        sources: list[Source],
        batch_size: int,
        seed: int,
        on_exhausted: str = "renormalize",
        log: Callable[[str], None] = print,
    ):
        if on_exhausted not in ("stop", "renormalize"):
            raise ValueError(f"on_exhausted: stop or renormalize, got {on_exhausted!r}")
        self.sources = sources
        self.batch_size = batch_size
        self.on_exhausted = on_exhausted
        self.log = log
        self.rng = random.Random(seed)
        for source in sources:
            source.epoch_blocks = len(source.loader.dataset)
            if source.epoch_blocks == 0:
                raise RuntimeError(f"mixture source {source.name}: no block of this rank's share of its data")

    def agree_epoch_blocks(self, smallest: Callable[[list[int]], list[int]]) -> None:
        """Blocks per epoch as the rank holding fewest has them (`smallest`: an all-reduce MIN over the ranks), so
        that every rank's cap falls on the same draw."""
        for source, blocks in zip(self.sources, smallest([s.epoch_blocks for s in self.sources])):
            source.epoch_blocks = blocks

    def _live(self) -> list[Source]:
        return [s for s in self.sources if not s.exhausted]

    def read(self) -> torch.Tensor:
        live = self._live()
        if not live or (self.on_exhausted == "stop" and len(live) < len(self.sources)):
            raise DataExhausted(self._why_exhausted())
        blocks = []
        for _ in range(self.batch_size):
            live = self._live()
            if not live:
                raise DataExhausted(self._why_exhausted())
            (source,) = self.rng.choices(live, weights=[s.weight for s in live])
            blocks.append(self._draw(source))
        return torch.stack(blocks)

    def _draw(self, source: Source) -> torch.Tensor:
        while True:
            if source._it is None:
                source._it = iter(source.loader)
            try:
                block = next(source._it)[0]
                break
            except StopIteration:
                source._it = None
                self.log(f"data: source {source.name}: epoch {source.loader.current_epoch + 1} starts")
        source.drawn += 1
        if source.cap is not None and source.drawn >= source.cap:
            source.exhausted = True
            rest = ", ".join(s.name for s in self._live())
            then = "training stops" if self.on_exhausted == "stop" or not rest else f"the draws go on over {rest}"
            self.log(
                f"data: source {source.name} exhausted after {source.epochs:.2f} epochs (max_epochs "
                f"{source.max_epochs:g}, {source.drawn} blocks on this rank): {then}"
            )
        return block

    def _why_exhausted(self) -> str:
        done = [f"{s.name} ({s.epochs:.2f} epochs, max_epochs {s.max_epochs:g})" for s in self.sources if s.exhausted]
        return f"training data exhausted: {', '.join(done)} (train.mixture.on_exhausted: {self.on_exhausted})"

    def counts(self, state: dict | None = None) -> dict[str, dict]:
        """Per source, on this rank: blocks drawn, epochs over it, and whether it is exhausted; as of `state` (one
        of this mixture's `state_dict()`s, e.g. the read-ahead's last handed-out batch), else now."""
        state = state or self.state_dict()
        out = {}
        for s in self.sources:
            entry = state["sources"][s.name]
            epochs = entry["drawn"] / s.epoch_blocks
            out[s.name] = {"blocks": entry["drawn"], "epochs": round(epochs, 4), "exhausted": entry["exhausted"]}
        return out

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.getstate(),
            "sources": {
                s.name: {
                    "loader": s.loader.state_dict(),
                    "drawn": s.drawn,
                    "exhausted": s.exhausted,
                    "index_digest": s.index_digest,
                }
                for s in self.sources
            },
        }

    def load_state_dict(self, state: dict, saved_world_size=None) -> None:
        saved = state["sources"]
        missing = sorted(set(saved) ^ {s.name for s in self.sources})
        if missing:
            raise ValueError(
                f"the checkpoint's mixture has sources {sorted(saved)}, this config {[s.name for s in self.sources]}"
            )
        self.rng.setstate(state["rng"])
        for source in self.sources:
            entry = saved[source.name]
            same = entry["index_digest"] == source.index_digest
            loader_lib.restore(source.loader, entry["loader"], same, saved_world_size, self.log)
            source.drawn, source.exhausted, source._it = entry["drawn"], entry["exhausted"], None
