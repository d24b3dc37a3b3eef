"""The tokenize stage (stages/tokenize/): a disjoint, deterministic train/val split, counted, and training
documents sharing a 13-gram with evaluation texts dropped."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq

from stages.core.config import REPO_ROOT as REPO
from stages.core.config import load_config
from stages.pipeline import PIPELINE
from stages.tokenize import stage as tokenize
from stages.tokenizer import bpe
from tests.conftest import ingest_without_filtering, out_dir


def test_tokenize_split_is_disjoint_deterministic_and_counted(data_pipeline):
    from litdata import StreamingDataset, TokensLoader

    cfg, root, stats = data_pipeline
    s = stats["tokenize"]
    assert s["docs"]["train"] + s["docs"].get("val", 0) == stats["dedup"]["docs_out"]
    val_docs = (out_dir("tokenize", cfg) / "val_docs.jsonl").read_text().splitlines()
    val_ids = [json.loads(line)["id"] for line in val_docs]
    assert len(val_ids) == s["docs"].get("val", 0)
    assert all(tokenize.split_of(i, cfg.tokenize.val_fraction) == "val" for i in val_ids)
    eos = stats["tokenizer"]["eos_id"]
    train = StreamingDataset(str(out_dir("tokenize", cfg) / "train"), item_loader=TokensLoader(block_size=64))
    tokens = [t for block in train for t in block.tolist()]
    assert len(tokens) == (s["tokens"]["train"] // 64) * 64
    assert tokens.count(eos) >= len(tokens) // 64 // 20  # documents are separated by EOS


def test_tokenize_drops_training_docs_sharing_13_grams_with_evaluation_texts(small_corpus, tmp_path, monkeypatch):
    copies = {d["copy"] for d in json.loads((REPO / "data" / "sample" / "planted_duplicates.json").read_text())}
    rows = pq.read_table(small_corpus["parquet"]).to_pylist()
    texts, seen = [], set()
    for row in rows:  # base documents that share no 13-gram with each other (word tuples: an independent oracle)
        words = re.findall(r"\w+", row["text"].lower())
        grams = {tuple(words[i : i + 13]) for i in range(len(words) - 12)}
        if row["id"] not in copies and len(words) > 200 and not grams & seen and len(texts) < 40:
            texts.append(row["text"])
            seen |= grams
    ids = [f"doc-{i}" for i in range(len(texts))]
    val = [i for i, doc_id in enumerate(ids) if tokenize.split_of(doc_id, 0.2) == "val"]
    train = [i for i in range(len(texts)) if i not in val]
    assert val and len(train) > 3
    benchmark = "the quick brown fox jumps over the lazy dog near the river bank at dawn every single day"
    leaked = " ".join(texts[val[0]].split()[20:40])  # 20 words copied from a held-out document
    texts[train[0]] += " " + leaked
    texts[train[1]] += " Quoted: " + benchmark.upper()
    twelve = " ".join(benchmark.split()[:12])  # an overlap one word short of 13 is not contamination
    texts[train[2]] += " " + twelve
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    bench_file = tmp_path / "benchmark.jsonl"
    bench_file.write_text(json.dumps({"text": benchmark}) + "\n")
    cfg = load_config(
        "tiny",
        {
            "storage.root": str(tmp_path / "out"),
            "ingest.inputs": [str(src)],
            "ingest.docs_per_shard": 10,
            "tokenize.val_fraction": 0.2,
            "tokenizer.vocab_size": 500,
            "evaluate.decontaminate_with": [str(bench_file)],
        },
    )
    ingest_without_filtering(cfg)
    for stage in ("dedup", "tokenizer"):
        PIPELINE.run(stage, cfg, log=lambda _: None)
    s = PIPELINE.run("tokenize", cfg, log=lambda _: None)
    assert s["docs"] == {"train": len(train), "val": len(val)}
    assert s["removed"] == {"decontaminated": 2}
    from litdata import StreamingDataset, TokensLoader

    stream = StreamingDataset(str(out_dir("tokenize", cfg) / "train"), item_loader=TokensLoader(block_size=1))
    eos = bpe.load(PIPELINE.output("tokenizer", cfg)).token_to_id(cfg.tokenizer.eos_token)
    assert sum(int(t[0]) == eos for t in stream) == len(train) - 2  # one EOS per document kept
    # the first pass in worker processes (a corpus past SCAN_IN_PROCESSES_FROM): the same split, held-out
    # documents in the same order, the same documents removed
    monkeypatch.setattr(tokenize, "SCAN_IN_PROCESSES_FROM", 0)
    spread = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"workers": 2})})
    t = PIPELINE.run("tokenize", spread, log=lambda _: None)
    assert {k: t[k] for k in ("docs", "removed", "tokens")} == {k: s[k] for k in ("docs", "removed", "tokens")}
    same = [(out_dir("tokenize", c) / tokenize.VAL_DOCS).read_text() for c in (cfg, spread)]
    assert same[0] == same[1] and same[0].count("\n") == len(val)


def test_pass_two_deals_even_work_to_every_worker_even_from_one_shard(tmp_path):
    from stages.core.documents import Doc, ShardWriter

    sizes = [((i * 7919) % 97 + 1) * 100 for i in range(300)]  # uneven documents, some 97 times others
    with ShardWriter(str(tmp_path), "part", 1000) as writer:
        for i, size in enumerate(sizes):
            writer.write(Doc(f"doc-{i}", "x" * size, "test"))
    cfg = load_config("tiny", {"tokenize.workers": 3})
    scanned = tokenize.scan_shard((0, str(tmp_path / "part-00000.parquet")), cfg, False, str(tmp_path), cuts=24)
    pieces = scanned["pieces"]
    assert [p[0][1] for p in pieces][0] == 0 and pieces[-1][0][2] == len(sizes)
    assert all(a[0][2] == b[0][1] for a, b in zip(pieces, pieces[1:]))  # contiguous: nothing read twice or lost
    assert [size for _, size in pieces] == [sum(sizes[s:e]) for (_, s, e), _ in pieces]
    shares = tokenize.shares("train", pieces, 0, 3)
    loads = [sum(sum(sizes[s:e]) for _, s, e in share) for share in shares]
    assert len(shares) == 3 and max(loads) < 1.1 * sum(sizes) / 3  # one shard, three workers, even work
    assert sorted(p for share in shares for p in share) == [p for p, _ in pieces]
