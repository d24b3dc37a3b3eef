"""Dedup: exact and MinHash near-duplicates, transitive clusters, exact-Jaccard verification, on-disk buckets
split by key range, a Redis index shared by workers; output independent of how the work was split."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.core.config import load_config
from stages.core.storage import MANIFEST
from stages.dedup import minhash
from stages.dedup import stage as dedup
from stages.dedup.units import REMOVED
from stages.pipeline import PIPELINE
from tests.conftest import SAMPLE, docs_in, free_port, ingest_without_filtering, out_dir, wait_for_port


def corpus(tmp_path, rows, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
    settings = {"storage.root": str(tmp_path / "out"), "ingest.inputs": [str(src)], **overrides}
    cfg = load_config("tiny", settings)
    ingest_without_filtering(cfg)
    return cfg


def with_root(cfg, root, **dedup_fields):
    changed = cfg.model_copy(deep=True)
    changed.storage.root = str(root)
    for key, value in dedup_fields.items():
        setattr(changed.dedup, key, value)
    return changed


def test_exact_and_near_copies_removed_keeping_the_first(tmp_path):
    base = (
        "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence "
        "and thinks about the harvest that will come when the summer rains finally arrive in the valley."
    )
    near = base.replace("valley.", "valley today.")
    unrelated = " ".join(f"word{i} other{i * 7}" for i in range(40))
    rows = [("a", base), ("b", unrelated), ("c", near), ("d", base.upper()), ("e", near)]
    cfg = corpus(tmp_path, rows)
    s = PIPELINE.run("dedup", cfg, log=lambda _: None)
    kept = [d.id for d in docs_in(out_dir("dedup", cfg))]
    assert kept == ["a", "b"]
    assert s["removed"] == {"exact": 2, "near": 1}  # d (case-folded copy of a) and e exact; c near
    assert s["cluster_size_histogram"] == {"4": 1}  # a, c, d, e: one cluster, a the earliest survives
    assert s["lsh"]["bands"] == 14 and s["lsh"]["rows"] == 8 and s["lsh"]["implied_threshold"] == 0.719
    assert s["docs_in"] == 5 and s["docs_out"] == 2 and s["bytes_out"] < s["bytes_in"]
    assert not (out_dir("dedup", cfg) / dedup.WORK).exists()  # scratch removed after the commit
    listed = pq.read_table(next((out_dir("dedup", cfg) / REMOVED).glob("*.parquet"))).to_pylist()
    assert {(r["id"], r["kind"], r["survivor_row"]) for r in listed} == {("c", "near", 0), ("d", "exact", 0),
                                                                       ("e", "exact", 0)}  # fmt: skip


def test_cluster_browser_shows_survivors_members_and_their_similarity(planted):
    """stages/dedup/browse.py on the planted corpus: the largest clusters, each with the survivor (a base text) and
    its removed members (variants), each member's Jaccard the one the variant was planted with; bounded."""
    from stages.dedup import browse

    cfg, similarity = planted
    stats = PIPELINE.run("dedup", cfg, log=lambda _: None)
    (artifact,) = dedup.STAGE.artifacts(cfg, stats)
    assert artifact.key == "dedup-clusters" and artifact.kind == "markdown"
    clusters = browse.largest_clusters(stats["output"], cfg)
    assert 0 < len(clusters) <= browse.CLUSTERS and all(len(rows) <= browse.MEMBERS for _, rows in clusters)
    rows = re.findall(r"^\| `var-(\d+)` \| (near|exact) \| ([0-9.]+) \|", artifact.content, re.M)
    assert rows and all(float(j) == pytest.approx(similarity[int(i)], abs=5e-4) for i, _, j in rows)
    survivors = re.findall(r"^## Cluster \d+: survivor `(base-\d+)`", artifact.content, re.M)
    assert len(survivors) == len(clusters)
    assert len(artifact.content) < browse.CLUSTERS * (browse.MEMBERS + 1) * (browse.OPENING + 120) + 1000


def sample_texts(min_words: int = 200) -> list[str]:
    rows = [json.loads(line) for line in gzip.open(SAMPLE / "docs.jsonl.gz", "rt")]
    planted = {d["copy"] for d in json.loads((SAMPLE / "planted_duplicates.json").read_text())}
    texts = sorted({r["text"] for r in rows if r["id"] not in planted and len(r["text"].split()) >= min_words})
    random.Random(0).shuffle(texts)
    return texts


