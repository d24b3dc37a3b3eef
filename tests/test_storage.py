"""The URI layer: the same calls on a local folder and on a real S3 endpoint (moto server over HTTP)."""

import socket
import subprocess
import sys

import pytest

from stages.core import storage
from stages.core.config import StorageConfig
from tests.conftest import REPO


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_endpoint):
    if request.param == "local":
        return str(tmp_path), None
    cfg = StorageConfig(
        root=f"s3://{s3_endpoint['bucket']}/t",
        endpoint_url=s3_endpoint["endpoint"],
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    return f"s3://{s3_endpoint['bucket']}/{request.node.name.replace('[', '-').rstrip(']')}", cfg


def test_write_read_expand_remove(root):
    base, cfg = root
    for name in ("a/x.jsonl", "a/y.jsonl", "a/z.parquet"):
        with storage.atomic_write(storage.join(base, name), cfg) as f:
            f.write(name.encode())
    assert [u.rsplit("/", 1)[1] for u in storage.expand(storage.join(base, "a/*.jsonl"), cfg)] == ["x.jsonl", "y.jsonl"]
    assert len(storage.expand(storage.join(base, "a"), cfg)) == 3
    with storage.open_uri(storage.join(base, "a/z.parquet"), "rb", cfg) as f:
        assert f.read() == b"a/z.parquet"
    storage.write_json(storage.join(base, "m.json"), {"k": 1}, cfg)
    assert storage.read_json(storage.join(base, "m.json"), cfg) == {"k": 1}
    assert storage.raw_fingerprint(storage.join(base, "a/x.jsonl"), cfg) != storage.raw_fingerprint(
        storage.join(base, "a/y.jsonl"), cfg
    )
    storage.remove(storage.join(base, "a"), cfg)
    assert storage.expand(storage.join(base, "a/*"), cfg) == []


def test_failed_local_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_written_last_and_decides_skipping(root):
    base, cfg = root
    out = storage.StageOutput("demo", storage.join(base, "demo"), cfg)
    assert not out.is_current({"v": 1})
    with storage.atomic_write(out.path("part-0.bin"), cfg) as f:
        f.write(b"data")
    assert not out.is_current({"v": 1})  # data without a manifest is not done
    manifest = out.commit({"v": 1}, {"n": 1}, {"seconds": 0}, ["part-0.bin"])
    assert manifest["files"]["part-0.bin"]["bytes"] == 4
    assert out.is_current({"v": 1}) and not out.is_current({"v": 2})


def test_stack_refuses_a_port_held_by_another_program(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, str(REPO / "infra" / "stack.py"), "up", "--state", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use by another program" in proc.stderr
