"""Dedup: exact (normalized-content hash) then MinHash LSH near-duplicates with datasketch.

Two streaming passes over the filtered shards, in a fixed order:
1. each document gets a position; its normalized text (lower-cased, whitespace collapsed) is hashed and an
   exact repeat is dropped at once. Otherwise a MinHash over its word n-gram shingles (FineWeb: 5-grams) is
   queried against and inserted into a datasketch `MinHashLSH` with the configured threshold; every candidate
   pair is joined in a union-find, so clusters are transitive (A~B and B~C put A, B, C together);
2. each cluster keeps its earliest document (lowest position: deterministic whatever the LSH bucket order)
   and the shards are rewritten without the others.

Banding is FineWeb's 14 x 8 unless `dedup.threshold` asks datasketch to choose; the stats record the bands and
rows used and the similarity they imply, (1/bands)^(1/rows).

Trade-off: the LSH index and the exact-hash set live in memory (about 1 KB of signature per document at 112
permutations), which is fine to millions of documents; the curation issue replaces them with band-sorted
signatures spilled to disk.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import xxhash

from stages import storage
from stages.config import DedupConfig, PipelineConfig
from stages.documents import ShardWriter, read_docs
from stages.filter import output as filter_output
from stages.stage import Log, StageResult, committed_shards, run_stage, stage_identity, upstream_digest
from stages.storage import StageOutput

WORD = re.compile(r"\w+", re.UNICODE)
BATCH = 2048


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def shingles(text: str, n: int) -> set[bytes]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression keeps later finds O(1)
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller position becomes the root, so a cluster's root is its survivor
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


@dataclass
class Duplicates:
    exact: set[int]  # positions that repeat an earlier document's normalized text
    clustered: set[int]  # positions in a near-duplicate cluster (survivors included)
    clusters: UnionFind  # find(position) is the cluster's earliest position: its survivor
    bands: int
    rows: int

    @property
    def near(self) -> set[int]:
        return {p for p in self.clustered if self.clusters.find(p) != p}


def find_duplicates(texts: Iterable[str], dc: DedupConfig) -> Duplicates:
    """Pass 1 over texts in corpus order (position = index): exact repeats and near-duplicate clusters."""
    from datasketch import MinHash, MinHashLSH

    if dc.threshold is None:
        lsh = MinHashLSH(num_perm=dc.num_perm, params=(dc.bands, dc.rows))
    else:
        lsh = MinHashLSH(threshold=dc.threshold, num_perm=dc.num_perm)
    seen_exact: set[int] = set()
    found = Duplicates(set(), set(), UnionFind(), lsh.b, lsh.r)
    signatures_by_position: dict[int, np.ndarray] = {}

    def index(batch: list[tuple[int, str]]) -> None:
        signatures = MinHash.bulk(
            [shingles(text, dc.ngram) for _, text in batch],
            num_perm=dc.num_perm,
            seed=dc.seed,
            hashfunc=xxhash.xxh32_intdigest,
        )
        for (pos, _), signature in zip(batch, signatures):
            for other in lsh.query(signature):
                if dc.verify and np.mean(signatures_by_position[other] == signature.hashvalues) < dc.nominal_threshold:
                    continue
                found.clusters.union(pos, other)
                found.clustered.update((pos, other))
            lsh.insert(pos, signature, check_duplication=False)
            if dc.verify:
                signatures_by_position[pos] = signature.hashvalues

    batch: list[tuple[int, str]] = []
    for position, text in enumerate(texts):
        key = xxhash.xxh3_64_intdigest(normalize(text).encode())
        if key in seen_exact:
            found.exact.add(position)
            continue
        seen_exact.add(key)
        batch.append((position, text))
        if len(batch) >= BATCH:
            index(batch)
            batch = []
    if batch:
        index(batch)
    return found


def output(cfg: PipelineConfig) -> StageOutput:
    return StageOutput("dedup", storage.join(cfg.storage.root, "dedup"), cfg.storage)


def run(cfg: PipelineConfig, log: Log = print) -> dict:
    upstream = filter_output(cfg)
    shards = committed_shards(upstream)
    out = output(cfg)
    identity = stage_identity(__name__, cfg, "dedup", upstream_digest(upstream))

    def build() -> StageResult:
        texts = (doc.text for shard in shards for doc in read_docs(storage.join(upstream.uri, shard), cfg.storage))
        found = find_duplicates(texts, cfg.dedup)
        exact, near, clusters = found.exact, found.near, found.clusters
        cluster_sizes = Counter(clusters.find(p) for p in found.clustered)
        position = 0
        files: list[str] = []
        docs_in = bytes_in = docs_out = bytes_out = 0
        for shard in shards:
            with ShardWriter(out.uri, shard.removesuffix(".parquet"), cfg.ingest.docs_per_shard, cfg.storage) as w:
                for doc in read_docs(storage.join(upstream.uri, shard), cfg.storage):
                    docs_in += 1
                    bytes_in += len(doc.text.encode("utf-8"))
                    if position not in exact and position not in near:
                        w.write(doc)
                    position += 1
            files += w.files
            docs_out += w.docs
            bytes_out += w.text_bytes
        histogram = Counter(cluster_sizes.values())
        log(f"dedup: {len(exact)} exact and {len(near)} near duplicates in {len(cluster_sizes)} clusters")
        counts = {
            "docs_in": docs_in,
            "bytes_in": bytes_in,
            "docs_out": docs_out,
            "bytes_out": bytes_out,
            "removed": {"exact": len(exact), "near": len(near)},
        }
        stats = {
            "clusters": len(cluster_sizes),
            "cluster_size_histogram": {str(k): v for k, v in sorted(histogram.items())},
            "lsh": {
                "bands": found.bands,
                "rows": found.rows,
                "implied_threshold": round((1 / found.bands) ** (1 / found.rows), 3),
                "verified": cfg.dedup.verify,
            },
        }
        return StageResult(files, counts, stats)

    return run_stage(out, identity, build, log)
