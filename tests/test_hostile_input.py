"""Hostile input: one ingest run over a folder of damaged and malformed files beside good ones.

It completes; every record is a document or one quarantine entry naming its file, position and reason; a file
damaged part-way keeps what came before the damage; the counts add up exactly; a SIGKILL at a random point and a
rerun give byte-identical output; and a disk that fills up or turns read-only fails the stage naming the stage and
the path.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from stages.core.config import load_config
from stages.core.storage import MANIFEST, STATS
from stages.pipeline import PIPELINE
from tests.conftest import REPO, docs_in, out_dir

PROSE = (
    "The river bends twice before it reaches the old market town, where the stone bridge has stood for four "
    "hundred years. Farmers bring their cattle across it every spring, and the children of the village count them."
)
REASONS = {
    "unreadable_tail", "truncated_record", "invalid_json", "not_utf8", "not_an_object", "missing_text", "empty_text",
    "too_large", "binary", "extraction_empty", "extraction_failed", "extraction_timeout", "invalid_record",
}  # fmt: skip
MAX_DOC_BYTES = 1_000_000  # (lines over about 7 MB are skipped in pieces: readers.line_limit)


def line(n: int, **extra) -> bytes:
    return json.dumps({"text": f"{PROSE} Paragraph {n}.", **extra}).encode() + b"\n"


def lines(count: int, start: int = 0, **extra) -> bytes:
    return b"".join(line(start + n, **extra) for n in range(count))


def warc_bytes(pages: list[bytes], compress: bool, content_type: str = "text/html") -> bytes:
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=compress)
    for n, body in enumerate(pages):
        headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
        record = writer.create_warc_record(f"https://example.org/page/{n}", "response", payload=io.BytesIO(body),
                                           http_headers=headers)  # fmt: skip
        writer.write_record(record)
    return buffer.getvalue()


def html(n: int) -> bytes:
    paragraphs = "".join(f"<p>{PROSE} Page {n}, part {k}.</p>" for k in range(4))
    return f"<html><head><title>Page {n}</title></head><body><article>{paragraphs}</article></body></html>".encode()


def hostile_folder(root: Path, small_corpus: dict) -> dict:
    """Writes the files; returns what each should give: {name: expectations}."""
    root.mkdir()
    rng = random.Random(17)
    expect: dict[str, dict] = {}

    def put(name: str, data: bytes, **what) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[name] = what

    good = lines(20)
    put("good/clean.jsonl", good, docs=20)
    put("good/docs.jsonl.gz", small_corpus["jsonl"].read_bytes())
    put("good/reference.parquet", small_corpus["parquet"].read_bytes())
    put("good/web.warc.gz", small_corpus["warc"].read_bytes())
    # damaged containers: what came before the damage is kept, the rest is one unreadable_tail
    zipped = gzip.compress(lines(400))
    put("truncated.jsonl.gz", zipped[: len(zipped) // 2], tail=True, some_docs=True)
    put("plain-named.jsonl.gz", good, tail=True, docs=0)
    put("garbage.jsonl.zst", rng.randbytes(5000), tail=True, docs=0)
    squeezed = zstandard.ZstdCompressor().compress(lines(3000))  # (blocks of 128 KB: several)
    put("truncated.jsonl.zst", squeezed[: len(squeezed) // 2], tail=True, some_docs=True)
    members = gzip.compress(lines(30)) + gzip.compress(lines(30, 30))
    put("second-member-cut.jsonl.gz", members[: len(members) - 200], tail=True, some_docs=True)
    table = pa.Table.from_pylist([{"id": f"p{n}", "text": f"{PROSE} Row {n}."} for n in range(50)])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    put("truncated.parquet", sink.getvalue()[:-40], tail=True, docs=0)
    put("garbage.parquet", rng.randbytes(3000), tail=True, docs=0)
    put("zero-bytes.parquet", b"", tail=True, docs=0)
    warc = warc_bytes([html(n) for n in range(6)], compress=True)
    put("truncated.warc.gz", warc[: int(len(warc) * 0.7)], tail=True, some_docs=True)
    put("garbage.warc", rng.randbytes(4000), tail=True, docs=0)
    put("zero-bytes.warc.gz", b"", docs=0)
    # a record cut short in an uncompressed WARC: the payload is shorter than its Content-Length
    plain_warc = warc_bytes([html(n) for n in range(3)], compress=False)
    put("truncated.warc", plain_warc[:-120], docs=2, reasons={"truncated_record": 1})
    put("non-html.warc.gz", warc_bytes([rng.randbytes(800)], compress=True, content_type="image/png"), docs=0)
    # 200,000 nested elements: Resiliparse's time grows with the square of the depth (50,000 take it 2 minutes), so
    # the page runs into the deadline and the next one is extracted as usual
    deep_html = b"<html><body>" + b"<div>" * 200_000 + PROSE.encode() + b"</div>" * 200_000 + b"</body></html>"
    put("deep-html.warc.gz", warc_bytes([deep_html, html(1)], compress=True), docs=1,
        reasons={"extraction_timeout": 1})  # fmt: skip
    # bad records among good ones: each quarantined alone
    deep = b"[" * 10_000 + b"]" * 10_000
    put("deep.jsonl", lines(3) + b'{"text": ' + deep + b"}\n" + lines(3, 3), docs=6, reasons={"invalid_json": 1})
    put("huge-number.jsonl", lines(2) + b'{"text": "x", "n": ' + b"9" * 5000 + b"}\n", docs=2,
        reasons={"invalid_json": 1})  # fmt: skip
    put("bom.jsonl", b"\xef\xbb\xbf" + lines(3), docs=3)
    put("crlf.jsonl", lines(4).replace(b"\n", b"\r\n"), docs=4)
    put("blank-lines.jsonl", b"\n\n  \n" + line(0) + b"\n\n\r\n" + line(1) + b"\n\n", docs=2)
    latin1 = json.dumps({"text": PROSE + " Café."}, ensure_ascii=False).encode("latin-1") + b"\n"
    put("mixed-encodings.jsonl", line(0) + latin1 + line(1) + "{\"text\": \"Ünïcödé\"}\n".encode("cp1252"),
        docs=2, reasons={"not_utf8": 2})  # fmt: skip
    put("utf16.jsonl", (PROSE + "\n").encode("utf-16"), docs=0, reasons={"not_utf8": 1, "invalid_json": 1})
    big = b'{"text": "' + b"a" * 50_000_000 + b'"}\n'
    put("fifty-mb-line.jsonl", line(0) + big + line(1), docs=2, reasons={"too_large": 1})
    put("arrays.jsonl", b"[1, 2]\n" + line(0) + b'"just a string"\n', docs=1, reasons={"not_an_object": 2})
    put("wrong-types.jsonl", b'{"text": 12}\n{"text": null}\n{"text": ["a"]}\n{"text": "   "}\n' + line(0),
        docs=1, reasons={"missing_text": 3, "empty_text": 1})  # fmt: skip
    put("surrogate.jsonl", b'{"text": "half \\ud800 a pair"}\n' + line(0), docs=1, reasons={"not_utf8": 1})
    put("nul.jsonl", b'{"text": "a\\u0000b c d"}\n' + line(0), docs=1, reasons={"binary": 1})
    put("deep-metadata.jsonl", json.dumps({"text": PROSE, "metadata": "[" * 5000}).encode() + b"\n", docs=1)
    put("prose.json", PROSE.encode() + b"\nmore prose\n", docs=0, reasons={"invalid_json": 2})
    put("empty.jsonl", b"", docs=0)
    put("empty.jsonl.gz", gzip.compress(b""), docs=0)
    put("binary.txt", rng.randbytes(2000), docs=0, reasons={"not_utf8": 1})
    put("zeros.txt", b"\x00" * 2000, docs=0, reasons={"binary": 1})
    put("cut-utf8.md", (PROSE + " naï").encode()[:-1], docs=0, reasons={"not_utf8": 1})  # (cut inside the ï)
    put("too-big.txt", PROSE.encode() * 6000, docs=0, reasons={"too_large": 1})
    put("windows.txt", (PROSE + "\r\n" + PROSE).encode(), docs=1)
    # ids: the same file name in two folders (no ids: unique by full URI), and one explicit id given twice
    put("a/docs.jsonl", lines(3) + line(9, id="shared"), docs=4)
    put("b/docs.jsonl", lines(3, 3) + line(10, id="shared"), docs=4)
    return expect


def hostile_config(root: Path, out: Path, workers: int = 1):
    # (a 5 s deadline: the deep page takes Resiliparse minutes, a normal page milliseconds even on a loaded machine)
    return load_config("tiny", {"storage.root": str(out), "ingest.inputs": [str(root)], "ingest.workers": workers,
                                "ingest.max_doc_bytes": MAX_DOC_BYTES, "ingest.docs_per_shard": 200,
                                "ingest.extract_timeout_s": 5.0})  # fmt: skip


@pytest.fixture(scope="module")
def hostile(small_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    expect = hostile_folder(base / "in", small_corpus)
    cfg = hostile_config(base / "in", base / "out")
    logged: list[str] = []
    stats = PIPELINE.run("ingest", cfg, log=logged.append)
    return base, expect, cfg, stats, logged


def quarantine_of(folder: Path) -> list[dict]:
    return [json.loads(q) for f in sorted((folder / "quarantine").glob("*.jsonl")) for q in f.read_text().splitlines()]


def test_every_file_is_ingested_and_every_record_accounted_for(hostile):
    base, expect, cfg, stats, logged = hostile
    folder = out_dir("ingest", cfg)
    assert stats["files_in"] == len(expect) >= 30 + 4
    assert stats["records_in"] == stats["docs_out"] + stats["quarantined_total"]
    entries = quarantine_of(folder)
    assert len(entries) == stats["quarantined_total"]
    assert Counter(e["reason"] for e in entries) == Counter(stats["quarantined"])
    for e in entries:  # each names its file, position and reason
        assert Path(e["source"]).relative_to(base / "in").as_posix() in expect, e
        assert e["reason"] in REASONS and e["where"] and e["raw"], e
        if e["source"].endswith((".jsonl", ".json")):
            assert e["where"].startswith("line ") and isinstance(e["offset"], int), e
    docs = Counter(Path(d.source).relative_to(base / "in").as_posix() for d in docs_in(folder))
    by_file = {name: Counter() for name in expect}
    for e in entries:
        by_file[Path(e["source"]).relative_to(base / "in").as_posix()][e["reason"]] += 1
    for name, what in expect.items():
        if "docs" in what:
            assert docs[name] == what["docs"], (name, docs[name], by_file[name])
        if what.get("some_docs"):
            assert docs[name] > 0, name  # the records before the damage are kept
        assert by_file[name]["unreadable_tail"] == (1 if what.get("tail") else 0), (name, by_file[name])
        for reason, count in what.get("reasons", {}).items():
            assert by_file[name][reason] == count, (name, reason, by_file[name])
    for marker in (folder / "_progress").glob("file-*.json"):  # per file too: records = documents + quarantined
        result = json.loads(marker.read_text())
        assert result["records"] == result["docs"] + sum(result["quarantined"].values()), result["uri"]


def test_a_damaged_file_says_where_reading_stopped(hostile):
    base, expect, cfg, stats, logged = hostile
    entries = quarantine_of(out_dir("ingest", cfg))
    tails = {Path(e["source"]).name: e for e in entries if e["reason"] == "unreadable_tail"}
    docs = Counter(Path(d.source).name for d in docs_in(out_dir("ingest", cfg)))
    cut = tails["truncated.jsonl.gz"]  # every line before the damage is a document, the tail starts after them
    assert cut["where"] == f"line {docs['truncated.jsonl.gz'] + 1} to the end" and cut["offset"] > 0
    assert "EOFError" in cut["raw"] and f"byte {cut['offset']}" in cut["raw"]
    plain, parquet = tails["plain-named.jsonl.gz"], tails["truncated.parquet"]
    assert "BadGzipFile" in plain["raw"] and plain["where"] == "line 1 to the end"
    assert "ZstdError" in tails["garbage.jsonl.zst"]["raw"]
    assert "EOFError: zstd stream ended inside a frame" in tails["truncated.jsonl.zst"]["raw"]
    assert "ArrowInvalid" in parquet["raw"] and parquet["where"] == "row 1 to the end"
    assert tails["truncated.warc.gz"]["where"].startswith("record at byte ")
    short = next(e for e in entries if e["reason"] == "truncated_record")
    assert Path(short["source"]).name == "truncated.warc" and short["where"] == f"record at byte {short['offset']}"
    assert "short of its Content-Length" in short["raw"]


def test_ids_are_unique_by_full_uri_and_repeats_are_counted(hostile):
    base, expect, cfg, stats, logged = hostile
    docs = docs_in(out_dir("ingest", cfg))
    ids = Counter(d.id for d in docs)
    assert ids["shared"] == 2 and all(n == 1 for i, n in ids.items() if i != "shared")
    assert f"{base / 'in' / 'a' / 'docs.jsonl'}#line-1" in ids and f"{base / 'in' / 'b' / 'docs.jsonl'}#line-1" in ids
    assert stats["repeated_ids"] == 1
    assert stats["repeated_id_examples"] == [
        {"id": "shared", "inputs": [str(base / "in" / "a" / "docs.jsonl"), str(base / "in" / "b" / "docs.jsonl")]}
    ]
    assert any("1 documents repeat an id" in line and "'shared'" in line for line in logged)
    assert not (out_dir("ingest", cfg) / "_ids").exists()  # the id hashes are scratch
    saved = json.loads((out_dir("ingest", cfg) / STATS).read_text())
    assert saved["repeated_ids"] == 1


KILLABLE = """
import sys
from stages.pipeline import PIPELINE
from stages.core.config import PipelineConfig
cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
print("started", flush=True)
PIPELINE.run("ingest", cfg, log=lambda _: None)
"""


def test_sigkill_at_a_random_point_then_rerun_is_byte_identical(hostile, tmp_path):
    base, expect, cfg, stats, logged = hostile
    killed = hostile_config(base / "in", tmp_path / "out", workers=2)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(killed.to_json())
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 0.5) * stats["seconds"]  # (that run had one worker, this one two)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(cfg_file)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "started"
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers, wherever they are
    assert proc.wait() == -signal.SIGKILL, f"seed {seed}: the stage finished within {delay:.2f}s"
    folder = out_dir("ingest", killed)
    rerun = PIPELINE.run("ingest", killed, log=lambda _: None)
    manifest, expected = (json.loads((f / MANIFEST).read_text()) for f in (folder, out_dir("ingest", cfg)))
    assert manifest["files"] == expected["files"], f"seed {seed}, killed after {delay:.2f}s"  # byte-identical
    assert manifest["counts"] == expected["counts"]
    assert rerun["repeated_ids"] == stats["repeated_ids"]


UNWRITABLE = """
import sys
from stages.pipeline import PIPELINE
from stages.core.config import load_config
cfg = load_config("tiny", {"storage.root": sys.argv[1], "ingest.inputs": sys.argv[2:], "ingest.workers": 1})
try:
    PIPELINE.run("ingest", cfg, log=lambda _: None)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(3)
