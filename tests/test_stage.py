"""The skeleton every stage shares (stages/core/stage.py), on the data stages of the sample slice: stats and
checksummed manifests, a rerun skipped and a config change rebuilt, an incomplete output rebuilt, output
independent of the worker count, and the dry-run plan."""

from __future__ import annotations

import json

import pytest

from stages.core import storage
from stages.core.storage import MANIFEST, STATS
from stages.pipeline import PIPELINE
from tests.conftest import out_dir


def test_stage_writes_stats_and_manifest_with_checksums(data_pipeline):
    cfg, root, stats = data_pipeline
    for stage in PIPELINE.dataset_part:
        folder = out_dir(stage.name, cfg)
        assert folder.parent.parent == root  # {root}/{stage}/{version}
        manifest = json.loads((folder / MANIFEST).read_text())
        for name, entry in manifest["files"].items():
            assert storage.file_digest(str(folder / name)) == entry
        assert json.loads((folder / STATS).read_text())["seconds"] >= 0


def test_rerun_skips_every_stage_and_config_change_rebuilds(data_pipeline):
    cfg, root, stats = data_pipeline
    manifest_before = (out_dir("dedup", cfg) / MANIFEST).read_text()
    for stage in PIPELINE.dataset_part:
        assert PIPELINE.run(stage.name, cfg, log=lambda _: None)["skipped"] is True
    assert (out_dir("dedup", cfg) / MANIFEST).read_text() == manifest_before
    changed = cfg.model_copy(deep=True)
    changed.dedup.threshold = 0.9
    assert PIPELINE.run("dedup", changed, log=lambda _: None)["skipped"] is False
    assert PIPELINE.run("tokenizer", changed, log=lambda _: None)["skipped"] is False  # its input changed
    # The new version lives beside the old one: switching back is free.
    assert out_dir("dedup", changed) != out_dir("dedup", cfg)
    assert out_dir("dedup", changed).parent == out_dir("dedup", cfg).parent
    assert (out_dir("dedup", cfg) / MANIFEST).read_text() == manifest_before
    assert PIPELINE.run("dedup", cfg, log=lambda _: None)["skipped"] is True
    # force: rebuilt in place, the same bytes
    lines: list[str] = []
    assert PIPELINE.run("dedup", cfg, log=lines.append, force=True)["skipped"] is False
    assert any("rebuilding (forced)" in line for line in lines)
    assert json.loads((out_dir("dedup", cfg) / MANIFEST).read_text())["files"] == json.loads(manifest_before)["files"]
    # A token (a flow run's id) forces once: the same token again, a retry of that flow run, keeps the rebuild.
    assert PIPELINE.run("dedup", cfg, log=lines.append, force="flow-run-1")["skipped"] is False
    assert PIPELINE.run("dedup", cfg, log=lines.append, force="flow-run-1")["skipped"] is True
    assert any("not forced again" in line for line in lines)
    assert PIPELINE.run("dedup", cfg, log=lines.append, force="flow-run-2")["skipped"] is False


def test_incomplete_output_is_rebuilt(data_pipeline):
    cfg, root, stats = data_pipeline
    (out_dir("filter", cfg) / MANIFEST).unlink()
    (out_dir("filter", cfg) / "garbage.tmp-1234").write_text("half a file")
    s = PIPELINE.run("filter", cfg, log=lambda _: None)
    assert s["skipped"] is False and not (out_dir("filter", cfg) / "garbage.tmp-1234").exists()
    assert s["docs_out"] == stats["filter"]["docs_out"]


def test_output_does_not_depend_on_worker_count(data_pipeline, tmp_path):
    cfg, root, stats = data_pipeline
    assert cfg.ingest.workers == cfg.filter.workers == 2
    serial = cfg.model_copy(deep=True)
    serial.storage.root = str(tmp_path)
    serial.ingest.workers = serial.filter.workers = 1
    for stage in ("ingest", "filter"):
        PIPELINE.run(stage, serial, log=lambda _: None)
        parallel_files = json.loads((out_dir(stage, cfg) / MANIFEST).read_text())["files"]
        serial_files = json.loads((out_dir(stage, serial) / MANIFEST).read_text())["files"]
        assert serial_files == parallel_files
    assert cfg.section_digest("ingest", "filter") == serial.section_digest("ingest", "filter")


def test_plan_says_what_would_run_and_why(data_pipeline):
    from stages.tools import plan

    cfg, root, stats = data_pipeline
    rows = {r["stage"]: r for r in plan.plan(cfg)}
    assert [rows[s.name]["action"] for s in PIPELINE.dataset_part] == ["skip"] * 5
    assert rows["tokenize"]["output"] == str(out_dir("tokenize", cfg))
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