def variant(text: str, share: float, rng: random.Random) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), int(share * len(words))):
        words[i] = f"edit{rng.randrange(10**6)}"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real sample texts, each followed later in the corpus by a variant of known exact Jaccard (0.5 to 1)."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = random.Random(1)
    texts = sample_texts()[:80]
    variants = [variant(t, rng.uniform(0.0, 0.12), rng) for t in texts]
    n = 5
    similarity = {
        i: minhash.jaccard(minhash.shingle_hashes(t, n), minhash.shingle_hashes(v, n))
        for i, (t, v) in enumerate(zip(texts, variants))
    }
    rows = [(f"base-{i:03d}", t) for i, t in enumerate(texts)] + [(f"var-{i:03d}", v) for i, v in enumerate(variants)]
    cfg = corpus(tmp, rows, **{"ingest.docs_per_shard": 25})
    return cfg, similarity


def copy_upstream(cfg, run_cfg) -> None:
    """The ingest and filter outputs of `cfg` under `run_cfg`'s root (same identities, so the same versions)."""
    for stage in ("ingest", "filter"):
        shutil.copytree(f"{cfg.storage.root}/{stage}", f"{run_cfg.storage.root}/{stage}")


def removed_variants(cfg) -> set[int]:
    kept = {d.id for d in docs_in(out_dir("dedup", cfg))}
    assert all(d.startswith("var-") for d in {f"base-{i:03d}" for i in range(80)} - kept)  # bases always survive
    return {i for i in range(80) if f"var-{i:03d}" not in kept}


def test_verification_keeps_only_pairs_at_the_threshold(planted, tmp_path):
    cfg, similarity = planted
    assert min(similarity.values()) < 0.7 and max(similarity.values()) > 0.95
    plain_cfg = with_root(cfg, tmp_path / "plain")  # FineWeb's 14 x 8, no verification
    verified_cfg = with_root(cfg, tmp_path / "verified", threshold=0.8, verify=True)
    for run_cfg in (plain_cfg, verified_cfg):
        copy_upstream(cfg, run_cfg)
    plain = PIPELINE.run("dedup", plain_cfg, log=lambda _: None)
    verified = PIPELINE.run("dedup", verified_cfg, log=lambda _: None)
    assert any(similarity[i] < 0.8 for i in removed_variants(plain_cfg))  # the S-curve lets some in
    found = removed_variants(verified_cfg)
    # precision by construction: no pair below the threshold is joined ...
    assert all(similarity[i] >= 0.8 for i in found)
    # ... while the banding leans to recall: every pair at or above 0.85 is found
    assert {i for i, j in similarity.items() if j >= 0.85} <= found
    assert verified["pairs"]["candidates"] > verified["pairs"]["kept"] == len(found)
    assert verified["verify_threshold"] == 0.8 and plain["pairs"]["verified"] is False


def test_output_is_the_same_however_the_work_is_split(planted, tmp_path):
    cfg, _ = planted
    runs = {
        "one worker, one key range": with_root(cfg, tmp_path / "a", workers=1),
        "two workers, many key ranges": with_root(cfg, tmp_path / "b", workers=2, bucket_records=8),
    }
    manifests = {}
    for name, run_cfg in runs.items():
        copy_upstream(cfg, run_cfg)
        stats = PIPELINE.run("dedup", run_cfg, log=lambda _: None)
        manifests[name] = json.loads((out_dir("dedup", run_cfg) / MANIFEST).read_text())
        manifests[name]["key_ranges"] = stats["lsh"]["key_ranges"]
    one, many = manifests.values()
    assert one["key_ranges"] == 1 and many["key_ranges"] > 8
    assert one["files"] == many["files"] and one["counts"] == many["counts"]
    assert one["identity"] == many["identity"]  # workers and key ranges change the speed, not the output


