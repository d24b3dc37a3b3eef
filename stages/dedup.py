"""Dedup: exact (normalized-content hash) and MinHash near-duplicates, in parallel, resumable units.

Phases, each a set of units with completion markers in `_progress/` (a killed run redoes only unfinished
units); scratch files live in `_work/` and are removed once the manifest is written:

1. signatures, one unit per filtered shard: the exact key and the MinHash band keys of every document, sorted
   into the shard's table file (stages/minhash.py);
2. buckets, one unit per (table, key range): documents sharing a key become candidate pairs. Table 0 is the
   exact key: its pairs are exact repeats, removed without further checks;
3. verification (`dedup.verify`), one unit per shard: the shingle hashes of documents in candidate pairs are
   written, then each pair is kept only if its exact Jaccard similarity reaches the threshold;
4. clusters, in one process: connected components over all pairs (transitive), the earliest document of each
   cluster survives (deterministic whatever the order units finished in);
5. write, one unit per shard: the shard without its removed documents, and beside each output shard its kept
   documents' rows of the band tables (`signatures/`): the index a later dedup joins against.

`dedup.against` names earlier dedup outputs whose kept documents count as already seen (a data refresh sets it to
every part of the dataset so far: stages/dataset.py). Their `signatures/` tables join phase 2 as they are, numbered
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
from dataclasses import dataclass
from functools import partial

import numpy as np

from stages import minhash, storage
from stages.config import PipelineConfig, StorageConfig
from stages.documents import ShardWriter, read_docs
from stages.filter import output as filter_output
from stages.minhash import EXACT_TABLE, Banding
from stages.stage import (
    Force,
    Log,
    Progress,
    StageResult,
    committed_shards,
    run_stage,
    run_units,
    stage_identity,
    upstream_digest,
    versioned_output,
)
from stages.storage import StageOutput

WORK = "_work"
REMOVED = "removed"
SIGNATURES = "signatures"
BATCH = 2048


def tables_uri(work: str, shard: int) -> str:
    return storage.join(work, "tables", f"{shard:05d}.bin")


def signature_unit(
    unit: str,
    shard: int,
    shard_uris: list[str],
    work: str,
    banding: Banding,
    redis: bool,
    cfg: StorageConfig | None,
    progress: Progress,
) -> dict:
    texts = [doc.text for doc in read_docs(shard_uris[shard], cfg)]
    keys = np.empty((1 + banding.bands, len(texts)), dtype=np.uint64)
    signatures = []
    for start in range(0, len(texts), BATCH):
        batch_keys, batch_signatures = minhash.band_keys(texts[start : start + BATCH], banding)
        keys[:, start : start + BATCH] = batch_keys
        signatures.append(batch_signatures)
    docs = np.array([minhash.doc_number(shard, row) for row in range(len(texts))], dtype=np.uint64)
    # every table, even with the Redis index: the kept documents' rows of them become the output's signature index
    minhash.write_tables(tables_uri(work, shard), keys, docs, cfg)
    if redis:  # the Redis index takes datasketch MinHash objects, so it needs the whole signatures too
        matrix = np.concatenate(signatures) if signatures else np.empty((0, banding.num_perm), dtype=np.uint32)
        minhash.save_array(storage.join(work, "signatures", f"{shard:05d}.npy"), matrix, cfg)
    result = {"docs": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    progress.mark(unit, result)
    return result


def bucket_unit(
    unit: str,
    job: tuple[int, int, int],
    tables: list[str],
    seen: int,
    work: str,
    all_pairs: bool,
    cfg: StorageConfig | None,
    progress: Progress,
) -> dict:
    """Candidate pairs of one key range of one table. The first `seen` table files are earlier parts' kept
    indexes: pairs among those documents are not this run's to decide, so only pairs with a new one are kept."""
    table, part, parts = job
    records = np.concatenate(
        [minhash.read_range_as(uri, s, table, part, parts, cfg) for s, uri in enumerate(tables)]
        or [np.empty(0, dtype=minhash.RECORD)]
    )
    pairs = minhash.bucket_pairs(records, exact_table=table == EXACT_TABLE, all_pairs=all_pairs)
    if seen:  # (pairs are (smaller, larger) and earlier parts' documents number first)
        pairs = pairs[(pairs[:, 1] >> np.uint64(32)) >= seen]
    minhash.save_array(storage.join(work, "pairs", f"{unit}.npy"), pairs, cfg)
    result = {"records": int(records.size), "pairs": int(len(pairs))}
    progress.mark(unit, result)
    return result


