"""A data stage killed with SIGKILL and rerun ends with output identical to an uninterrupted run, and the rerun
skips the units (input files, shards) that had finished before the kill."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from stages.core import storage
from stages.core.config import load_config
from stages.core.stage import PROGRESS
from stages.core.storage import MANIFEST
from stages.pipeline import PIPELINE
from tests.conftest import REPO, free_port, out_dir

RUN_STAGE = """
import sys
from stages.pipeline import PIPELINE
from stages.core.config import PipelineConfig
cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
PIPELINE.run(sys.argv[2], cfg, log=lambda _: None)
"""
STAGES = [stage.name for stage in PIPELINE.stages if stage.units]  # (those whose work splits into units)


def config(small_corpus, root):
    return load_config(
        "tiny",
        {
            "storage.root": str(root),
            "ingest.inputs": [str(p) for p in small_corpus.values()],
            "ingest.docs_per_shard": 100,
            "ingest.slice_bytes": 100_000,  # (the WARC file in slices: a slice's resume)
            "ingest.workers": 1,
            "filter.workers": 1,
            "dedup.workers": 1,
            "dedup.verify": True,
        },
    )


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = config(small_corpus, root)
    return root, {name: PIPELINE.run(name, cfg, log=lambda _: None) for name in STAGES}


def markers(folder) -> int:
    return len([p for p in (folder / PROGRESS).glob("*.json") if p.name not in ("identity.json", "repeated-ids.json")])


@pytest.mark.parametrize(
    "stage, after_units, then_wait",
    [
        ("ingest", 1, 0.0),
        ("ingest", 1, 0.05),  # (in the middle of another file: extraction takes milliseconds a page)
        ("ingest", 5, 0.0),  # (both plans, two files and the first of the WARC file's slices done, not the others)
        ("filter", 1, 0.0),
        ("filter", 3, 0.2),
        ("dedup", 1, 0.0),  # among the signature units
        ("dedup", 6, 0.0),  # among the bucket units
        ("dedup", 18, 0.0),  # verification or writing
    ],
)
def test_sigkilled_stage_resumes_to_identical_output(reference, small_corpus, tmp_path, stage, after_units, then_wait):
    ref_root, ref_stats = reference
    cfg = config(small_corpus, tmp_path)
    for upstream in PIPELINE.ancestors(stage):
        shutil.copytree(ref_root / upstream.folder, tmp_path / upstream.folder)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    folder, ref_folder = out_dir(stage, cfg), out_dir(stage, config(small_corpus, ref_root))
    proc = subprocess.Popen([sys.executable, "-c", RUN_STAGE, str(cfg_file), stage], cwd=REPO)
    deadline = time.monotonic() + 120
    while markers(folder) < after_units and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(then_wait)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    assert not (folder / MANIFEST).exists()
    done_before = markers(folder)
    assert done_before >= after_units

    stats = PIPELINE.run(stage, cfg, log=lambda _: None)
    assert stats["units_resumed"] == done_before
    manifest = json.loads((folder / MANIFEST).read_text())
    expected = json.loads((ref_folder / MANIFEST).read_text())
    assert manifest["files"] == expected["files"]  # same names, sizes and sha256: byte-identical output
    assert manifest["counts"] == expected["counts"]
    assert not list(folder.rglob("*.tmp-*"))


class CuttableProxy:
    """A TCP forwarder in front of the S3 endpoint. `cut()` drops every connection and refuses new ones (the
    endpoint gone, as far as a client can tell, while the server behind keeps its objects); `restore()` listens
    on the same port again. `delay` slows each forwarded chunk so a small stage spans the cut."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.port, self.target, self.delay = free_port(), target_port, delay
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        self.listening = threading.Event()
        self.restore()

    def restore(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))  # (SO_REUSEADDR: the port is free again at once)
        server.settimeout(0.1)
        self.listening.set()
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        self.listening.clear()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.open = []

    def _accept(self, server: socket.socket) -> None:
        with server:
            while self.listening.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.open += [client, upstream]
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                time.sleep(self.delay)
                dst.sendall(data)
        for conn in (src, dst):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def test_s3_outage_mid_stage_fails_clearly_and_a_rerun_completes(reference, small_corpus, s3_endpoint):
    ref_root, _ = reference
    proxy = CuttableProxy(s3_endpoint["port"], delay=0.02)
    bucket, key = s3_endpoint["bucket"], f"outage-{uuid.uuid4().hex[:8]}"
    cfg = config(small_corpus, f"s3://{bucket}/{key}")
    cfg.storage.endpoint_url = proxy.url
    cfg.storage.access_key_id = cfg.storage.secret_access_key = "testing"
    cfg_file = Path(tempfile.mkdtemp()) / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_STAGE, str(cfg_file), "ingest"], cwd=REPO, stderr=subprocess.PIPE, text=True
    )

    def units_done() -> int:  # completion markers on S3, read behind the proxy's back
        listed = s3_endpoint["client"].list_objects_v2(Bucket=bucket, Prefix=f"{key}/ingest/").get("Contents", [])
        return sum(f"/{PROGRESS}/" in o["Key"] and not o["Key"].endswith("identity.json") for o in listed)

    deadline = time.monotonic() + 120
    while units_done() < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.cut()
    cut_at = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None), "the stage finished before the endpoint went away"
    assert time.monotonic() - cut_at < 120, "retries must be bounded"
    assert f"ingest: the S3 endpoint {proxy.url} stopped answering" in err, err[-3000:]
    done_before = units_done()
    assert 1 <= done_before < 3  # (three input files: three units)

    proxy.restore()
    stats = PIPELINE.run("ingest", cfg, log=lambda _: None)
    assert stats["units_resumed"] == done_before
    written = storage.read_json(storage.join(stats["output"], MANIFEST), cfg.storage)
    expected = json.loads((out_dir("ingest", config(small_corpus, ref_root)) / MANIFEST).read_text())
    assert written["files"] == expected["files"] and written["counts"] == expected["counts"]
    proxy.cut()


def test_failpoint_holds_only_while_triggered(tmp_path, monkeypatch):
    """A failpoint is a no-op without its trigger file; with it, the process says it got there and waits until the
    trigger is gone (what the e2e kill test uses to kill a flow run inside a stage that is over in milliseconds)."""
    from stages.core import failpoints

    monkeypatch.setenv(failpoints.ENV, str(tmp_path))
    failpoints.hold("tokenizer.commit")  # no trigger: returns at once
    assert not list(tmp_path.iterdir())
    (tmp_path / "tokenizer.commit").touch()
    held = threading.Thread(target=failpoints.hold, args=("tokenizer.commit",))
    held.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "tokenizer.commit.reached").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)
    assert held.is_alive()  # still waiting
    (tmp_path / "tokenizer.commit").unlink()
    held.join(timeout=5)
    assert not held.is_alive()
