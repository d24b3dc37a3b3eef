"""A data stage killed with SIGKILL and rerun ends with output identical to an uninterrupted run, and the rerun
skips the units (input files, shards) that had finished before the kill."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from stages import dedup, filter, ingest
from stages.config import load_config
from stages.stage import PROGRESS
from stages.storage import MANIFEST
from tests.conftest import REPO, out_dir

RUN_STAGE = """
import sys
from stages import dedup, filter, ingest
from stages.config import PipelineConfig
cfg = PipelineConfig.model_validate_json(open(sys.argv[1]).read())
{"ingest": ingest, "filter": filter, "dedup": dedup}[sys.argv[2]].run(cfg, log=lambda _: None)
"""
STAGES = {"ingest": ingest, "filter": filter, "dedup": dedup}
UPSTREAM = {"ingest": [], "filter": ["ingest"], "dedup": ["ingest", "filter"]}


def config(small_corpus, root):
    return load_config(
        "tiny",
        {
            "storage.root": str(root),
            "ingest.inputs": [str(p) for p in small_corpus.values()],
            "ingest.docs_per_shard": 100,
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
    return root, {name: stage.run(cfg, log=lambda _: None) for name, stage in STAGES.items()}


def markers(folder) -> int:
    return len([p for p in (folder / PROGRESS).glob("*.json") if p.name != "identity.json"])


@pytest.mark.parametrize(
    "stage, after_units, then_wait",
    [
        ("ingest", 1, 0.0),
        ("ingest", 1, 0.4),
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
    for upstream in UPSTREAM[stage]:
        shutil.copytree(ref_root / upstream, tmp_path / upstream)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.to_json())
    folder, ref_folder = out_dir(STAGES[stage], cfg), out_dir(STAGES[stage], config(small_corpus, ref_root))
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

    stats = STAGES[stage].run(cfg, log=lambda _: None)
    assert stats["units_resumed"] == done_before
    manifest = json.loads((folder / MANIFEST).read_text())
    expected = json.loads((ref_folder / MANIFEST).read_text())
    assert manifest["files"] == expected["files"]  # same names, sizes and sha256: byte-identical output
    assert manifest["counts"] == expected["counts"]
    assert not list(folder.rglob("*.tmp-*"))