"""


@pytest.mark.parametrize("mount", ["size=96k", "ro"])
def test_a_full_or_read_only_disk_names_the_stage_and_the_path(small_corpus, tmp_path, mount):
    """A real small tmpfs (full after 96 KB) or a read-only one, in a mount namespace of this test's own."""
    root = tmp_path / "disk"
    root.mkdir()
    options = "size=96k" if mount != "ro" else "ro"
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = f"mount -t tmpfs -o {options} tmpfs {root} && exec {sys.executable} -c \"$0\" \"$@\""
    inputs = [str(small_corpus["jsonl"]), str(small_corpus["parquet"])]
    run = subprocess.run([*unshare, "sh", "-c", script, UNWRITABLE, str(root), *inputs], cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    problem = "No space left on device" if mount != "ro" else "Read-only file system"
    message = run.stdout.strip().splitlines()[-1]
    assert message.startswith(f"StorageError: ingest: {problem}: {root}/ingest/"), message
    assert "rerun once it is fixed" in message and ".tmp-" not in message


def test_repeated_ids_leave_dedup_decontamination_and_lineage_correct(tmp_path):
    """Two inputs reuse each other's ids: dedup removes by position (the exact and the near copy, never the other
    document of a shared id), decontamination by text (one of two documents sharing an id), and lineage names both
    inputs."""
    from stages.tokenize.stage import split_of
    from stages.tools import lineage
    from tests.conftest import ingest_without_filtering

    rng = random.Random(5)
    vocabulary = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "si", "tu") for b in "bdgmnrst"]
    text = {k: " ".join(rng.choice(vocabulary) for _ in range(90)) + "." for k in ("T1", "T2", "T3", "T4")}
    words = text["T4"].split()
    near = " ".join(words[:45] + ["changed"] + words[46:])  # T4 with one word changed: Jaccard about 0.88
    shared, other, y, z = [i for i in (f"id-{n}" for n in range(100)) if split_of(i, 0.05) == "train"][:4]
    a, b = tmp_path / "a" / "docs.jsonl", tmp_path / "b" / "docs.jsonl"
    inputs = {a: [(shared, "T1"), (y, "T2"), (other, "T4")], b: [(shared, "T3"), (z, "T2"), (other, near)]}
    for path, docs in inputs.items():
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"id": i, "text": text.get(t, t)}) + "\n" for i, t in docs))
    benchmark = tmp_path / "benchmark.jsonl"
    benchmark.write_text(json.dumps({"text": " ".join(text["T3"].split()[30:50])}) + "\n")  # 20 words of T3
    overrides = {"storage.root": str(tmp_path / "out"), "ingest.inputs": [str(a), str(b)],
                 "tokenizer.vocab_size": 300, "evaluate.decontaminate_with": [str(benchmark)]}  # fmt: skip
    cfg = load_config("tiny", overrides)
    ingest_without_filtering(cfg)
    assert json.loads((out_dir("ingest", cfg) / STATS).read_text())["repeated_ids"] == 2
    deduped = PIPELINE.run("dedup", cfg, log=lambda _: None)
    assert deduped["removed"] == {"exact": 1, "near": 1}
    removed = pq.read_table(next((out_dir("dedup", cfg) / "removed").glob("*.parquet"))).to_pylist()
    kept = {(Path(d.source).parent.name, d.id): d.text for d in docs_in(out_dir("dedup", cfg))}
    assert kept == {
        ("a", shared): text["T1"], ("a", y): text["T2"], ("a", other): text["T4"], ("b", shared): text["T3"]
    }  # fmt: skip
    found = sorted((r["id"], r["kind"], r["shard"], r["row"], r["survivor_shard"], r["survivor_row"]) for r in removed)
    a_shard, b_shard = "part-0000-0000-00000.parquet", "part-0001-0000-00000.parquet"  # (one input file each)
    assert found == sorted([(other, "near", b_shard, 2, a_shard, 2), (z, "exact", b_shard, 1, a_shard, 1)])
    PIPELINE.run("tokenizer", cfg, log=lambda _: None)
    tokenized = PIPELINE.run("tokenize", cfg, log=lambda _: None)
    assert tokenized["docs"] == {"train": 4, "val": 0} and tokenized["removed"] == {"decontaminated": 1}
    tree = lineage.lineage(out_dir("tokenize", cfg).as_posix())
    ingested = tree["inputs"][0]
    while ingested["kind"] != "ingest":
        ingested = ingested["inputs"][0]
    assert sorted(ingested["raw_inputs"]) == [str(a), str(b)]
