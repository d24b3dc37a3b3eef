"""The dedup stage's work units (stages/dedup/stage.py runs them, phase by phase): each reads and writes only
through the storage layer, then marks its completion, so any process or Dask worker can run any unit.
"""

from __future__ import annotations

import numpy as np

from stages.core import storage
from stages.core.banding import Banding
from stages.core.config import StorageConfig
from stages.core.documents import ShardWriter, read_docs
from stages.core.stage import Progress
from stages.dedup import minhash
from stages.dedup.minhash import EXACT_TABLE

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
