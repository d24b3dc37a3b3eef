"""Document ids that repeat across the inputs of an ingest run, found in memory bounded whatever the corpus.

Ids are not keys downstream: dedup works by shard and row, and the tokenize split and the evaluation labels hash
the id, so the repeats of one id land together. But a user who gave ids expects them unique, and repeats usually
mean one dump ingested twice, so they are counted and named.

Each ingest unit writes its documents' 64-bit id hashes (xxh64), sorted, each with the document's number in the
unit, to `_ids/<unit>.bin`, behind a header holding where each of BUCKETS hash ranges starts. The check takes the
ranges a group at a time (a group: at most `max_in_memory` entries over all units), reads each unit's slice of
them with one ranged read, and counts the entries equal to the one before: documents whose id came earlier. The
first few are named by reading their ids back from the shards, which also tells a (2^-64) hash collision apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

from stages.core import storage
from stages.core.config import StorageConfig

BUCKETS = 4096  # hash ranges, by the top 12 bits
TOP_SHIFT = np.uint64(64 - 12)
ENTRY = np.dtype([("hash", "<u8"), ("doc", "<u8")])
HEADER_BYTES = (BUCKETS + 1) * 8
MAX_IN_MEMORY = 1 << 24  # entries in one group (16 bytes each: 256 MB)


def id_hash(doc_id: str) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"))


def write(uri: str, hashes: np.ndarray, cfg: StorageConfig | None) -> None:
    """One unit's id hashes (in document order) as a sorted, bucketed file."""
    entries = np.empty(len(hashes), ENTRY)
    entries["hash"], entries["doc"] = hashes, np.arange(len(hashes), dtype=np.uint64)
    entries = entries[np.argsort(entries["hash"], kind="stable")]
    starts = np.searchsorted(entries["hash"] >> TOP_SHIFT, np.arange(BUCKETS + 1, dtype=np.uint64)).astype("<u8")
    with storage.atomic_write(uri, cfg) as f:
        f.write(starts.tobytes())
        f.write(entries.tobytes())


def _header(uri: str, cfg: StorageConfig | None) -> np.ndarray:
    with storage.open_uri(uri, "rb", cfg) as f:
        return np.frombuffer(f.read(HEADER_BYTES), dtype="<u8")


def _slice(uri: str, start: int, end: int, cfg: StorageConfig | None) -> np.ndarray:
    with storage.open_uri(uri, "rb", cfg) as f:
        f.seek(HEADER_BYTES + start * ENTRY.itemsize)
        return np.frombuffer(f.read((end - start) * ENTRY.itemsize), dtype=ENTRY)


def _groups(per_bucket: np.ndarray, max_in_memory: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [lo, hi) of at most max_in_memory entries each (a bigger bucket alone)."""
    groups, lo, held = [], 0, 0
    for bucket, count in enumerate(per_bucket.tolist()):
        if held and held + count > max_in_memory:
            groups.append((lo, bucket))
            lo, held = bucket, 0
        held += count
    return groups + [(lo, BUCKETS)]


def find_repeats(
    uris: Sequence[str], cfg: StorageConfig | None, examples: int = 5, max_in_memory: int = MAX_IN_MEMORY
) -> tuple[int, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """How many documents repeat an id that came earlier in these units, and up to `examples` pairs of
    ((unit, document), (unit, document)) positions sharing one."""
    headers = [_header(uri, cfg) for uri in uris]
    if not headers:
        return 0, []
    per_bucket = np.sum([np.diff(h) for h in headers], axis=0)
    repeats, pairs = 0, []
    for lo, hi in _groups(per_bucket, max_in_memory):
        parts = [(u, _slice(uri, int(h[lo]), int(h[hi]), cfg)) for u, (uri, h) in enumerate(zip(uris, headers))]
        parts = [(u, p) for u, p in parts if len(p)]
        if not parts:
            continue
        entries = np.concatenate([p for _, p in parts])
        units = np.concatenate([np.full(len(p), u) for u, p in parts])
        order = np.argsort(entries["hash"], kind="stable")
        hashes = entries["hash"][order]
        same = np.flatnonzero(hashes[1:] == hashes[:-1])
        repeats += len(same)
        for i in same[: max(0, examples - len(pairs))]:
            a, b = order[i], order[i + 1]
            pairs.append(((int(units[a]), int(entries["doc"][a])), (int(units[b]), int(entries["doc"][b]))))
    return repeats, pairs
