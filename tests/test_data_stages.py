"""The data stages on a slice of the sample corpus: ingest, filter, dedup, tokenizer, tokenize.

The stages run in order on one output root (module-scoped), each test then checking one stage's behaviour:
what it wrote, what it counted and that a rerun skips it.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from stages import dedup, filter, ingest, quality_model, readers, storage, tokenize, tokenizer
from stages.config import REPO_ROOT as REPO
from stages.config import load_config
from stages.documents import read_docs
from stages.parallel import map_in_processes
from stages.storage import MANIFEST, STATS
from tests.conftest import docs_in, ingest_without_filtering, out_dir


@pytest.fixture(scope="module")
def pipeline(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("data_stages")
    cfg = load_config(
        "tiny",
        {
            "storage.root": str(root),
            "ingest.inputs": [str(p) for p in small_corpus.values()],
            "ingest.docs_per_shard": 100,
            "tokenizer.vocab_size": 1000,
        },
    )
    stats = {}
    for stage in (ingest, filter, dedup, tokenizer, tokenize):
        stats[stage.__name__.split(".")[-1]] = stage.run(cfg, log=lambda _: None)
    return cfg, root, stats


def test_ingest_reads_all_three_formats_into_one_table(pipeline, small_corpus):
    cfg, root, stats = pipeline
    s = stats["ingest"]
    assert set(s["docs_by_format"]) == {"jsonl", "parquet", "warc"}
    assert s["docs_by_format"]["parquet"] == 150
    assert s["docs_out"] + s["quarantined_total"] == s["records_in"]
    folder = out_dir(ingest, cfg)
    table = pq.read_table(folder / sorted(json.loads((folder / MANIFEST).read_text())["files"])[0])
    assert table.column_names == ["id", "text", "source", "url", "metadata"]
    warc_docs = [d for d in docs_in(out_dir(ingest, cfg)) if d.source.endswith(".warc.gz")]
    assert warc_docs and all(d.url.startswith("http") for d in warc_docs)
    # trafilatura extracted text, not markup
    assert not any("<html" in d.text.lower() or "</div>" in d.text for d in warc_docs)
    assert len({d.id for d in docs_in(out_dir(ingest, cfg))}) == s["docs_out"]


def test_stage_writes_stats_and_manifest_with_checksums(pipeline):
    cfg, root, stats = pipeline
    for stage in (ingest, filter, dedup, tokenizer, tokenize):
        folder = out_dir(stage, cfg)
        assert folder.parent.parent == root  # {root}/{stage}/{version}
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, entry in manifest["files"].items():
            assert storage.file_digest(str(folder / name)) == entry
        assert json.loads((folder / STATS).read_text())["seconds"] >= 0


def test_filter_counts_removals_per_rule_and_keeps_removed_docs(pipeline):
    cfg, root, stats = pipeline
    s = stats["filter"]
    assert s["docs_in"] == stats["ingest"]["docs_out"]
    assert s["docs_in"] == s["docs_out"] + sum(s["removed"].values())
    rules = ["url", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords"]
    assert list(s["removed"]) == rules
    assert s["removed"]["language"] > 0 and s["removed"]["gopher_quality"] > 0
    assert s["bytes_out"] + sum(s["removed_bytes"].values()) <= s["bytes_in"]
    assert all(s["removed_bytes"][r] > 0 for r in rules if s["removed"][r])
    kept = docs_in(out_dir(filter, cfg))
    assert kept and all(d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65 for d in kept)
    removed = [d for f in (out_dir(filter, cfg) / "removed").glob("*.parquet") for d in read_docs(str(f))]
    sampled = Counter(d.metadata["removed_by"].split(":")[0] for d in removed)
    # a bounded sample per rule and shard, and every rule that removed something has examples
    assert all(
        0 < sampled[r] <= min(s["removed"][r], cfg.filter.removed_sample_per_rule * 10)
        for r in rules
        if s["removed"][r]
    )
    assert any(d.metadata["language"] in ("de", "fr", "es") for d in removed)


def test_tokenizer_round_trips_and_has_eos(pipeline):
    cfg, root, stats = pipeline
    tok = tokenizer.load(cfg)
    assert tok.get_vocab_size() == 1000 == stats["tokenizer"]["vocab_size"]
    for text in ["Plain English.", "Größe naïve café — 東京 🚀\ttabs\nnewlines", " leading  spaces "]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(cfg.tokenizer.eos_token) == stats["tokenizer"]["eos_id"]


def test_tokenize_split_is_disjoint_deterministic_and_counted(pipeline):
    from litdata import StreamingDataset, TokensLoader

    cfg, root, stats = pipeline
    s = stats["tokenize"]
    assert s["docs"]["train"] + s["docs"].get("val", 0) == stats["dedup"]["docs_out"]
    val_ids = [json.loads(line)["id"] for line in (out_dir(tokenize, cfg) / "val_docs.jsonl").read_text().splitlines()]
    assert len(val_ids) == s["docs"].get("val", 0)
    assert all(tokenize.split_of(i, cfg.tokenize.val_fraction) == "val" for i in val_ids)
    eos = stats["tokenizer"]["eos_id"]
    train = StreamingDataset(str(out_dir(tokenize, cfg) / "train"), item_loader=TokensLoader(block_size=64))
    tokens = [t for block in train for t in block.tolist()]
    assert len(tokens) == (s["tokens"]["train"] // 64) * 64
    assert tokens.count(eos) >= len(tokens) // 64 // 20  # documents are separated by EOS


def test_rerun_skips_every_stage_and_config_change_rebuilds(pipeline):
    cfg, root, stats = pipeline
    manifest_before = (out_dir(dedup, cfg) / MANIFEST).read_text()
    for stage in (ingest, filter, dedup, tokenizer, tokenize):
        assert stage.run(cfg, log=lambda _: None)["skipped"] is True
    assert (out_dir(dedup, cfg) / MANIFEST).read_text() == manifest_before
    changed = cfg.model_copy(deep=True)
    changed.dedup.threshold = 0.9
    assert dedup.run(changed, log=lambda _: None)["skipped"] is False
    assert tokenizer.run(changed, log=lambda _: None)["skipped"] is False  # its input changed
    # The new version lives beside the old one: switching back is free.
    assert out_dir(dedup, changed) != out_dir(dedup, cfg)
    assert out_dir(dedup, changed).parent == out_dir(dedup, cfg).parent
    assert (out_dir(dedup, cfg) / MANIFEST).read_text() == manifest_before
    assert dedup.run(cfg, log=lambda _: None)["skipped"] is True
    # force: rebuilt in place, the same bytes
    lines: list[str] = []
    assert dedup.run(cfg, log=lines.append, force=True)["skipped"] is False
    assert any("rebuilding (forced)" in line for line in lines)
    assert json.loads((out_dir(dedup, cfg) / MANIFEST).read_text())["files"] == json.loads(manifest_before)["files"]
    # A token (a flow run's id) forces once: the same token again, a retry of that flow run, keeps the rebuild.
    assert dedup.run(cfg, log=lines.append, force="flow-run-1")["skipped"] is False
    assert dedup.run(cfg, log=lines.append, force="flow-run-1")["skipped"] is True
    assert any("not forced again" in line for line in lines)
    assert dedup.run(cfg, log=lines.append, force="flow-run-2")["skipped"] is False


def test_incomplete_output_is_rebuilt(pipeline):
    cfg, root, stats = pipeline
    (out_dir(filter, cfg) / MANIFEST).unlink()
    (out_dir(filter, cfg) / "garbage.tmp-1234").write_text("half a file")
    s = filter.run(cfg, log=lambda _: None)
    assert s["skipped"] is False and not (out_dir(filter, cfg) / "garbage.tmp-1234").exists()
    assert s["docs_out"] == stats["filter"]["docs_out"]


def test_output_does_not_depend_on_worker_count(pipeline, tmp_path):
    cfg, root, stats = pipeline
    assert cfg.ingest.workers == cfg.filter.workers == 2
    serial = cfg.model_copy(deep=True)
    serial.storage.root = str(tmp_path)
    serial.ingest.workers = serial.filter.workers = 1
    for stage in (ingest, filter):
        stage.run(serial, log=lambda _: None)
        parallel_files = json.loads((out_dir(stage, cfg) / MANIFEST).read_text())["files"]
        serial_files = json.loads((out_dir(stage, serial) / MANIFEST).read_text())["files"]
        assert serial_files == parallel_files
    assert cfg.section_digest("ingest", "filter") == serial.section_digest("ingest", "filter")


def test_ingest_reads_inputs_from_s3_like_local_files(pipeline, small_corpus, s3_endpoint, tmp_path):
    cfg, root, stats = pipeline
    client, bucket = s3_endpoint["client"], s3_endpoint["bucket"]
    for path in small_corpus.values():
        client.upload_file(str(path), bucket, f"raw/{path.name}")
    remote = load_config(
        "tiny-s3",
        {
            "storage.root": str(tmp_path),
            "storage.endpoint_url": s3_endpoint["endpoint"],
            "ingest.inputs": [f"s3://{bucket}/raw/*"],
            "ingest.docs_per_shard": 100,
        },
    )
    s = ingest.run(remote, log=lambda _: None)
    assert s["docs_by_format"] == stats["ingest"]["docs_by_format"]
    local_docs = [(d.id, d.text, d.url) for d in docs_in(out_dir(ingest, cfg))]
    remote_docs = [(d.id, d.text, d.url) for d in docs_in(out_dir(ingest, remote))]
    assert remote_docs == local_docs
    assert all(d.source.startswith(f"s3://{bucket}/raw/") for d in docs_in(out_dir(ingest, remote)))


def test_tokenizer_stage_loads_an_existing_tokenizer(pipeline, tmp_path):
    cfg, root, stats = pipeline
    given = tmp_path / "given.json"
    given.write_text((out_dir(tokenizer, cfg) / "tokenizer.json").read_text())
    reuse = cfg.model_copy(deep=True)
    reuse.storage.root = str(tmp_path / "out")
    reuse.tokenizer.path = str(given)
    (tmp_path / "out").mkdir()
    s = tokenizer.run(reuse, log=lambda _: None)
    assert s["trained"] is False and s["vocab_size"] == stats["tokenizer"]["vocab_size"]
    assert (out_dir(tokenizer, reuse) / "tokenizer.json").read_text() == given.read_text()


def test_malformed_records_are_quarantined_and_every_record_is_accounted_for(tmp_path):
    import gzip
    import io

    import pyarrow as pa
    import zstandard
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    good = "A perfectly ordinary sentence about rivers, bridges and the towns that grew beside them."
    lines = [
        json.dumps({"id": "ok-1", "text": good, "url": "https://example.org/1", "metadata": {"lang": "en"}}).encode(),
        b'{"id": "broken", "text": "unterminated',
        json.dumps({"id": "latin1", "text": "caf\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"),
        json.dumps({"id": "no-text", "body": good}).encode(),
        json.dumps({"id": "blank", "text": "   \n "}).encode(),
        json.dumps({"id": "huge", "text": "x" * 5000}).encode(),
        b"[1, 2, 3]",
        b'{"id": "surrogate", "text": "half a pair \\ud800 here"}',
        b"",
        json.dumps({"text": good + " Second."}).encode(),
    ]
    raw = b"\n".join(lines) + b"\n"
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "one.txt").write_text(good)
    (texts / "two.md").write_bytes(b"\xff\xfe not utf-8 at all")
    rows = [
        {"id": "p1", "text": good, "url": None, "metadata": "{}"},
        {"id": "p2", "text": None, "url": None, "metadata": None},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    with open(tmp_path / "d.warc.wet.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for n, body in enumerate([good.encode(), b""]):
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/plain")], protocol="HTTP/1.0")
            writer.write_record(
                writer.create_warc_record(
                    f"https://example.org/wet/{n}",
                    "conversion",
                    payload=io.BytesIO(body),
                    warc_headers_dict={"WARC-Identified-Payload-Type": "text/plain"},
                    http_headers=None,
                )
            )
        del headers

    cfg = load_config(
        "tiny",
        {
            "storage.root": str(tmp_path / "out"),
            "ingest.inputs": [str(tmp_path / "*.*"), str(texts)],
            "ingest.max_doc_bytes": 1000,
            "ingest.workers": 1,
        },
    )
    s = ingest.run(cfg, log=lambda _: None)
    per_jsonl = {
        "invalid_json": 1,
        "not_utf8": 2,
        "missing_text": 1,
        "empty_text": 1,
        "too_large": 1,
        "not_an_object": 1,
    }
    expected = {k: 2 * v for k, v in per_jsonl.items()}
    expected["not_utf8"] += 1  # two.md
    expected["missing_text"] += 1  # parquet row p2
    expected["empty_text"] = expected["empty_text"] + 1  # the empty WET record
    assert s["quarantined"] == expected
    assert s["docs_out"] == 2 * 2 + 1 + 1 + 1  # jsonl x2 (ok-1 and the id-less one), txt, parquet p1, wet
    assert s["records_in"] == s["docs_out"] + s["quarantined_total"]
    quarantine = [
        json.loads(line)
        for f in sorted((out_dir(ingest, cfg) / "quarantine").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert len(quarantine) == s["quarantined_total"]
    gz = {q["where"]: q["reason"] for q in quarantine if q["source"].endswith("a.jsonl.gz")}
    assert gz == {
        "line 2": "invalid_json",
        "line 3": "not_utf8",
        "line 4": "missing_text",
        "line 5": "empty_text",
        "line 6": "too_large",
        "line 7": "not_an_object",
        "line 8": "not_utf8",
    }
    docs = {d.id: d for d in docs_in(out_dir(ingest, cfg))}
    assert docs["ok-1"].url == "https://example.org/1" and docs["ok-1"].metadata == {"lang": "en"}
    default_id = f"{tmp_path / 'a.jsonl.gz'}#line-10"  # (the full URI: unique across inputs)
    assert default_id in docs and docs[default_id].text.endswith("Second.")
    assert any(d.url == "https://example.org/wet/0" and d.text == good for d in docs.values())


def test_url_badwords_pii_rules_and_configured_thresholds(tmp_path):
    badword = next(
        w for w in (REPO / "models" / "badwords" / "en").read_text().split("\n") if w.isalpha() and len(w) > 4
    )
    sentence = "The committee met on Tuesday to discuss the budget for the new library and the repairs to the bridge."
    body = " ".join([sentence] * 6)
    docs = [
        {"id": "blocked", "text": body, "url": "https://news.blocked-site.com/today"},
        {"id": "rude", "text": f"{body} Then someone said {badword} loudly.", "url": "https://ok.example/1"},
        {
            "id": "pii",
            "text": f"{body} Write to jane.doe@mail.example.com or ping 8.8.8.8 or 192.168.1.7.",
            "url": None,
        },
        {
            "id": "short",
            "text": "The library opened on time and the bridge was repaired at last by the city.",
            "url": None,
        },
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    overrides = {
        "storage.root": str(tmp_path / "out"),
        "ingest.inputs": [str(src)],
        "filter.url.extra_domains": ["blocked-site.com"],
        "filter.gopher_repetition.enabled": False,  # the test text repeats itself on purpose
        "filter.fineweb_quality.enabled": False,
        "filter.c4_quality.enabled": False,
    }
    cfg = load_config("tiny", overrides)
    ingest.run(cfg, log=lambda _: None)
    s = filter.run(cfg, log=lambda _: None)
    assert "gopher_repetition" not in s["removed"]
    assert (s["removed"]["url"], s["removed"]["c4_badwords"], s["removed"]["gopher_quality"]) == (1, 1, 1)
    kept = {d.id: d.text for d in docs_in(out_dir(filter, cfg))}
    assert list(kept) == ["pii"] and s["pii_redacted_docs"] == 1
    assert "jane.doe@mail.example.com" not in kept["pii"] and "8.8.8.8" not in kept["pii"]
    assert "192.168.1.7" in kept["pii"]  # private addresses are not personal data
    lenient = load_config("tiny", {**overrides, "filter.gopher_quality.min_doc_words": 10})
    assert filter.run(lenient, log=lambda _: None)["removed"]["gopher_quality"] == 0


def test_tokenize_drops_training_docs_sharing_13_grams_with_evaluation_texts(small_corpus, tmp_path):
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
            "tokenize.val_fraction": 0.2,
            "tokenizer.vocab_size": 500,
            "evaluate.decontaminate_with": [str(bench_file)],
        },
    )
    ingest_without_filtering(cfg)
    for stage in (dedup, tokenizer):
        stage.run(cfg, log=lambda _: None)
    s = tokenize.run(cfg, log=lambda _: None)
    assert s["docs"] == {"train": len(train), "val": len(val)}
    assert s["removed"] == {"decontaminated": 2}
    from litdata import StreamingDataset, TokensLoader

    stream = StreamingDataset(str(out_dir(tokenize, cfg) / "train"), item_loader=TokensLoader(block_size=1))
    eos = tokenizer.load(cfg).token_to_id(cfg.tokenizer.eos_token)
    assert sum(int(t[0]) == eos for t in stream) == len(train) - 2  # one EOS per document kept


def test_quality_classifier_is_trained_evaluated_and_applied(small_corpus, tmp_path):
    rows = pq.read_table(REPO / "data" / "sample" / "reference.parquet").to_pylist()
    reference = [r for r in rows if json.loads(r["metadata"]).get("kind") == "rest-source"]
    positive = tmp_path / "reference.jsonl"
    positive.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in reference))
    overrides = {
        "storage.root": str(tmp_path / "out"),
        "ingest.inputs": [str(small_corpus["jsonl"]), str(small_corpus["warc"])],
        "filter.quality.enabled": True,
        "filter.quality.positive": [str(positive)],
        "filter.quality.max_examples": 300,
        # the classifier is what is tested: the heuristic rules (the slow part) are off
        **{
            f"filter.{rule}.enabled": False
            for rule in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")
        },  # fmt: skip
    }
    cfg = load_config("tiny", overrides)
    ingest.run(cfg, log=lambda _: None)
    s = filter.run(cfg, log=lambda _: None)
    q = s["quality_classifier"]
    assert q["examples"]["positive"] == len(reference) and q["examples"]["negative"] == 300  # capped: max_examples
    assert q["held_out_precision"] >= 0.9 and q["held_out_recall"] >= 0.9
    assert list(s["removed"])[-1] == "quality" and s["removed"]["quality"] > 0
    assert (out_dir(filter, cfg) / q["model"]).is_file()

    # Python's documentation (pages and reST sources, like the reference corpus) survives the classifier
    def python_share(docs) -> float:
        python = ["docs.python.org" in (d.url or "") or d.metadata.get("kind") == "rest-source" for d in docs]
        return sum(python) / len(docs)

    pool, kept = docs_in(out_dir(ingest, cfg)), docs_in(out_dir(filter, cfg))
    assert python_share(kept) >= 0.75 and python_share(kept) >= 3 * python_share(pool)

    # keep_top_fraction: the threshold is the score keeping that share of the raw pool (the model alone, trained
    # again: the filter's shard pass is the same code as above)
    top = load_config("tiny", {**overrides, "filter.quality.keep_top_fraction": 0.2})
    shards = [str(p) for p in sorted(out_dir(ingest, cfg).glob("part-*.parquet"))]
    trained = quality_model.train(top, shards, str(tmp_path / "top"))
    assert trained["threshold"] != q["threshold"]


def test_reusing_word_tokenizer_gives_datatrove_tokens(small_corpus):
    from datatrove.utils import word_tokenizers
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    from stages import word_tokens

    records = readers.read_records(str(small_corpus["jsonl"]), load_config("tiny"), Counter())
    texts = [r.doc.text for r in records if r.doc][:150]
    texts += ["", "  \n ", "IS_ALPHA breaks spaCy", "Dr. Smith's e-mail: a@b.co! Next line.\n東京 🚀 ok."]
    word_tokens.install()
    word_tokens.install()  # idempotent
    ours = word_tokenizers.load_word_tokenizer("en")
    reference = SpaCyTokenizer("en")
    assert type(ours) is not SpaCyTokenizer and word_tokenizers.load_word_tokenizer("en") is ours
    for method in ("word_tokenize", "sent_tokenize", "span_tokenize"):
        for text in texts + texts[:5]:  # the repeats come from the remembered results
            assert getattr(ours, method)(text) == getattr(reference, method)(text), (method, text[:80])


def upper_unless_hang(text: str) -> str:
    if text == "hang":
        time.sleep(120)
    return text.upper()


def extract_with_a_timeout_between(_) -> list[str]:
    # (the timeout also bounds the child's start: 2 s was too short with another test process on the cores)
    with readers.RestartableSandbox(10.0) as sandbox:
        out = [sandbox.process_document("a", upper_unless_hang)]
        try:
            sandbox.process_document("hang", upper_unless_hang)
        except TimeoutError:
            out.append("timeout")
        out.append(sandbox.process_document("b", upper_unless_hang))  # a new child: a restart
    return out


def test_extraction_sandbox_restarts_after_a_timeout_inside_worker_processes():
    # our workers start with forkserver, where datatrove's own sandbox fails to restart ('cannot pickle weakref')
    assert map_in_processes(extract_with_a_timeout_between, [0, 1], workers=2) == [["A", "timeout", "B"]] * 2


def test_plan_says_what_would_run_and_why(pipeline):
    from stages import plan

    cfg, root, stats = pipeline
    rows = {r["stage"]: r for r in plan.plan(cfg)}
    assert [rows[s]["action"] for s in plan.DATA_STAGES] == ["skip"] * 5
    assert rows["tokenize"]["output"] == str(out_dir(tokenize, cfg))
    assert rows["train"]["action"] == "run" and rows["train"]["reason"].startswith("never trained")
    assert rows["evaluate"] == {"stage": "evaluate", "action": "run", "reason": "after train", "output": ""}

    changed = cfg.model_copy(deep=True)
    changed.filter.c4_quality.min_words_per_line = 4  # a filter setting never used before
    rows = {r["stage"]: r for r in plan.plan(changed, force=["ingest"])}
    assert rows["ingest"]["action"] == "run" and rows["ingest"]["reason"] == "forced"
    assert rows["filter"]["reason"] == "after ingest, unless its output comes out unchanged"
    rows = {r["stage"]: r for r in plan.plan(changed)}
    assert rows["ingest"]["action"] == "skip"
    assert rows["filter"]["action"] == "run" and rows["filter"]["reason"].startswith("config section changed since ")
    assert rows["dedup"]["reason"] == "after filter, unless its output comes out unchanged"
    assert "| filter | run | config section changed" in plan.markdown(plan.plan(changed))
    with pytest.raises(ValueError, match=r"force: unknown stage\(s\) \['tokenise'\]"):
        plan.plan(cfg, force=["tokenise"])
