"""The LSH banding `dedup`'s settings describe: how many bands of how many rows a MinHash signature is cut into,
and which Jaccard similarity that finds. Pure arithmetic on the config, kept beside it so that loading a config
can refuse a `dedup.threshold` the banding cannot realise before any work starts (stages/core/config.py); the
dedup stage (stages/dedup/) uses the same object to build its band keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stages.core.config import DedupConfig

# A `dedup.threshold` the banding must realise (Banding.misses): without verification its half point within this
# of the threshold; with it, a pair at the threshold a candidate at least this often.
HALF_POINT_SLACK = 0.05
MIN_RECALL = 0.75


@dataclass(frozen=True)
class Banding:
    bands: int
    rows: int
    seed: int
    ngram: int

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def implied_threshold(self) -> float:
        """The similarity at which a pair becomes a candidate with probability about one half."""
        return (1 / self.bands) ** (1 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        """The chance that a pair of this Jaccard similarity shares at least one band: 1 - (1 - s^r)^b."""
        return 1 - (1 - similarity**self.rows) ** self.bands

    @property
    def half_point(self) -> float:
        """The similarity found with probability one half (exact; implied_threshold is its approximation)."""
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if self.candidate_probability(mid) < 0.5 else (low, mid)
        return (low + high) / 2

    def misses(self, threshold: float, verify: bool) -> str | None:
        """Why this banding cannot realise `threshold`, or None. Without verification the banding is the threshold,
        so its half point must lie within HALF_POINT_SLACK of it; with verification candidates are checked exactly,
        and what matters is that a pair at the threshold becomes a candidate at least MIN_RECALL of the time."""
        shape = f"{self.num_perm} permutations ({self.bands} bands x {self.rows} rows, the best split for it)"
        if verify and self.candidate_probability(threshold) < MIN_RECALL:
            return (
                f"threshold {threshold}: with {shape} a pair at {threshold} is a candidate with probability "
                f"{self.candidate_probability(threshold):.2f} (< {MIN_RECALL}); give more bands x rows"
            )
        if not verify and abs(self.half_point - threshold) > HALF_POINT_SLACK:
            return (
                f"threshold {threshold}: with {shape} pairs are found from a similarity of about "
                f"{self.half_point:.2f}, not {threshold}; give more bands x rows (FineWeb: 14 x 8)"
            )
        return None

    def describe(self) -> str:
        found = f"pairs found from a Jaccard similarity of about {self.half_point:.2f}"
        return f"{self.bands} bands x {self.rows} rows: {found}"

    @classmethod
    def from_config(cls, dc: DedupConfig) -> "Banding":
        """FineWeb's bands x rows, or datasketch's choice for `threshold` within bands x rows permutations.

        With verification on, a false candidate costs one exact comparison while a missed pair is lost, so
        the choice weighs misses 19 times more than false candidates (it picks 14 x 8 at 0.8); without it,
        both errors weigh the same, as in datasketch's default.
        """
        if dc.threshold is None:
            return cls(dc.bands, dc.rows, dc.seed, dc.ngram)
        from datasketch.lsh import _optimal_param

        weights = (0.05, 0.95) if dc.verify else (0.5, 0.5)
        bands, rows = _optimal_param(dc.threshold, dc.bands * dc.rows, *weights)
        return cls(bands, rows, dc.seed, dc.ngram)