def test_against_earlier_parts_removes_what_they_kept_and_never_their_documents(tmp_path):
    """dedup.against (what a data refresh sets): a new part loses its copies of documents earlier parts kept,
    found through their stored signature index; the earlier parts are read, never changed."""
    texts, rng = sample_texts()[:9], random.Random(3)
    first = corpus(tmp_path / "a", [(f"a{i}", t) for i, t in enumerate(texts[:6])])
    PIPELINE.run("dedup", first, log=lambda _: None)
    first_out = out_dir("dedup", first)
    manifest = json.loads((first_out / MANIFEST).read_text())
    assert [n for n in manifest["files"] if n.startswith(f"{dedup.SIGNATURES}/")] == [
        "signatures/part-0000-0000-00000-00000.bin",
        "signatures/part-0000-0000-00000-00000.bin.json",
    ]
    rows = [
        ("b0", texts[0]),  # an earlier part's document, again
        ("b1", variant(texts[1], 0.01, rng)),  # nearly one
        ("b2", texts[6]),
        ("b3", texts[7]),
        ("b4", texts[6]),  # a copy within the new part
        ("b5", variant(texts[7], 0.01, rng)),
    ]
    second = corpus(tmp_path / "b", rows, **{"dedup.against": [str(first_out)]})
    s = PIPELINE.run("dedup", second, log=lambda _: None)
    second_out = out_dir("dedup", second)
    assert [d.id for d in docs_in(second_out)] == ["b2", "b3"]
    assert s["removed"] == {"exact": 2, "near": 2} and s["docs_in"] == 6
    assert s["seen_before"] == {"parts": 1, "docs": 6, "removed": 2}
    listed = {r["id"]: r for r in pq.read_table(next((second_out / REMOVED).glob("*.parquet"))).to_pylist()}
    assert listed["b0"]["kind"] == "exact" and listed["b0"]["survivor_shard"].startswith(str(first_out))
    assert (listed["b1"]["kind"], listed["b1"]["survivor_row"]) == ("near", 1)
    assert [d.id for d in docs_in(first_out)] == [f"a{i}" for i in range(6)]  # untouched
    assert json.loads((first_out / MANIFEST).read_text()) == manifest

    # A third part against both: whatever either kept is removed, the rest kept.
    rows = [("c0", texts[7]), ("c1", texts[2]), ("c2", texts[8])]
    third = corpus(tmp_path / "c", rows, **{"dedup.against": [str(first_out), str(second_out)]})
    s = PIPELINE.run("dedup", third, log=lambda _: None)
    assert [d.id for d in docs_in(out_dir("dedup", third))] == ["c2"]
    assert s["seen_before"] == {"parts": 2, "docs": 8, "removed": 2}

    # An earlier output that is not a finished dedup output is named.
    missing = corpus(tmp_path / "d", rows, **{"dedup.against": [str(tmp_path / "nothing")]})
    with pytest.raises(ValueError, match=r"dedup.against: .*nothing is not a finished dedup output"):
        PIPELINE.run("dedup", missing, log=lambda _: None)


def test_bucket_pairs_folds_exact_copies_and_gives_all_pairs_for_verification():
    r = np.zeros(5, dtype=minhash.RECORD)
    r["key"] = [7, 7, 7, 7, 9]
    r["doc"] = [4, 1, 3, 2, 5]
    r["exact"] = [100, 100, 101, 102, 103]  # docs 1 and 4 are exact copies: 4 folds into 1
    star = minhash.bucket_pairs(r, exact_table=False, all_pairs=False)
    assert star.tolist() == [[1, 2], [1, 3]]
    every = minhash.bucket_pairs(r, exact_table=False, all_pairs=True)
    assert every.tolist() == [[1, 2], [1, 3], [2, 3]]
    r["key"] = r["exact"]
    assert minhash.bucket_pairs(r, exact_table=True, all_pairs=False).tolist() == [[1, 4]]


def test_clusters_are_transitive_with_the_smallest_document_surviving():
    pairs = np.array([[5, 9], [2, 9], [11, 12]], dtype=np.uint64)
    members, survivors = minhash.clusters(pairs)
    assert dict(zip(members.tolist(), survivors.tolist())) == {2: 2, 5: 2, 9: 2, 11: 11, 12: 11}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path_factory.mktemp("redis"),
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, 20)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_index_shared_by_workers_finds_the_same_duplicates(planted, redis_server, tmp_path):
    import redis

    cfg, _ = planted
    tables = with_root(cfg, tmp_path / "tables", workers=1)
    shared = with_root(cfg, tmp_path / "redis", workers=2, index="redis", redis_url=redis_server)
    for run_cfg in (tables, shared):
        copy_upstream(cfg, run_cfg)
    on_tables = PIPELINE.run("dedup", tables, log=lambda _: None)
    on_redis = PIPELINE.run("dedup", shared, log=lambda _: None)
    assert on_redis["lsh"]["index"] == "redis" and on_redis["phase_seconds"]["redis_query"] >= 0
    assert on_redis["removed"] == on_tables["removed"] and on_redis["removed"]["near"] > 0
    assert [d.id for d in docs_in(out_dir("dedup", shared))] == [d.id for d in docs_in(out_dir("dedup", tables))]
    client = redis.Redis.from_url(redis_server)
    assert not list(client.scan_iter(match="dedup-*"))  # the run's keys are removed once its pairs are read
