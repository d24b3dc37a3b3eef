"""Near-dedup quality against exact Jaccard ground truth, on sample documents with planted near-duplicates.

    .venv/bin/python bench/dedup_quality.py [--pairs 400] [--write]

Base documents are real texts from the bundled sample (at least 150 words; no planted copy and no member of a
known natural near-duplicate pair). Each of `--pairs` of them gets a variant with a random share of its words
replaced by words of another base document, which spreads the exact word 5-gram Jaccard of the pairs over about
0.5 to 1.0; the Jaccard is measured on the final texts, never assumed. Bases and variants, shuffled together,
are committed as a filter output, and the dedup stage itself runs on them once per configuration; its list of
removed documents (each with the survivor it was removed for) gives the clusters.

- recall: the share of planted pairs put in one cluster, per bucket of exact Jaccard;
- precision: of every pair of documents the stage put in one cluster, the share whose exact Jaccard is at
  least the configuration's threshold (the banding's implied one without `threshold`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import write_section  # noqa: E402
from stages.core.config import load_config  # noqa: E402
from stages.core.documents import Doc, ShardWriter  # noqa: E402
from stages.dedup.minhash import shingles  # noqa: E402
from stages.dedup.units import REMOVED
from stages.pipeline import PIPELINE

SAMPLE = REPO / "data" / "sample"
SECTION = "## Near-dedup quality"
BUCKETS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.0001)]


def base_documents(min_words: int = 150) -> list[str]:
    planted = json.loads((SAMPLE / "planted_duplicates.json").read_text())
    natural = json.loads((SAMPLE / "natural_near_duplicates.json").read_text())
    exclude = {d["copy"] for d in planted}
    for pair in natural:
        exclude.update((pair["a"], pair["b"]))
    rows = [json.loads(line) for line in gzip.open(SAMPLE / "docs.jsonl.gz", "rt")]
    rows += pq.read_table(SAMPLE / "reference.parquet").to_pylist()
    texts, seen = [], set()
    for row in rows:
        text = row["text"]
        if row["id"] in exclude or len(text.split()) < min_words or text in seen:
            continue
        seen.add(text)
        texts.append(text)
    return texts


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, 5), shingles(b, 5)
    return len(sa & sb) / len(sa | sb)


def make_variant(text: str, donor: str, rng: random.Random) -> str:
    words, donor_words = text.split(), donor.split()
    share = rng.uniform(0.0, 0.13)
    for i in rng.sample(range(len(words)), int(share * len(words))):
        words[i] = rng.choice(donor_words)
    return " ".join(words)


def commit_as_filtered(texts: list[str], root: str, docs_per_shard: int = 500) -> list[str]:
    """The texts as the filter stage's committed output; returns each position's document id."""
    cfg = load_config("tiny", {"storage.root": root})
    out = PIPELINE.output("filter", cfg)
    ids = [f"doc-{i:06d}" for i in range(len(texts))]
    with ShardWriter(out.uri, "part", docs_per_shard) as writer:
        for doc_id, text in zip(ids, texts):
            writer.write(Doc(doc_id, text, "bench"))
    out.commit({"bench": len(texts)}, {}, {}, writer.files)
    return ids


def clusters_found(root: str) -> dict[str, str]:
    """Removed document id -> the id of the survivor it was removed for."""
    folder = Path(root) / "dedup"
    ids = {}
    listed = [r for f in sorted((folder / REMOVED).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    filtered = Path(root) / "filter"
    for shard in sorted(filtered.glob("part-*.parquet")):
        ids[shard.name] = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    return {r["id"]: ids[r["survivor_shard"]][r["survivor_row"]] for r in listed}


def measure(pairs: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    bases = base_documents()
    rng.shuffle(bases)
    bases = bases[: 2 * pairs]
    docs = list(bases)
    planted = []
    for i in range(pairs):
        variant = make_variant(bases[i], bases[pairs + i], rng)
        planted.append((i, len(docs), jaccard(bases[i], variant)))
        docs.append(variant)
    order = list(range(len(docs)))
    rng.shuffle(order)
    position = {doc: pos for pos, doc in enumerate(order)}
    shuffled = [docs[d] for d in order]
    results = {"documents": len(docs), "planted_pairs": pairs, "configs": []}
    configs = [
        ("FineWeb 14x8", {}),
        ("threshold 0.8", {"dedup.threshold": 0.8}),
        ("threshold 0.8, verified", {"dedup.threshold": 0.8, "dedup.verify": True}),
    ]
    for name, overrides in configs:
        with tempfile.TemporaryDirectory() as root:
            ids = commit_as_filtered(shuffled, root)
            cfg = load_config("tiny", {"storage.root": root, "dedup.workers": 2, **overrides})
            stats = PIPELINE.run("dedup", cfg, log=lambda _: None)
            survivor_of = clusters_found(root)
        nominal = cfg.dedup.threshold or stats["lsh"]["implied_threshold"]
        cluster_of = {i: survivor_of.get(doc_id, doc_id) for i, doc_id in enumerate(ids)}
        members: dict[str, list[int]] = {}
        for pos, root_id in cluster_of.items():
            members.setdefault(root_id, []).append(pos)
        predicted = [(a, b) for group in members.values() for i, a in enumerate(group) for b in group[i + 1 :]]
        correct = sum(jaccard(shuffled[a], shuffled[b]) >= nominal for a, b in predicted)

        def same(a: int, b: int) -> bool:
            return cluster_of[a] == cluster_of[b]

        recall = {}
        for lo, hi in BUCKETS:
            inside = [(a, b) for a, b, j in planted if lo <= j < hi]
            hits = sum(same(position[a], position[b]) for a, b in inside)
            recall[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = (hits, len(inside))
        hi_pairs = [(a, b) for a, b, j in planted if j >= 0.85]
        hi_hits = sum(same(position[a], position[b]) for a, b in hi_pairs)
        results["configs"].append(
            {
                "name": name,
                "bands": stats["lsh"]["bands"],
                "rows": stats["lsh"]["rows"],
                "nominal_threshold": round(nominal, 3),
                "predicted_pairs": len(predicted),
                "precision": correct / len(predicted) if predicted else 1.0,
                "recall_at_0.85": hi_hits / len(hi_pairs) if hi_pairs else 1.0,
                "recall_by_bucket": recall,
            }
        )
    return results


def table(results: dict, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{results['documents']} documents: real sample texts plus {results['planted_pairs']} planted variants "
        "(exact word 5-gram Jaccard measured on the final texts). Throughput: see the next section.",
        "",
        "| config | bands x rows | nominal threshold | predicted pairs | precision (exact J >= nominal) "
        "| recall, pairs J >= 0.85 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        lines.append(
            f"| {c['name']} | {c['bands']} x {c['rows']} | {c['nominal_threshold']} | {c['predicted_pairs']} "
            f"| {c['precision']:.3f} | {c['recall_at_0.85']:.3f} |"
        )
    lines += ["", "Recall by exact-Jaccard bucket (found / planted):", ""]
    buckets = list(results["configs"][0]["recall_by_bucket"])
    lines += ["| config | " + " | ".join(buckets) + " |", "|---|" + "---:|" * len(buckets)]
    for c in results["configs"]:
        cells = [f"{h}/{n}" for h, n in c["recall_by_bucket"].values()]
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    command = f"python bench/dedup_quality.py --pairs {args.pairs} --write"
    text = table(measure(args.pairs), command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
