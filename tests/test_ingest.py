"""The ingest stage (stages/ingest/): every format into one document table, local or S3, every malformed record
quarantined and accounted for, and extraction that survives a hang."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq

from stages.core.config import load_config
from stages.core.parallel import map_in_processes
from stages.core.storage import MANIFEST
from stages.ingest import extract
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
    with extract.RestartableSandbox(10.0) as sandbox:
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


# ---------------------------------------------------------------------------------------------------------------
# HTML extraction (stages/ingest/extract.py)

PROSE = "The river bends twice before it reaches the sea, and the town on its bank grows with every season."
DEEP = "<html><body>" + "<div>" * 200_000 + PROSE + "</div>" * 200_000 + "</body></html>"  # minutes for Resiliparse


def page(n: int) -> str:
    paragraphs = "".join(f"<p>{PROSE} Page {n}, part {k}.</p>" for k in range(4))
    menu = "".join(f'<li><a href="/{k}">Section {k}</a></li>' for k in range(12))
    footer = "<footer>Copyright 2026. All rights reserved. Privacy. Terms.</footer>"
    return (f"<html><head><title>Page {n}</title></head><body><nav><ul>{menu}</ul></nav><article>{paragraphs}"
            f"</article>{footer}</body></html>")  # fmt: skip


def warc_of(pages: list[str], path) -> str:
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True)
    for n, body in enumerate(pages):
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"https://example.org/{n}", "response",
                                                      payload=io.BytesIO(body.encode()), http_headers=headers))
    path.write_bytes(buffer.getvalue())
    return str(path)


def ingest_warc(tmp_path, uri: str, **settings) -> tuple[dict, list]:
    cfg = load_config("tiny", {"storage.root": str(tmp_path / "out"), "ingest.inputs": [uri], **settings})
    stats = PIPELINE.run("ingest", cfg, log=lambda _: None)
    return stats, docs_in(out_dir("ingest", cfg))


def test_each_extractor_gives_the_main_text_without_the_boilerplate(small_corpus, tmp_path):
    found = {}
    for name in ("resiliparse", "trafilatura"):
        stats, docs = ingest_warc(tmp_path / name, str(small_corpus["warc"]), **{"ingest.extractor": name})
        assert stats["extracted_by"] == {name: stats["docs_out"]} and stats["docs_out"] >= 50, stats
        found[name] = docs
        assert all(d.text.strip() and "<div" not in d.text for d in docs)
    made = {name: {d.url for d in docs} for name, docs in found.items()}
    assert len(made["resiliparse"] & made["trafilatura"]) >= 0.9 * len(made["trafilatura"])
    stats, docs = ingest_warc(tmp_path / "pages", warc_of([page(n) for n in range(3)], tmp_path / "p.warc.gz"))
    assert [d.text.count(PROSE) for d in docs] == [4, 4, 4]
    assert not any("Section 3" in d.text or "All rights reserved" in d.text for d in docs)  # menus and footers


def test_a_page_past_the_deadline_is_quarantined_and_the_next_one_extracted(tmp_path):
    """The deadline holds in the main thread and in any other (a Dask worker's): the page's extraction runs in the
    sandbox process either way, and the output is the same."""
    import threading

    uri = warc_of([DEEP, page(1), page(2)], tmp_path / "deep.warc.gz")
    settings = {"ingest.extract_timeout_s": 2.0}
    started = time.perf_counter()
    timed, docs = ingest_warc(tmp_path / "timer", uri, **settings)
    assert time.perf_counter() - started < 60
    assert timed["quarantined"] == {"extraction_timeout": 1} and [d.url for d in docs] == [
        "https://example.org/1", "https://example.org/2"
    ]  # fmt: skip
    result = {}
    thread = threading.Thread(target=lambda: result.update(run=ingest_warc(tmp_path / "sandbox", uri, **settings)))
    thread.start()
    thread.join(120)
    sandboxed, sandbox_docs = result["run"]
    assert sandboxed["quarantined"] == {"extraction_timeout": 1}
    assert [(d.id, d.text) for d in sandbox_docs] == [(d.id, d.text) for d in docs]


def test_a_page_the_extractor_finds_too_little_in_is_extracted_again_with_the_fallback(tmp_path):
    listing = ("<html><body><table>" + "".join(f"<tr><td>{PROSE} Row {n}.</td></tr>" for n in range(3))
               + "</table></body></html>")  # fmt: skip
    uri = warc_of([page(0), listing], tmp_path / "mixed.warc.gz")
    plain, _ = ingest_warc(tmp_path / "plain", uri)
    both, docs = ingest_warc(tmp_path / "both", uri, **{"ingest.fallback_extractor": "trafilatura",
                                                        "ingest.fallback_min_chars": 100_000})  # fmt: skip
    assert plain["extracted_by"] == {"resiliparse": 2}
    # every page is tried with both (a minimum no page reaches); the longer text is kept: trafilatura's for the
    # table (323 characters against 317), Resiliparse's for the article (462 against 459)
    assert both["extracted_by"] == {"resiliparse": 1, "trafilatura": 1} and len(docs) == 2


def test_an_extractor_is_its_own_fallback_is_refused():
    from stages.core.config import ConfigError

    try:
        load_config("tiny", {"ingest.fallback_extractor": "resiliparse"})
    except ConfigError as exc:
        assert "fallback_extractor: resiliparse is the extractor itself" in str(exc)
    else:
        raise AssertionError("accepted")


# ---------------------------------------------------------------------------------------------------------------
# Big files in slices (stages/ingest/slices.py)


def quarantined_in(cfg) -> list[tuple]:
    folder = out_dir("ingest", cfg) / "quarantine"
    entries = [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.open()]
    return sorted((e["source"], e["where"], e["offset"], e["reason"]) for e in entries)


def ingested(tmp_path, name: str, inputs: list[str], **settings) -> tuple[dict, list, list]:
    cfg = load_config("tiny", {"storage.root": str(tmp_path / name), "ingest.inputs": inputs, "ingest.workers": 2,
                               "ingest.docs_per_shard": 50, **settings})  # fmt: skip
    stats = PIPELINE.run("ingest", cfg, log=lambda _: None)
    docs = [(d.id, d.text, d.url, d.source, d.metadata) for d in docs_in(out_dir("ingest", cfg))]
    return stats, docs, quarantined_in(cfg)


def test_a_big_file_is_read_in_slices_with_the_positions_and_ids_of_the_whole(small_corpus, tmp_path):
    import gzip

    lines = gzip.open(small_corpus["jsonl"]).read().splitlines(keepends=True)
    bad = [b"{broken\n", b'{"id": 7}\n', b"\xff\xfe\n", b'{"text": "no id, so its position is its id"}\n']
    for k, line in enumerate(bad):  # (malformed records and an id from the position, in every slice)
        lines.insert(40 + 90 * k, line)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "docs.jsonl").write_bytes(b"".join(lines))
    pq.write_table(pq.read_table(small_corpus["parquet"]), raw / "rows.parquet", row_group_size=20)
    (raw / "web.warc.gz").write_bytes(small_corpus["warc"].read_bytes())
    (raw / "plain.warc").write_bytes(gzip.open(small_corpus["warc"]).read())
    inputs = [str(p) for p in sorted(raw.iterdir())]

    whole = ingested(tmp_path, "whole", inputs)
    sliced = ingested(tmp_path, "sliced", inputs, **{"ingest.slice_bytes": 60_000})
    assert whole[0]["slices"] == 4 and sliced[0]["slices"] >= 20, sliced[0]["slices"]
    assert sliced[1] == whole[1] and len(whole[1]) == whole[0]["docs_out"] > 600
    assert sliced[2] == whole[2] and {e[3] for e in whole[2]} >= {"invalid_json", "missing_text", "not_utf8"}
    assert any(doc_id.endswith("#line-311") for doc_id, *_ in whole[1])  # (the 4th planted line's, by position)
    assert {k: sliced[0][k] for k in ("records_in", "docs_out", "bytes_in", "files_in")} == {
        k: whole[0][k] for k in ("records_in", "docs_out", "bytes_in", "files_in")
    }


def test_slices_cut_files_at_record_starts_and_every_byte_is_in_one(small_corpus, tmp_path):
    import gzip

    from fastwarc.warc import ArchiveIterator

    from stages.ingest import slices

    (tmp_path / "plain.warc").write_bytes(gzip.open(small_corpus["warc"]).read())
    (tmp_path / "lines.jsonl").write_bytes(b"".join(b'{"text": "%d"}\n' % n for n in range(20_000)))
    for path in (small_corpus["warc"], tmp_path / "plain.warc", tmp_path / "lines.jsonl"):
        fmt = "warc" if "warc" in path.name else "jsonl"
        cfg = load_config("tiny", {"ingest.inputs": [str(path)], "ingest.slice_bytes": 25_000})
        pieces = slices.plan(str(path), fmt, path.stat().st_size, cfg)
        assert len(pieces) > 5 and pieces[0].start == 0 and pieces[-1].end is None
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # contiguous: nothing read twice or lost
        if fmt == "warc":
            starts = {r.stream_pos for r in ArchiveIterator(open(path, "rb"), parse_http=False)}
            assert {p.start for p in pieces} <= starts
        else:
            data = path.read_bytes()
            assert all(data[p.start - 1 : p.start] == b"\n" and data.count(b"\n", 0, p.start) == p.first - 1
                       for p in pieces[1:])  # fmt: skip


def test_a_warc_cut_where_no_record_starts_is_found_and_the_file_read_whole(tmp_path):
    """A page whose payload is itself a WARC file (an archived crawl) holds what looks like a record's start: a cut
    there would read the page's insides as records. The slice before it ends elsewhere, which gives it away."""
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    inner = io.BytesIO()
    WARCWriter(inner, gzip=False).write_record(WARCWriter(inner, gzip=False).create_warc_record(
        "https://inner.example/", "response", payload=io.BytesIO(page(99).encode()),
        http_headers=StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")))  # fmt: skip
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=False)
    for n, body in enumerate([page(0).encode(), b"x" * 30_000 + b"\r\n\r\n" + inner.getvalue(), page(2).encode()]):
        kind = "text/html" if n != 1 else "application/warc"
        headers = StatusAndHeaders("200 OK", [("Content-Type", kind)], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(f"https://example.org/{n}", "response",
                                                      payload=io.BytesIO(body), http_headers=headers))  # fmt: skip
    path = tmp_path / "crawl.warc"
    path.write_bytes(out.getvalue())
    whole = ingested(tmp_path, "whole", [str(path)])
    cut = ingested(tmp_path, "cut", [str(path)], **{"ingest.slice_bytes": 20_000})
    assert [doc[2] for doc in whole[1]] == ["https://example.org/0", "https://example.org/2"]
    assert cut[1] == whole[1] and cut[2] == whole[2]
    assert cut[0]["docs_out"] == 2 and cut[0]["slices"] == 1  # (read again as one)
