"""Near-dedup quality against exact Jaccard ground truth, on sample documents with planted near-duplicates.

    .venv/bin/python bench/dedup_quality.py [--pairs 400] [--write]

Base documents are real texts from the bundled sample (at least 150 words; no planted copy and no member of a
known natural near-duplicate pair). Each of `--pairs` of them gets a variant with a random share of its words
replaced by words of another base document, which spreads the exact word 5-gram Jaccard of the pairs over about
0.5 to 1.0; the Jaccard is measured on the final texts, never assumed. The dedup stage's `find_duplicates` then
runs on bases and variants shuffled together, once per banding configuration.

- recall: the share of planted pairs put in one cluster, per bucket of exact Jaccard;
- precision: of every pair of documents the stage put in one cluster, the share whose exact Jaccard is at
  least the configuration's nominal threshold.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import write_section  # noqa: E402
from stages.config import DedupConfig  # noqa: E402
from stages.dedup import find_duplicates, shingles  # noqa: E402

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


def same(found, a: int, b: int) -> bool:
    """Removed together: one cluster, or the later one dropped as an exact repeat (identical normalized text)."""
    return found.clusters.find(a) == found.clusters.find(b) or max(a, b) in found.exact


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
        ("FineWeb 14x8", DedupConfig()),
        ("threshold 0.8", DedupConfig(threshold=0.8)),
        ("threshold 0.8, verified", DedupConfig(threshold=0.8, verify=True)),
    ]
    for name, dc in configs:
        started = time.perf_counter()
        found = find_duplicates(shuffled, dc)
        seconds = time.perf_counter() - started
        nominal = dc.nominal_threshold
        members: dict[int, list[int]] = {}
        for pos in found.clustered:
            members.setdefault(found.clusters.find(pos), []).append(pos)
        predicted = [(a, b) for group in members.values() for i, a in enumerate(group) for b in group[i + 1 :]]
        correct = sum(jaccard(shuffled[a], shuffled[b]) >= nominal for a, b in predicted)
        recall = {}
        for lo, hi in BUCKETS:
            inside = [(a, b) for a, b, j in planted if lo <= j < hi]
            hits = sum(same(found, position[a], position[b]) for a, b in inside)
            recall[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = (hits, len(inside))
        hi_pairs = [(a, b) for a, b, j in planted if j >= 0.85]
        hi_hits = sum(same(found, position[a], position[b]) for a, b in hi_pairs)
        results["configs"].append(
            {
                "name": name,
                "bands": found.bands,
                "rows": found.rows,
                "nominal_threshold": round(nominal, 3),
                "predicted_pairs": len(predicted),
                "precision": correct / len(predicted) if predicted else 1.0,
                "recall_at_0.85": hi_hits / len(hi_pairs) if hi_pairs else 1.0,
                "recall_by_bucket": recall,
                "docs_per_s": len(docs) / seconds,
            }
        )
    return results


def table(results: dict, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{results['documents']} documents: real sample texts plus {results['planted_pairs']} planted variants "
        "(exact word 5-gram Jaccard measured on the final texts).",
        "",
        "| config | bands x rows | nominal threshold | predicted pairs | precision (exact J >= nominal) "
        "| recall, pairs J >= 0.85 | docs/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in results["configs"]:
        lines.append(
            f"| {c['name']} | {c['bands']} x {c['rows']} | {c['nominal_threshold']} | {c['predicted_pairs']} "
            f"| {c['precision']:.3f} | {c['recall_at_0.85']:.3f} | {c['docs_per_s']:,.0f} |"
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
