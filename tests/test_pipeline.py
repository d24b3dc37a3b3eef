"""The pipeline as data (stages/pipeline.py): the registry checks itself, it is the one place that lists the stages,
stage packages keep to the import rule, and a stage inserted into a copy of it is picked up by the plan, the flow
(a task with its dependency edges in Prefect) and the dataset ledger with no other edit."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from stages import pipeline
from stages.core import storage
from stages.core.config import load_config
from stages.core.stage import Build, Stage, StageResult, committed_shards, package_version
from stages.pipeline import PIPELINE, Pipeline
from tests.conftest import REPO, docs_in

STAGES = REPO / "stages"


def test_the_registry_lists_stages_in_order_with_inputs_from_earlier_stages():
    assert PIPELINE.names == ("ingest", "filter", "dedup", "tokenizer", "tokenize", "train", "evaluate")
    for i, stage in enumerate(PIPELINE.stages):
        assert set(stage.inputs.values()) <= set(PIPELINE.names[:i])
        assert stage.package == f"stages.{stage.name}"  # one package per stage, named for it
    assert [s.name for s in PIPELINE.dataset_part] == ["ingest", "filter", "dedup", "tokenizer", "tokenize"]
    assert PIPELINE.training_data == "tokenize" and [s.funnel for s in PIPELINE.funnel] == [
        "ingested", "filter", "dedup", "tokenized"
    ]  # fmt: skip


def test_the_registry_refuses_a_broken_pipeline():
    ingest, filter_ = PIPELINE["ingest"], PIPELINE["filter"]
    with pytest.raises(ValueError, match="two stages are named 'ingest'"):
        Pipeline((ingest, ingest), trains="ingest")
    with pytest.raises(ValueError, match="filter.docs reads 'dedup', which is not an earlier stage"):
        Pipeline((ingest, filter_.wired(docs="dedup"), PIPELINE["dedup"]), trains="ingest")
    with pytest.raises(ValueError, match=r"filter needs \['docs'\], wired \[\]"):
        Pipeline((ingest, filter_.wired()), trains="ingest")
    with pytest.raises(ValueError, match="dedup and filter share the folder filter"):
        Pipeline((ingest, filter_, replace(PIPELINE["dedup"], folder="filter").wired(docs="ingest")), trains="ingest")
    with pytest.raises(ValueError, match="'Filter' is not a stage name"):
        Pipeline((ingest, replace(filter_, name="Filter")), trains="ingest")
    with pytest.raises(ValueError, match="no stage named 'train' trains"):
        Pipeline((ingest,))
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['tokenise'\]"):
        PIPELINE.check_names(["tokenise"])


def stage_lists(path: Path) -> list[int]:
    """Lines of a tuple, list or set naming three or more stages (as strings or as module names): the order
    typed out again. Prose in docstrings is not code, and is left alone."""
    names = set(PIPELINE.names)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            named = [e.value if isinstance(e, ast.Constant) else getattr(e, "id", None) for e in node.elts]
            if sum(name in names for name in named) >= 3:
                found.append(node.lineno)
    return found


def test_no_other_file_lists_the_stages():
    listed = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if ".venv" in path.parts or path == STAGES / "pipeline.py" or path == Path(__file__):
            continue
        lines = path.read_text().splitlines()
        listed += [f"{path.relative_to(REPO)}:{n}: {lines[n - 1].strip()}" for n in stage_lists(path)]
    assert not listed, "the stage order is typed out again:\n" + "\n".join(listed)


def imports_of(path: Path) -> list[str]:
    """Every module a file imports, at its top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return found


def test_stage_packages_import_plumbing_and_libraries_never_another_stage_s_build():
    bad = []
    for path in sorted(STAGES.rglob("*.py")):
        package = path.relative_to(STAGES).parts[0]
        if package in ("pipeline.py", "tools", "__init__.py"):
            continue  # (the registry and the command-line tools may import any stage)
        for module in imports_of(path):
            if module.startswith("prefect"):
                bad.append(f"{path}: {module} (stages/ never imports Prefect)")
            if not module.startswith("stages."):
                continue
            other = module.split(".")[1]
            if package == "core" and other != "core":
                bad.append(f"{path}: {module} (shared plumbing imports no stage)")
            elif other in ("pipeline", "tools"):
                bad.append(f"{path}: {module} (a stage never imports the registry or a tool)")
            elif other not in (package, "core") and module.split(".")[2:3] == ["stage"]:
                bad.append(f"{path}: {module} (another stage's build)")
    assert not bad, "\n".join(bad)


