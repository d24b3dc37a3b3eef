"""Shared fixtures: a small slice of the bundled sample corpus, free ports and a local S3 endpoint."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.core import storage
from stages.core.documents import read_docs
from stages.core.storage import MANIFEST
from stages.pipeline import PIPELINE

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
BIN = Path(sys.executable).parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def docs_in(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    shards = [name for name in sorted(manifest["files"]) if "/" not in name and name.endswith(".parquet")]
    return [d for name in shards for d in read_docs(str(folder / name))]


def out_dir(stage: str, cfg) -> Path:
    """The local folder of a stage's output for `cfg` (its versioned path)."""
    return Path(PIPELINE.output(stage, cfg).uri)


def ingest_without_filtering(cfg) -> None:
    """Ingest, then commit the ingested shards as the filter stage's output, bypassing its heuristics."""
    PIPELINE.run("ingest", cfg, log=lambda _: None)
    ingested, filter_out = PIPELINE.output("ingest", cfg), PIPELINE.output("filter", cfg)
    files = [n for n in ingested.manifest()["files"] if n.endswith(".parquet")]
    for name in files:
        with storage.atomic_write(filter_out.path(name)) as f:
            f.write(Path(ingested.path(name)).read_bytes())
    # (the ingest digest as its input: lineage follows it)
    filter_out.commit({"bypassed": True, "inputs": {"docs": ingested.manifest()["digest"]}}, {}, {}, files)


def wait_for_port(port: int, seconds: float) -> None:
    """Until something listens on the loopback port (a server just started), or the time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Test files by how long they take in `make test` (longest first), the rest after them in their own order.
LONGEST_FIRST = ("test_e2e.py", "test_train.py", "test_pipeline.py", "test_resume.py", "test_filter.py", "test_dask.py")


def pytest_collection_modifyitems(items):
    """The longest files first (a stable sort: the order within files is kept). With two test processes (`make
    test`) handing out whole files, one left to start last would run alone at the end."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """The first records of each sample file, in the same three formats."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    out = tmp_path_factory.mktemp("small_corpus")
    with gzip.open(SAMPLE / "docs.jsonl.gz", "rt") as src, gzip.open(out / "docs.jsonl.gz", "wt") as dst:
        dst.writelines(itertools.islice(src, 400))
    table = pq.read_table(SAMPLE / "reference.parquet")
    pq.write_table(table.slice(0, 150), out / "reference.parquet")
    with open(SAMPLE / "web.warc.gz", "rb") as src, open(out / "web.warc.gz", "wb") as dst:
        writer = WARCWriter(dst, gzip=True)
        for record in itertools.islice((r for r in ArchiveIterator(src) if r.rec_type == "response"), 60):
            writer.write_record(record)
    return {"jsonl": out / "docs.jsonl.gz", "parquet": out / "reference.parquet", "warc": out / "web.warc.gz"}


@pytest.fixture(scope="session")
def data_pipeline(small_corpus, tmp_path_factory):
    """The data stages (a dataset part: stages/pipeline.py) run once on the small corpus, in one output root: the
    config, the root and each stage's stats. Tests read it and may add outputs beside it, never change it."""
    from stages.core.config import load_config

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
    stats = {stage.name: PIPELINE.run(stage.name, cfg, log=lambda _: None) for stage in PIPELINE.dataset_part}
    return cfg, root, stats


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint over HTTP (moto server) on a free loopback port, with one bucket."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_port(port, 30)
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    yield {"endpoint": endpoint, "bucket": bucket, "client": client, "port": port, "env": credentials}
    proc.terminate()
    proc.wait(timeout=10)
