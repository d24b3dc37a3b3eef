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

import xxhash

from stages import storage
from stages.config import PipelineConfig
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


def find_duplicates(cfg: PipelineConfig, in_uri: str, shards: list[str]) -> tuple[set[int], set[int], UnionFind, tuple]:
    """Pass 1: positions removed as exact repeats, positions in near-duplicate clusters, and the clusters."""
    from datasketch import MinHash, MinHashLSH

    dc = cfg.dedup
    if dc.threshold is None:
        lsh = MinHashLSH(num_perm=dc.num_perm, params=(dc.bands, dc.rows))
    else:
        lsh = MinHashLSH(threshold=dc.threshold, num_perm=dc.num_perm)
    seen_exact: set[int] = set()
    exact: set[int] = set()
    clustered: set[int] = set()
    clusters = UnionFind()
    position = 0

    def index(batch: list[tuple[int, str]]) -> None:
        signatures = MinHash.bulk(
            [shingles(text, dc.ngram) for _, text in batch],
            num_perm=dc.num_perm,
            seed=dc.seed,
            hashfunc=xxhash.xxh32_intdigest,
        )
        for (pos, _), signature in zip(batch, signatures):
            for other in lsh.query(signature):
                clusters.union(pos, other)
                clustered.update((pos, other))
            lsh.insert(pos, signature, check_duplication=False)

    batch: list[tuple[int, str]] = []
    for shard in shards:
        for doc in read_docs(storage.join(in_uri, shard), cfg.storage):
            key = xxhash.xxh3_64_intdigest(normalize(doc.text).encode())
            if key in seen_exact:
                exact.add(position)
            else:
                seen_exact.add(key)
                batch.append((position, doc.text))
                if len(batch) >= BATCH:
                    index(batch)
                    batch = []
            position += 1
    if batch:
        index(batch)
    return exact, clustered, clusters, (lsh.b, lsh.r)


def output(cfg: PipelineConfig) -> StageOutput:
    return StageOutput("dedup", storage.join(cfg.storage.root, "dedup"), cfg.storage)


def run(cfg: PipelineConfig, log: Log = print) -> dict:
    upstream = filter_output(cfg)
    shards = committed_shards(upstream)
    out = output(cfg)
    identity = stage_identity(__name__, cfg, "dedup", upstream_digest(upstream))

    def build() -> StageResult:
        exact, clustered, clusters, (bands, rows) = find_duplicates(cfg, upstream.uri, shards)
        cluster_sizes = Counter(clusters.find(p) for p in clustered)
        near = {p for p in clustered if clusters.find(p) != p}
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
            "lsh": {"bands": bands, "rows": rows, "implied_threshold": round((1 / bands) ** (1 / rows), 3)},
        }
        return StageResult(files, counts, stats)

    return run_stage(out, identity, build, log)
