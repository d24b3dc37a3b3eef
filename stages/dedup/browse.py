"""What dedup removed, to read: a few clusters of duplicates, each with the document that survived and its
removed members, the Jaccard similarity of each member's word shingles to the survivor's and the opening of each.
It reads what the stage wrote (`removed/`: each removed document with its survivor's position in the input) and
the input shards those documents are in, never the whole corpus, and it never changes the stage's output (its code
version leaves this file out). Bounded: `CLUSTERS` clusters (the largest among the first `SCANNED` removals) of
at most `MEMBERS` members, `OPENING` characters of each document.
"""

from __future__ import annotations

from collections import defaultdict

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.documents import read_docs
from stages.dedup import minhash

CLUSTERS = 3
MEMBERS = 5
OPENING = 200
SCANNED = 5000


def largest_clusters(out_uri: str, cfg: PipelineConfig) -> list[tuple[tuple[str, int], list[dict]]]:
    """(survivor's (shard, row), its removed members) of the CLUSTERS largest clusters among the first removals."""
    import pyarrow.parquet as pq

    members: dict[tuple[str, int], list[dict]] = defaultdict(list)
    seen = 0
    for path in sorted(storage.expand(storage.join(out_uri, "removed", "*.parquet"), cfg.storage)):
        with storage.open_uri(path, "rb", cfg.storage) as f:
            rows = pq.read_table(f).to_pylist()
        for row in rows[: SCANNED - seen]:
            members[(row["survivor_shard"], row["survivor_row"])].append(row)
        seen += min(len(rows), SCANNED - seen)
        if seen >= SCANNED:
            break
    ranked = sorted(members.items(), key=lambda item: (-len(item[1]), item[0]))
    return [(survivor, rows[:MEMBERS]) for survivor, rows in ranked[:CLUSTERS]]


def documents(in_uri: str, wanted: set[tuple[str, int]], cfg: PipelineConfig) -> dict[tuple[str, int], object]:
    """The documents at those positions of the input, reading only the shards they are in."""
    found = {}
    for shard in sorted({shard for shard, _ in wanted}):
        uri = storage.join(in_uri, shard)
        if not storage.exists(uri, cfg.storage):
            continue  # (a survivor from an earlier part of the dataset: dedup.against)
        for row, doc in enumerate(read_docs(uri, cfg.storage)):
            if (shard, row) in wanted:
                found[(shard, row)] = doc
    return found


def _shown(text: str) -> str:
    opening = " ".join(text.split())[:OPENING]
    return opening.replace("|", "\\|") + ("…" if len(text) > OPENING else "")


def markdown(stats: dict, cfg: PipelineConfig) -> str:
    clusters = largest_clusters(stats["output"], cfg)
    wanted = {s for s, _ in clusters} | {(m["shard"], m["row"]) for _, rows in clusters for m in rows}
    docs = documents(stats["input"], wanted, cfg)
    removed = stats.get("removed", {})
    lines = ["# Dedup: clusters of duplicates", "",
             f"{removed.get('exact', 0):,} exact and {removed.get('near', 0):,} near duplicates removed in "
             f"{stats.get('clusters', 0):,} clusters; the largest {len(clusters)} of the first {SCANNED:,} removals, "
             f"each member's Jaccard similarity of word {cfg.dedup.ngram}-grams to the survivor's:"]  # fmt: skip
    for n, (survivor, rows) in enumerate(clusters, 1):
        kept = docs.get(survivor)
        if kept is None:
            continue
        kept_shingles = minhash.shingle_hashes(kept.text, cfg.dedup.ngram)
        lines += ["", f"## Cluster {n}: survivor `{kept.id}`", "", _shown(kept.text), "",
                  "| member | kind | Jaccard | opening |", "|---|---|---:|---|"]  # fmt: skip
        for row in rows:
            doc = docs.get((row["shard"], row["row"]))
            if doc is None:
                continue
            similarity = minhash.jaccard(kept_shingles, minhash.shingle_hashes(doc.text, cfg.dedup.ngram))
            lines.append(f"| `{doc.id}` | {row['kind']} | {similarity:.3f} | {_shown(doc.text)} |")
    return "\n".join(lines) + "\n"


def artifacts(cfg: PipelineConfig, stats: dict) -> list:
    from stages.core.stage import Artifact

    if not sum(stats.get("removed", {}).values()) or "input" not in stats:
        return []
    return [Artifact("markdown", "dedup-clusters", markdown(stats, cfg), "clusters of duplicates, with survivors")]