def redis_lsh(url: str, banding: Banding, basename: str):
    from datasketch import MinHashLSH
    from redis.connection import parse_url

    config = {"type": "redis", "basename": basename.encode(), "redis": parse_url(url)}
    return MinHashLSH(num_perm=banding.num_perm, params=(banding.bands, banding.rows), storage_config=config)


def drop_redis_keys(url: str, basename: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{basename}*", count=10_000))
    for start in range(0, len(keys), 10_000):
        client.delete(*keys[start : start + 10_000])


def redis_unit(
    unit: str,
    job: tuple[str, int],
    work: str,
    redis_url: str,
    banding: Banding,
    basename: str,
    cfg: StorageConfig | None,
    progress: Progress,
) -> dict:
    """Insert one shard's signatures into the shared index, or query them against it (after every insert)."""
    from datasketch import LeanMinHash

    action, shard = job
    lsh = redis_lsh(redis_url, banding, basename)
    matrix = minhash.load_array(storage.join(work, "signatures", f"{shard:05d}.npy"), cfg)
    lean = [LeanMinHash(seed=banding.seed, hashvalues=row, scheme="affine32") for row in matrix]
    if action == "insert":
        with lsh.insertion_session() as session:
            for row, signature in enumerate(lean):
                session.insert(str(minhash.doc_number(shard, row)), signature, check_duplication=False)
        result = {"inserted": len(lean)}
    else:
        found = []
        for row, signature in enumerate(lean):
            me = minhash.doc_number(shard, row)
            found += [(min(me, int(other)), max(me, int(other))) for other in lsh.query(signature) if int(other) != me]
        pairs = np.unique(np.array(found, dtype=np.uint64).reshape(-1, 2), axis=0)
        minhash.save_array(storage.join(work, "pairs", f"{unit}.npy"), pairs, cfg)
        result = {"pairs": int(len(pairs))}
    progress.mark(unit, result)
    return result


def shingle_unit(
    unit: str,
    job: tuple[int, np.ndarray],
    shard_uris: list[str],
    work: str,
    ngram: int,
    cfg: StorageConfig | None,
    progress: Progress,
) -> dict:
    shard, rows = job
    wanted = set(rows.tolist())
    hashes = [
        minhash.shingle_hashes(doc.text, ngram)
        for row, doc in enumerate(read_docs(shard_uris[shard], cfg))
        if row in wanted
    ]
    minhash.write_shingles(storage.join(work, "shingles", f"{shard:05d}.npz"), sorted(wanted), hashes, cfg)
    progress.mark(unit, {"docs": len(hashes)})
    return {"docs": len(hashes)}


def verify_unit(
    unit: str, job: tuple[int, np.ndarray], work: str, threshold: float, cfg: StorageConfig | None, progress: Progress
) -> dict:
    """Keep the candidate pairs (first document in this shard) whose exact shingle Jaccard reaches the threshold."""
    shard, pairs = job
    pairs = pairs[np.argsort(pairs[:, 1], kind="stable")]  # by the second document's shard: few file loads
    sets = minhash.ShingleSets(lambda s: storage.join(work, "shingles", f"{s:05d}.npz"), cfg)
    keep = np.array([minhash.jaccard(sets.get(int(a)), sets.get(int(b))) >= threshold for a, b in pairs], dtype=bool)
    kept = pairs[keep] if len(pairs) else pairs
    minhash.save_array(storage.join(work, "verified", f"{shard:05d}.npy"), np.unique(kept, axis=0), cfg)
    result = {"candidates": int(len(pairs)), "kept": int(keep.sum())}
    progress.mark(unit, result)
    return result


def write_unit(
    unit: str,
    job: tuple[int, str, np.ndarray, np.ndarray, np.ndarray],
    in_uri: str,
    out_uri: str,
    work: str,
    shards: list[str],
    docs_per_shard: int,
    cfg: StorageConfig | None,
    progress: Progress,
) -> dict:
    """The shard without its removed documents, and the list of what was removed, as which kind, in favour of
    which surviving document (its shard and row): the clusters, for inspection, without their text. Then the
    kept documents' rows of the shard's tables, one file per output shard (`signatures/`): the index a later
    dedup joins against (`dedup.against`) without computing a MinHash again."""
    import pyarrow as pa

    shard, name, rows, survivors, exact = job
    removed = {int(row): (int(survivor), bool(is_exact)) for row, survivor, is_exact in zip(rows, survivors, exact)}
    kept_rows = []
    listed = []
    docs_in = bytes_in = 0
    with ShardWriter(out_uri, name.removesuffix(".parquet"), docs_per_shard, cfg) as writer:
        for row, doc in enumerate(read_docs(storage.join(in_uri, name), cfg)):
            docs_in += 1
            bytes_in += len(doc.text.encode("utf-8"))
            if row not in removed:
                writer.write(doc)
                kept_rows.append(row)
                continue
            survivor, is_exact = removed[row]
            survivor_shard, survivor_row = survivor >> 32, survivor & 0xFFFFFFFF
            listed.append({"id": doc.id, "kind": "exact" if is_exact else "near", "shard": name, "row": row,
                           "survivor_shard": shards[survivor_shard], "survivor_row": survivor_row})  # fmt: skip
    files = list(writer.files)
    keys = minhash.keys_by_row(tables_uri(work, shard), cfg)
    for i, written in enumerate(writer.files):
        rows_in_file = np.array(kept_rows[i * docs_per_shard : (i + 1) * docs_per_shard], dtype=np.int64)
        index = f"{SIGNATURES}/{written.removesuffix('.parquet')}.bin"
        rows_out = np.arange(len(rows_in_file), dtype=np.uint64)
        minhash.write_tables(storage.join(out_uri, index), keys[:, rows_in_file], rows_out, cfg)
        files += [index, index + ".json"]
    if listed:
        files.append(f"{REMOVED}/{name}")
        minhash.write_parquet(storage.join(out_uri, files[-1]), pa.Table.from_pylist(listed), cfg)
    result = {
        "docs_in": docs_in,
        "bytes_in": bytes_in,
        "docs_out": writer.docs,
        "bytes_out": writer.text_bytes,
        "files": files,
    }
    progress.mark(unit, result)
    return result


def load_pairs(uris: list[str], cfg: StorageConfig | None) -> np.ndarray:
    arrays = [minhash.load_array(uri, cfg) for uri in uris]
    arrays = [a for a in arrays if a.size]
    return np.unique(np.concatenate(arrays), axis=0) if arrays else np.empty((0, 2), dtype=np.uint64)


def by_first_shard(pairs: np.ndarray) -> dict[int, np.ndarray]:
    shards, _ = minhash.split_doc_numbers(pairs[:, 0])
    return {int(s): pairs[shards == s] for s in np.unique(shards)}


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


def identity(cfg: PipelineConfig, upstream: StageOutput | None = None, seen: SeenBefore | None = None) -> dict:
    inputs = upstream_digest(upstream or filter_output(cfg))
    if cfg.dedup.against:
        inputs = {"filtered": inputs, "against": (seen or seen_before(cfg)).digests}
    return stage_identity(__name__, cfg, "dedup", inputs, helpers=(minhash,))


def output(cfg: PipelineConfig, ident: dict | None = None) -> StageOutput:
    """Where the output of `ident` (default: this config's identity) lives."""
    return versioned_output("dedup", "dedup", cfg, ident or identity(cfg))


def run(cfg: PipelineConfig, log: Log = print, force: Force = False) -> dict:
    upstream = filter_output(cfg)
    shards = committed_shards(upstream)
    seen = seen_before(cfg)
    ident = identity(cfg, upstream, seen)
    out = output(cfg, ident)
    dc = cfg.dedup

    def build() -> StageResult:
        banding = Banding.from_config(dc)
        threshold = dc.threshold if dc.threshold is not None else banding.implied_threshold
        chosen = f" chosen for threshold {dc.threshold}" if dc.threshold is not None else ""
        log(f"dedup: {banding.describe()}{chosen}{', candidates verified' if dc.verify else ''}")
        progress, work, st = Progress(out), out.path(WORK), cfg.storage
        # Earlier parts' kept shards number first, so in a cluster with one of them, one of them survives.
        n_seen = len(seen.shards)
        shard_uris = seen.shards + [upstream.path(s) for s in shards]
        new = range(n_seen, len(shard_uris))
        redis = dc.index == "redis"
        seconds: dict[str, float] = {}
        resumed = 0

        def phase(name: str, units: dict, work_fn) -> dict:
            nonlocal resumed
            started = time.perf_counter()
            results, done = run_units(progress, units, work_fn, dc.workers, log, cfg.cluster.dask_address)
            seconds[name] = round(time.perf_counter() - started, 3)
            resumed += done
            log(f"dedup: {name}: {len(units)} units in {seconds[name]:.1f}s")
            return results

        signed = phase(
            "signatures",
            {f"signatures-{i:05d}": i for i in new},
            partial(
                signature_unit,
                shard_uris=shard_uris,
                work=work,
                banding=banding,
                redis=redis,
                cfg=st,
                progress=progress,
            ),
        )
        seen_docs = sum(storage.read_json(uri + ".json", st)["docs"] for uri in seen.tables)
        total_docs = seen_docs + sum(r["docs"] for r in signed.values())
        table_files = seen.tables + [tables_uri(work, i) for i in new]
        tables = [EXACT_TABLE] if redis else range(1 + banding.bands)
        parts = minhash.partitions_for(total_docs, dc.bucket_records)
        bucket_units = {f"buckets-{t:03d}-{p:04d}": (t, p, parts) for t in tables for p in range(parts)}
        phase(
            "buckets",
            bucket_units,
            partial(
                bucket_unit, tables=table_files, seen=n_seen, work=work, all_pairs=dc.verify, cfg=st, progress=progress
            ),
        )
        pair_files = {unit: storage.join(work, "pairs", f"{unit}.npy") for unit in bucket_units}
        if redis:
            basename = f"dedup-{storage.digest_of(identity)}"
            lsh_work = partial(
                redis_unit,
                work=work,
                redis_url=dc.redis_url,
                banding=banding,
                basename=basename,
                cfg=st,
                progress=progress,
            )
            inserts = {f"redis-insert-{i:05d}": ("insert", i) for i in range(len(shards))}
            queries = {f"redis-query-{i:05d}": ("query", i) for i in range(len(shards))}
            phase("redis_insert", inserts, lsh_work)
            phase("redis_query", queries, lsh_work)
            drop_redis_keys(dc.redis_url, basename)  # every pair is on disk now; the index has done its job
            pair_files.update({u: storage.join(work, "pairs", f"{u}.npy") for u in queries})
        exact_units = f"buckets-{EXACT_TABLE:03d}-"
        exact_pairs = load_pairs([f for u, f in pair_files.items() if u.startswith(exact_units)], st)
        exact_removed = np.unique(exact_pairs[:, 1])
        near = load_pairs([f for u, f in pair_files.items() if not u.startswith(exact_units)], st)
        # An exact repeat has the same band keys as the copy that survives it, so its pairs are also that copy's.
        near = near[~np.isin(near, exact_removed).any(axis=1)]
        candidates = len(near)
        if dc.verify and len(near):
            shards_of, rows_of = minhash.split_doc_numbers(np.unique(near))
            wanted = {int(s): rows_of[shards_of == s] for s in np.unique(shards_of)}
            phase(
                "shingles",
                {f"shingles-{s:05d}": (s, rows) for s, rows in wanted.items()},
                partial(shingle_unit, shard_uris=shard_uris, work=work, ngram=dc.ngram, cfg=st, progress=progress),
            )
            checks = {f"verify-{s:05d}": (s, pairs) for s, pairs in by_first_shard(near).items()}
            phase("verify", checks, partial(verify_unit, work=work, threshold=threshold, cfg=st, progress=progress))
            near = load_pairs([storage.join(work, "verified", f"{s:05d}.npy") for s, _ in checks.values()], st)

        started = time.perf_counter()
        members, survivors = minhash.clusters(np.concatenate([exact_pairs, near]))
        # only this run's documents are removed: two earlier ones in a cluster joined by a new one both stay
        removable = (members != survivors) & ((members >> np.uint64(32)) >= n_seen)
        removed = members[removable]
        sizes = Counter(survivors.tolist())
        seconds["clusters"] = round(time.perf_counter() - started, 3)
        removed_survivor = survivors[removable]
        removed_exact = np.isin(removed, exact_removed)
        removed_shard, removed_row = minhash.split_doc_numbers(removed)
        jobs = {}
        for i in new:
            mine = removed_shard == i
            name = shards[i - n_seen]
            jobs[f"write-{i:05d}"] = (i, name, removed_row[mine], removed_survivor[mine], removed_exact[mine])
        written = phase(
            "write",
            jobs,
            partial(
                write_unit,
                in_uri=upstream.uri,
                out_uri=out.uri,
                work=work,
                shards=seen.shards + shards,  # (how removed/ names a survivor: an earlier part's by its URI)
                docs_per_shard=cfg.ingest.docs_per_shard,
                cfg=st,
                progress=progress,
            ),
        )
        results = [written[f"write-{i:05d}"] for i in new]
        counts = {key: sum(r[key] for r in results) for key in ("docs_in", "bytes_in", "docs_out", "bytes_out")}
        counts["removed"] = {"exact": int(exact_removed.size), "near": int(removed.size - exact_removed.size)}
        log(
            f"dedup: {counts['removed']['exact']} exact and {counts['removed']['near']} near duplicates "
            f"in {len(sizes)} clusters"
        )
        stats = {
            "clusters": len(sizes),
            "cluster_size_histogram": minhash.histogram(sizes.values()),
            "lsh": {
                "bands": banding.bands,
                "rows": banding.rows,
                "implied_threshold": round(banding.implied_threshold, 3),
                "index": dc.index,
                "key_ranges": parts,
            },
            "pairs": {"candidates": candidates, "verified": dc.verify, "kept": int(len(near))},
            "verify_threshold": round(threshold, 3) if dc.verify else None,
            "phase_seconds": seconds,
            "units_resumed": resumed,
            "seen_before": {
                "parts": len(dc.against),
                "docs": seen_docs,
                "removed": int(((removed_survivor >> np.uint64(32)) < n_seen).sum()),  # as copies of those
            },
        }
        return StageResult([f for r in results for f in r["files"]], counts, stats)

    stats = run_stage(out, ident, build, log, force)
    storage.remove(out.path(WORK), cfg.storage)  # scratch: the manifest is written, nothing reads it again
    return stats
