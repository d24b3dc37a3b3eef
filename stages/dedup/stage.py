"""Dedup: exact (normalized-content hash) and MinHash near-duplicates, in parallel, resumable units.

Phases, each a set of units with completion markers in `_progress/` (a killed run redoes only unfinished
units); scratch files live in `_work/` and are removed once the manifest is written:

1. signatures, one unit per filtered shard: the exact key and the MinHash band keys of every document, sorted
   into the shard's table file (stages/dedup/minhash.py);
2. buckets, one unit per (table, key range): documents sharing a key become candidate pairs. Table 0 is the
   exact key: its pairs are exact repeats, removed without further checks;
3. verification (`dedup.verify`), one unit per shard: the shingle hashes of documents in candidate pairs are
   written, then each pair is kept only if its exact Jaccard similarity reaches the threshold;
4. clusters, in one process: connected components over all pairs (transitive), the earliest document of each
   cluster survives (deterministic whatever the order units finished in);
5. write, one unit per shard: the shard without its removed documents, and beside each output shard its kept
   documents' rows of the band tables (`signatures/`): the index a later dedup joins against.

`dedup.against` names earlier dedup outputs whose kept documents count as already seen (a data refresh sets it to
every part of the dataset so far: stages/tools/ledger.py). Their `signatures/` tables join phase 2 as they are, numbered
before this run's shards, so a cluster holding one of them keeps it; pairs among them are dropped (theirs was
decided when they were built) and only this run's documents are ever removed. No MinHash is computed for them
again; the price is that phase 2 reads their keys once per run.

With `dedup.index: redis`, phase 2's band tables are replaced by datasketch's `MinHashLSH` on a Redis server
that every worker shares: all workers insert their shards, then all query them, so the pairs found do not
depend on which worker ran first (a query made before another worker's insert would miss it).

Memory: a signature unit holds one shard's keys, a bucket unit at most `bucket_records` records (the number
of key ranges grows with the corpus), a verification unit a few shards' shingle hashes. What grows with the
corpus is the list of candidate pairs, which is proportional to the duplicates, not to the documents.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from stages.core import storage
from stages.core.banding import Banding
from stages.core.config import PipelineConfig
from stages.core.stage import Build, Log, OnProgress, Progress, Stage, StageResult, committed_shards, run_units
from stages.core.storage import StageOutput
from stages.dedup import browse, minhash, units
from stages.dedup.minhash import EXACT_TABLE
from stages.dedup.units import SIGNATURES

WORK = "_work"


@dataclass
class SeenBefore:
    """The earlier dedup outputs of `dedup.against`: their kept shards, each shard's signature index, and the
    outputs' manifest digests (part of this output's identity)."""

    shards: list[str]
    tables: list[str]
    digests: list[str]


def seen_before(cfg: PipelineConfig) -> SeenBefore:
    seen = SeenBefore([], [], [])
    for uri in cfg.dedup.against:
        earlier = StageOutput("dedup", uri, cfg.storage)
        manifest = earlier.manifest()
        if manifest is None:
            raise ValueError(f"dedup.against: {uri} is not a finished dedup output (no manifest)")
        for name in committed_shards(earlier):
            index = f"{SIGNATURES}/{name.removesuffix('.parquet')}.bin"
            if index not in manifest["files"]:
                raise ValueError(
                    f"dedup.against: {uri} keeps no signature index ({index}): an earlier version of the dedup "
                    "stage made it; rebuild it"
                )
            seen.shards.append(earlier.path(name))
            seen.tables.append(earlier.path(index))
        seen.digests.append(manifest["digest"])
    return seen


def fingerprints(cfg: PipelineConfig) -> dict:
    """The earlier dedup outputs this one is deduplicated against (a data refresh's parts), by digest."""
    return {"against": seen_before(cfg).digests} if cfg.dedup.against else {}


@dataclass
class Phases:
    """Runs each phase's units and keeps what the stats report: seconds per phase, units resumed. Progress is the
    stage's as a whole: each of the `planned` phases one equal part of it."""

    progress: Progress
    workers: int
    log: Log
    dask_address: str | None
    planned: int
    on_progress: OnProgress | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    resumed: int = 0
    finished: int = 0  # phases run so far

    def run(self, name: str, jobs: dict, work) -> dict:
        started, before = time.perf_counter(), min(self.finished, self.planned - 1)
        self.finished += 1
        overall = None
        if self.on_progress:
            def overall(done: int, total: int) -> None:  # noqa: E306
                self.on_progress(before * 1000 + 1000 * done // max(total, 1), self.planned * 1000)

        results, done = run_units(self.progress, jobs, work, self.workers, self.log, self.dask_address, overall)
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self.resumed += done
        self.log(f"dedup: {name}: {len(jobs)} units in {self.seconds[name]:.1f}s")
        return results


@dataclass
class Plan:
    """The shards this run reads: earlier parts' kept shards first (so in a cluster with one of them, one of
    them survives), then the filtered shards, whose positions are `new`."""

    seen: SeenBefore
    shards: list[str]  # the filtered shards' names
    shard_uris: list[str]
    work: str

    @property
    def n_seen(self) -> int:
        return len(self.seen.shards)

    @property
    def new(self) -> range:
        return range(self.n_seen, len(self.shard_uris))


def candidate_pairs(b: Build, plan: Plan, phases: Phases, banding: Banding) -> tuple[dict[str, str], int, int]:
    """Phases 1 and 2 (or the Redis index): the pair files by unit, the earlier parts' documents and the number
    of key ranges."""
    dc, st, work = b.cfg.dedup, b.cfg.storage, plan.work
    redis = dc.index == "redis"
    signed = phases.run(
        "signatures",
        {f"signatures-{i:05d}": i for i in plan.new},
        partial(units.signature_unit, shard_uris=plan.shard_uris, work=work, banding=banding, redis=redis, cfg=st,
                progress=phases.progress),
    )  # fmt: skip
    seen_docs = sum(storage.read_json(uri + ".json", st)["docs"] for uri in plan.seen.tables)
    total_docs = seen_docs + sum(r["docs"] for r in signed.values())
    table_files = plan.seen.tables + [units.tables_uri(work, i) for i in plan.new]
    tables = [EXACT_TABLE] if redis else range(1 + banding.bands)
    parts = minhash.partitions_for(total_docs, dc.bucket_records)
    bucket_units = {f"buckets-{t:03d}-{p:04d}": (t, p, parts) for t in tables for p in range(parts)}
    phases.run(
        "buckets",
        bucket_units,
        partial(units.bucket_unit, tables=table_files, seen=plan.n_seen, work=work, all_pairs=dc.verify, cfg=st,
                progress=phases.progress),
    )  # fmt: skip
    pair_files = {unit: storage.join(work, "pairs", f"{unit}.npy") for unit in bucket_units}
    if redis:
        pair_files.update(redis_pairs(b, plan, phases, banding))
    return pair_files, seen_docs, parts


def redis_pairs(b: Build, plan: Plan, phases: Phases, banding: Banding) -> dict[str, str]:
    """Phase 2 on a shared Redis MinHashLSH index: every shard inserted, then every shard queried."""
    dc = b.cfg.dedup
    basename = f"dedup-{storage.digest_of(b.identity)}"  # (the same for a resumed build: its inserts are kept)
    lsh_work = partial(units.redis_unit, work=plan.work, redis_url=dc.redis_url, banding=banding, basename=basename,
                       cfg=b.cfg.storage, progress=phases.progress)  # fmt: skip
    inserts = {f"redis-insert-{i:05d}": ("insert", i) for i in range(len(plan.shards))}
    queries = {f"redis-query-{i:05d}": ("query", i) for i in range(len(plan.shards))}
    phases.run("redis_insert", inserts, lsh_work)
    phases.run("redis_query", queries, lsh_work)
    units.drop_redis_keys(dc.redis_url, basename)  # every pair is on disk now; the index has done its job
    return {u: storage.join(plan.work, "pairs", f"{u}.npy") for u in queries}


def verified(b: Build, plan: Plan, phases: Phases, near: np.ndarray, threshold: float) -> np.ndarray:
    """Phase 3: only the candidate pairs whose exact Jaccard similarity reaches the threshold."""
    st, work = b.cfg.storage, plan.work
    shards_of, rows_of = minhash.split_doc_numbers(np.unique(near))
    wanted = {int(s): rows_of[shards_of == s] for s in np.unique(shards_of)}
    phases.run(
        "shingles",
        {f"shingles-{s:05d}": (s, rows) for s, rows in wanted.items()},
        partial(units.shingle_unit, shard_uris=plan.shard_uris, work=work, ngram=b.cfg.dedup.ngram, cfg=st,
                progress=phases.progress),
    )  # fmt: skip
    checks = {f"verify-{s:05d}": (s, pairs) for s, pairs in units.by_first_shard(near).items()}
    phases.run("verify", checks, partial(units.verify_unit, work=work, threshold=threshold, cfg=st,
                                         progress=phases.progress))  # fmt: skip
    return units.load_pairs([storage.join(work, "verified", f"{s:05d}.npy") for s, _ in checks.values()], st)


def build(b: Build) -> StageResult:
    cfg, docs, dc = b.cfg, b.inputs["docs"], b.cfg.dedup
    banding = Banding.from_config(dc)
    threshold = dc.threshold if dc.threshold is not None else banding.implied_threshold
    chosen = f" chosen for threshold {dc.threshold}" if dc.threshold is not None else ""
    b.log(f"dedup: {banding.describe()}{chosen}{', candidates verified' if dc.verify else ''}")
    seen, shards = seen_before(cfg), committed_shards(docs)
    plan = Plan(seen, shards, seen.shards + [docs.path(s) for s in shards], b.out.path(WORK))
    planned = 3 + 2 * (dc.index == "redis") + 2 * dc.verify  # signatures, buckets, [redis x2], [verify x2], write
    phases = Phases(Progress(b.out), dc.workers, b.log, cfg.cluster.dask_address, planned, b.progress)
    pair_files, seen_docs, parts = candidate_pairs(b, plan, phases, banding)
    exact_units = f"buckets-{EXACT_TABLE:03d}-"
    exact_pairs = units.load_pairs([f for u, f in pair_files.items() if u.startswith(exact_units)], cfg.storage)
    exact_removed = np.unique(exact_pairs[:, 1])
    near = units.load_pairs([f for u, f in pair_files.items() if not u.startswith(exact_units)], cfg.storage)
    # An exact repeat has the same band keys as the copy that survives it, so its pairs are also that copy's.
    near = near[~np.isin(near, exact_removed).any(axis=1)]
    candidates = len(near)
    if dc.verify and len(near):
        near = verified(b, plan, phases, near, threshold)
    started = time.perf_counter()
    members, survivors = minhash.clusters(np.concatenate([exact_pairs, near]))
    # only this run's documents are removed: two earlier ones in a cluster joined by a new one both stay
    removable = (members != survivors) & ((members >> np.uint64(32)) >= plan.n_seen)
    removed, removed_survivor = members[removable], survivors[removable]
    sizes = Counter(survivors.tolist())
    phases.seconds["clusters"] = round(time.perf_counter() - started, 3)
    results = write_shards(b, plan, phases, removed, removed_survivor, np.isin(removed, exact_removed))
    counts = {key: sum(r[key] for r in results) for key in ("docs_in", "bytes_in", "docs_out", "bytes_out")}
    counts["removed"] = {"exact": int(exact_removed.size), "near": int(removed.size - exact_removed.size)}
    b.log(f"dedup: {counts['removed']['exact']} exact and {counts['removed']['near']} near duplicates "
          f"in {len(sizes)} clusters")  # fmt: skip
    stats = {
        "input": docs.uri,  # (where the positions in removed/ point: stages/dedup/browse.py reads the clusters there)
        "clusters": len(sizes),
        "cluster_size_histogram": minhash.histogram(sizes.values()),
        "lsh": {"bands": banding.bands, "rows": banding.rows, "implied_threshold": round(banding.implied_threshold, 3),
                "index": dc.index, "key_ranges": parts},  # fmt: skip
        "pairs": {"candidates": candidates, "verified": dc.verify, "kept": int(len(near))},
        "verify_threshold": round(threshold, 3) if dc.verify else None,
        "phase_seconds": phases.seconds,
        "units_resumed": phases.resumed,
        "seen_before": {
            "parts": len(dc.against),
            "docs": seen_docs,
            "removed": int(((removed_survivor >> np.uint64(32)) < plan.n_seen).sum()),  # as copies of those
        },
    }
    return StageResult([f for r in results for f in r["files"]], counts, stats)


def write_shards(b: Build, plan: Plan, phases: Phases, removed, removed_survivor, removed_exact) -> list[dict]:
    """Phase 5: each new shard without its removed documents (and its kept documents' band keys)."""
    removed_shard, removed_row = minhash.split_doc_numbers(removed)
    jobs = {}
    for i in plan.new:
        mine = removed_shard == i
        name = plan.shards[i - plan.n_seen]
        jobs[f"write-{i:05d}"] = (i, name, removed_row[mine], removed_survivor[mine], removed_exact[mine])
    written = phases.run(
        "write",
        jobs,
        partial(
            units.write_unit,
            in_uri=b.inputs["docs"].uri,
            out_uri=b.out.uri,
            work=plan.work,
            shards=plan.seen.shards + plan.shards,  # (how removed/ names a survivor: an earlier part's by its URI)
            docs_per_shard=b.cfg.ingest.docs_per_shard,
            cfg=b.cfg.storage,
            progress=phases.progress,
        ),
    )
    return [written[f"write-{i:05d}"] for i in plan.new]


STAGE = Stage(
    name="dedup",
    folder="dedup",
    package=__package__,
    sections=("dedup",),
    build=build,
    needs=("docs",),
    fingerprints=fingerprints,
    units=True,
    scratch=(WORK,),  # (the manifest is written, nothing reads it again)
    funnel="dedup",
    code_also=("stages.core.banding",),  # (bands x rows for a threshold: beside the config, which checks it)
    code_exclude=("browse.py",),  # (it reads the output, never makes it)
    show=browse.artifacts,
)
