"""MinHash near-duplicate detection with bounded memory: signatures, band tables on disk, pairs, exact Jaccard.

The pieces the dedup stage (stages/dedup/stage.py) runs as parallel, resumable units:

1. Signatures, per shard. Each document's word n-gram shingles get a MinHash from datasketch (`MinHash.bulk`
   with 32-bit xxhash, the fastest of its hash choices); each band of `rows` hash values becomes one 64-bit key.
   A shard's keys are written as one *table file*: for table 0 (the exact key: a hash of the normalized text)
   and each band, (key, document, exact key) records sorted by key, plus `FENCES` offsets per table that cut
   the key space into equal ranges. Nothing of a signature stays in memory after its shard is done: 24 bytes
   per document and table go to disk, none as Python objects.
2. Buckets, per (table, key range). One unit reads the same key range of every shard's table file (one byte
   range per shard), sorts it and turns each run of equal keys into candidate pairs: exact copies fold into
   their earliest one, then the first document of the run pairs with each other one (datatrove's star, which
   is all clustering needs), or with verification every pair of a small run. The number of key ranges grows
   with the corpus so that a unit holds at most `bucket_records` records: memory per unit is fixed, whatever
   the corpus size.
3. Verification (optional), per shard: NeMo Curator's false-positive check. The exact Jaccard similarity of
   each candidate pair's shingle sets decides, instead of the banding's S-curve alone. Only documents in some
   candidate pair have their shingle hashes written (sorted uint64 arrays), and each unit loads the arrays of
   one shard plus those of the shards its pairs point into.

Why by hand and not datasketch's `MinHashLSH`: its index keeps every key as a Python object in one process's
memory (or in Redis, see stages/dedup/stage.py), so its memory grows with the corpus and workers cannot build it in
parallel; sorted tables split by key range do both, and a sort is all a bucket needs. datatrove's MinHash
blocks work the same way but merge sorted files one record at a time in Python; here a key range is sorted
with numpy in one call.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import numpy as np
import xxhash

from stages.core import storage
from stages.core.banding import Banding
from stages.core.config import StorageConfig

WORD = re.compile(r"\w+", re.UNICODE)
FENCES = 1024  # key ranges recorded per table; a bucket unit covers a power-of-two number of them
RECORD = np.dtype([("key", "<u8"), ("doc", "<u8"), ("exact", "<u8")])
ALL_PAIRS_UP_TO = 64  # with verification, a bucket of at most this many distinct texts gives all its pairs
EXACT_TABLE = 0


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_key(text: str) -> int:
    return xxhash.xxh3_64_intdigest(normalize(text).encode())


def shingles(text: str, n: int) -> set[bytes]:
    """Lower-cased word n-grams; a document shorter than n words is one shingle."""
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the shingles: exact Jaccard up to a 2^-64 collision."""
    return np.unique(np.fromiter((xxhash.xxh3_64_intdigest(s) for s in shingles(text, n)), dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (a.size + b.size - common)


ROW_MASK = 0xFFFFFFFF


def doc_number(shard: int, row: int) -> int:
    """A document's global number: corpus order, so the smallest number in a cluster is its earliest document."""
    return (shard << 32) | row


def split_doc_numbers(docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (docs >> np.uint64(32)).astype(np.int64), (docs & np.uint64(ROW_MASK)).astype(np.int64)


def band_keys(texts: list[str], banding: Banding) -> tuple[np.ndarray, np.ndarray]:
    """(1 + bands, len(texts)) uint64 keys: row 0 the exact key, then one per band of the MinHash signature;
    and the signatures, (len(texts), num_perm) uint32."""
    from datasketch import MinHash

    keys = np.empty((1 + banding.bands, len(texts)), dtype=np.uint64)
    keys[EXACT_TABLE] = [exact_key(t) for t in texts]
    signatures = MinHash.bulk(
        [shingles(t, banding.ngram) for t in texts],
        num_perm=banding.num_perm,
        seed=banding.seed,
        hashfunc=xxhash.xxh32_intdigest,
    )
    matrix = np.stack([m.hashvalues for m in signatures])
    bands = matrix.reshape(len(texts), banding.bands, banding.rows)
    for band in range(banding.bands):
        rows = np.ascontiguousarray(bands[:, band, :])
        keys[1 + band] = [xxhash.xxh3_64_intdigest(r.tobytes()) for r in rows]
    return keys, matrix


def write_tables(uri: str, keys: np.ndarray, docs: np.ndarray, cfg: StorageConfig | None) -> None:
    """One shard's table file (records sorted by key, then document, per table) and its fence sidecar.

    Every record carries the document's exact key too, so a bucket can fold exact copies into one document
    without a global list of exact repeats."""
    tables, n = keys.shape
    records = np.empty((tables, n), dtype=RECORD)
    fences = []
    bounds = np.arange(FENCES, dtype=np.uint64) << np.uint64(64 - FENCES.bit_length() + 1)
    for t in range(tables):
        order = np.lexsort((docs, keys[t]))
        records[t]["key"], records[t]["doc"], records[t]["exact"] = keys[t][order], docs[order], keys[0][order]
        # fence f: the first record whose key is at least f * 2^64 / FENCES; the last one: the table's end
        fences.append([*np.searchsorted(records[t]["key"], bounds).tolist(), n])
    with storage.atomic_write(uri, cfg) as f:
        f.write(records.tobytes())
    storage.write_json(uri + ".json", {"docs": n, "tables": tables, "fences": fences}, cfg)


def read_range(uri: str, table: int, part: int, parts: int, cfg: StorageConfig | None) -> np.ndarray:
    """The records of one table in key range `part` of `parts` (a power of two up to FENCES)."""
    meta = storage.read_json(uri + ".json", cfg)
    step = FENCES // parts
    lo, hi = meta["fences"][table][part * step], meta["fences"][table][(part + 1) * step]
    if hi == lo:
        return np.empty(0, dtype=RECORD)
    start = (table * meta["docs"] + lo) * RECORD.itemsize
    fs, path = storage.filesystem(uri, cfg)
    data = fs.cat_file(path, start=start, end=start + (hi - lo) * RECORD.itemsize)
    return np.frombuffer(data, dtype=RECORD)


def read_range_as(uri: str, shard: int, table: int, part: int, parts: int, cfg: StorageConfig | None) -> np.ndarray:
    """`read_range`, the documents numbered as rows of `shard`: a kept index (numbered by its own rows) joins a
    run whose shards are numbered differently."""
    records = read_range(uri, table, part, parts, cfg).copy()
    records["doc"] = (records["doc"] & np.uint64(ROW_MASK)) | (np.uint64(shard) << np.uint64(32))
    return records


def keys_by_row(uri: str, cfg: StorageConfig | None) -> np.ndarray:
    """A table file's keys back in document order: (tables, docs) uint64, as `band_keys` gave them."""
    meta = storage.read_json(uri + ".json", cfg)
    with storage.open_uri(uri, "rb", cfg) as f:
        records = np.frombuffer(f.read(), dtype=RECORD).reshape(meta["tables"], meta["docs"])
    keys = np.empty(records.shape, dtype=np.uint64)
    for t in range(meta["tables"]):
        keys[t, records[t]["doc"] & np.uint64(ROW_MASK)] = records[t]["key"]
    return keys


def bucket_pairs(records: np.ndarray, exact_table: bool, all_pairs: bool) -> np.ndarray:
    """(m, 2) uint64 pairs of documents sharing a key, (smaller, larger), unique and sorted.

    The exact table gives each repeat against its earliest copy. A band table first folds exact copies into
    their earliest one (their pairs would be the same), then gives the star of each bucket (its first document
    against each other one: all the clustering needs), or with `all_pairs` every pair of a bucket of up to
    ALL_PAIRS_UP_TO documents. Verification needs the latter: in a bucket {A, B, C} where A resembles neither B
    nor C, the star would test only A-B and A-C and lose a true B-C pair.
    """
    if records.size < 2:
        return np.empty((0, 2), dtype=np.uint64)
    if not exact_table:
        records = np.sort(records, order=("key", "exact", "doc"))
        first_copy = np.ones(records.size, dtype=bool)
        first_copy[1:] = (records["key"][1:] != records["key"][:-1]) | (records["exact"][1:] != records["exact"][:-1])
        records = records[first_copy]
    records = np.sort(records, order=("key", "doc"))
    keys, docs = records["key"], records["doc"]
    starts_run = np.ones(keys.size, dtype=bool)
    starts_run[1:] = keys[1:] != keys[:-1]
    first = np.maximum.accumulate(np.where(starts_run, np.arange(keys.size), 0))
    member = ~starts_run
    pairs = [np.stack([docs[first[member]], docs[member]], axis=1)]
    if all_pairs and not exact_table:
        starts = np.flatnonzero(starts_run)
        lengths = np.diff(np.append(starts, keys.size))
        small = (lengths > 2) & (lengths <= ALL_PAIRS_UP_TO)
        for start, length in zip(starts[small], lengths[small]):
            i, j = np.triu_indices(length - 1, k=1)  # pairs among the non-first members; the star has the rest
            run = docs[start + 1 : start + length]
            pairs.append(np.stack([run[i], run[j]], axis=1))
    pairs = np.concatenate(pairs)
    return np.unique(pairs, axis=0) if pairs.size else pairs.reshape(0, 2)


def partitions_for(total_records: int, bucket_records: int) -> int:
    """The smallest power of two of key ranges that keeps a bucket unit within `bucket_records` on average."""
    parts = 1
    while parts < FENCES and total_records / parts > bucket_records:
        parts *= 2
    return parts


def save_array(uri: str, array: np.ndarray, cfg: StorageConfig | None) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with storage.atomic_write(uri, cfg) as f:
        f.write(buffer.getvalue())


def write_parquet(uri: str, table, cfg: StorageConfig | None) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    with storage.atomic_write(uri, cfg) as f:
        f.write(buffer.getvalue())


def load_array(uri: str, cfg: StorageConfig | None) -> np.ndarray:
    with storage.open_uri(uri, "rb", cfg) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def write_shingles(uri: str, rows: Iterable[int], hashes: list[np.ndarray], cfg: StorageConfig | None) -> None:
    """The shingle hashes of some documents of one shard: one flat array plus (row, offset) pairs."""
    rows = list(rows)
    offsets = np.cumsum([0] + [h.size for h in hashes])
    flat = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    buffer = io.BytesIO()
    np.savez(buffer, rows=np.asarray(rows, dtype=np.int64), offsets=offsets, hashes=flat)
    with storage.atomic_write(uri, cfg) as f:
        f.write(buffer.getvalue())


class ShingleSets:
    """Shingle hashes by document number, read one shard's file at a time (at most `cache` files held)."""

    def __init__(self, uri_of_shard, cfg: StorageConfig | None, cache: int = 4):
        self.uri_of_shard, self.cfg, self.cache = uri_of_shard, cfg, cache
        self._files: dict[int, tuple[dict[int, int], np.ndarray, np.ndarray]] = {}

    def get(self, doc: int) -> np.ndarray:
        shard, row = doc >> 32, doc & 0xFFFFFFFF
        if shard not in self._files:
            if len(self._files) >= self.cache:
                self._files.pop(next(iter(self._files)))
            with storage.open_uri(self.uri_of_shard(shard), "rb", self.cfg) as f:
                data = np.load(io.BytesIO(f.read()), allow_pickle=False)
                rows, offsets, hashes = data["rows"], data["offsets"], data["hashes"]
            self._files[shard] = ({int(r): i for i, r in enumerate(rows)}, offsets, hashes)
        position, offsets, hashes = self._files[shard]
        i = position[row]
        return hashes[offsets[i] : offsets[i + 1]]


def histogram(sizes: Iterable[int]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def clusters(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the pair graph (transitive: A~B and B~C join A, B and C).

    Returns every document in some pair, sorted, and its component's smallest document: the survivor.
    scipy's connected_components is a union-find in C over a sparse graph, so this is linear in the pairs.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if pairs.size == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    members = np.unique(pairs)
    index = np.searchsorted(members, pairs)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (index[:, 0], index[:, 1])), shape=(members.size,) * 2)
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)  # members are sorted: a label's first member is its smallest
    smallest = np.empty(first.size, dtype=np.uint64)
    smallest[labels[first]] = members[first]
    return members, smallest[labels]
