"""The ingest stage (stages/ingest/): every format into one document table, local or S3, every malformed record
quarantined and accounted for, and extraction that survives a hang."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq

from stages.core.config import load_config
from stages.core.parallel import map_in_processes
from stages.core.storage import MANIFEST
from stages.ingest import readers
from stages.pipeline import PIPELINE
from tests.conftest import docs_in, out_dir


def test_ingest_reads_all_three_formats_into_one_table(data_pipeline, small_corpus):
    cfg, root, stats = data_pipeline
    s = stats["ingest"]
    assert set(s["docs_by_format"]) == {"jsonl", "parquet", "warc"}
    assert s["docs_by_format"]["parquet"] == 150
    assert s["docs_out"] + s["quarantined_total"] == s["records_in"]
    folder = out_dir("ingest", cfg)
    table = pq.read_table(folder / sorted(json.loads((folder / MANIFEST).read_text())["files"])[0])
    assert table.column_names == ["id", "text", "source", "url", "metadata"]
    warc_docs = [d for d in docs_in(out_dir("ingest", cfg)) if d.source.endswith(".warc.gz")]
    assert warc_docs and all(d.url.startswith("http") for d in warc_docs)
    # trafilatura extracted text, not markup
    assert not any("<html" in d.text.lower() or "</div>" in d.text for d in warc_docs)
    assert len({d.id for d in docs_in(out_dir("ingest", cfg))}) == s["docs_out"]


def test_ingest_reads_inputs_from_s3_like_local_files(data_pipeline, small_corpus, s3_endpoint, tmp_path):
    cfg, root, stats = data_pipeline
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
    s = PIPELINE.run("ingest", remote, log=lambda _: None)
    assert s["docs_by_format"] == stats["ingest"]["docs_by_format"]
    local_docs = [(d.id, d.text, d.url) for d in docs_in(out_dir("ingest", cfg))]
    remote_docs = [(d.id, d.text, d.url) for d in docs_in(out_dir("ingest", remote))]
    assert remote_docs == local_docs
    assert all(d.source.startswith(f"s3://{bucket}/raw/") for d in docs_in(out_dir("ingest", remote)))


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
    s = PIPELINE.run("ingest", cfg, log=lambda _: None)
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
        for f in sorted((out_dir("ingest", cfg) / "quarantine").glob("*.jsonl"))
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
    docs = {d.id: d for d in docs_in(out_dir("ingest", cfg))}
    assert docs["ok-1"].url == "https://example.org/1" and docs["ok-1"].metadata == {"lang": "en"}
    default_id = f"{tmp_path / 'a.jsonl.gz'}#line-10"  # (the full URI: unique across inputs)
    assert default_id in docs and docs[default_id].text.endswith("Second.")
    assert any(d.url == "https://example.org/wet/0" and d.text == good for d in docs.values())


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