def test_ruff_refuses_prefect_in_stages():
    import subprocess
    import sys

    source = '"""A probe."""\n\nfrom prefect.artifacts import create_table_artifact\n\nprint(create_table_artifact)\n'
    check = [sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename"]
    inside = subprocess.run([*check, str(STAGES / "core" / "probe.py"), "-"], input=source, capture_output=True,
                            text=True, cwd=REPO)  # fmt: skip
    assert inside.returncode == 1 and "TID251" in inside.stdout and "Prefect" in inside.stdout, inside.stdout
    outside = subprocess.run([*check, str(REPO / "flows" / "probe.py"), "-"], input=source, capture_output=True,
                             text=True, cwd=REPO)  # fmt: skip
    assert outside.returncode == 0, outside.stdout  # (the flows are where Prefect belongs)


def test_a_stage_s_code_version_is_its_package_s_source():
    versions = {stage.name: stage.code_version() for stage in PIPELINE.stages}
    assert len(set(versions.values())) == len(versions)  # each its own package
    assert PIPELINE["ingest"].code_version() == package_version("stages.ingest")
    # dedup's includes the banding arithmetic it shares with the config; train's leaves out its cost estimate
    # (its browser, which only reads its output, is left out: as the filter's)
    dedup_version = package_version("stages.dedup", ("stages.core.banding",), ("browse.py",))
    assert PIPELINE["dedup"].code_version() == dedup_version
    assert PIPELINE["dedup"].code_version() != package_version("stages.dedup", (), ("browse.py",))
    assert PIPELINE["filter"].code_version() == package_version("stages.filter", (), ("browse.py",))
    assert PIPELINE["train"].code_version() == package_version("stages.train", (), ("budget.py", "report.py"))
    with pytest.raises(ValueError, match=r"code_exclude names \['gone.py'\]"):
        package_version("stages.train", (), ("gone.py",))


# ---------------------------------------------------------------------------------------------------------------
# a stage inserted into a copy of the pipeline


def passthrough(b: Build) -> StageResult:
    """Its input's document shards, unchanged: the smallest stage a user could add."""
    docs = b.inputs["docs"]
    shards = committed_shards(docs)
    for name in shards:
        with storage.open_uri(docs.path(name), "rb", b.cfg.storage) as src:
            with storage.atomic_write(b.out.path(name), b.cfg.storage) as dst:
                dst.write(src.read())
    counts = docs.manifest()["counts"]
    core = {"docs_in": counts["docs_out"], "docs_out": counts["docs_out"], "bytes_in": counts["bytes_out"],
            "bytes_out": counts["bytes_out"], "removed": {}}  # fmt: skip
    return StageResult(shards, core)


PASSTHROUGH = Stage(
    name="passthrough",
    folder="passthrough",
    package=__name__,
    sections=("dedup",),
    build=passthrough,
    needs=("docs",),
    funnel="passed through",
)


def small_overrides(small_corpus, root) -> dict:
    """The small corpus through cheap rules only: what is tested is which stages run, not what they remove."""
    cheap = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")
    return {
        "storage.root": str(root),
        "ingest.inputs": [str(small_corpus["jsonl"])],
        "ingest.docs_per_shard": 100,
        "tokenizer.vocab_size": 500,
        **{f"filter.{rule}.enabled": False for rule in cheap},
    }


def test_a_stage_inserted_after_dedup_is_planned_run_with_its_edges_and_recorded(small_corpus, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.testing.utilities import prefect_test_harness

    from flows.refresh import data_refresh
    from stages.tools import ledger, plan

    extended = PIPELINE.inserted(PASSTHROUGH.wired(docs="dedup"), after="dedup")
    assert extended.names[3] == "passthrough" and extended["tokenizer"].inputs == {"docs": "passthrough"}
    assert extended["tokenize"].inputs == {"docs": "passthrough", "tokenizer": "tokenizer"}
    monkeypatch.setattr(pipeline, "PIPELINE", extended)
    overrides = small_overrides(small_corpus, tmp_path)
    cfg = load_config("tiny", overrides)

    rows = plan.plan(cfg)
    assert [r["stage"] for r in rows][:5] == ["ingest", "filter", "dedup", "passthrough", "tokenizer"]
    assert rows[3]["reason"] == rows[4]["reason"] == "after ingest, unless its output comes out unchanged"

    with prefect_test_harness(server_startup_timeout=60):
        stats = data_refresh(overrides=overrides)
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_runs(limit=1)[0]
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
    by_name = {run.name.rsplit("-", 1)[0]: run for run in task_runs}
    assert set(by_name) == set(extended.names[:6])  # one task per stage of the dataset part
    waited = {name: {i.id for i in run.task_inputs.get("wait_for", [])} for name, run in by_name.items()}
    assert waited["passthrough"] == {by_name["dedup"].id}  # the graph's edges are the registry's
    assert waited["tokenize"] == {by_name["passthrough"].id, by_name["tokenizer"].id}

    passed, deduped = (Path(extended.output(name, cfg).uri) for name in ("passthrough", "dedup"))
    assert stats["passthrough"]["docs_out"] == stats["dedup"]["docs_out"] > 0
    assert [d.id for d in docs_in(passed)] == [d.id for d in docs_in(deduped)]
    tokenizer_manifest = extended.output("tokenizer", cfg).manifest()
    passed_manifest = storage.read_json(str(passed / storage.MANIFEST))
    assert tokenizer_manifest["identity"]["inputs"]["docs"] == passed_manifest["digest"]  # it read the new stage
    version = ledger.latest(cfg)
    assert version["parts"][0]["passthrough"] == str(passed)
    assert [r["action"] for r in plan.plan(cfg)][:6] == ["skip"] * 6
