"""The data stages on an existing Dask cluster (a LocalCluster of 2 worker processes): the same output as local
processes, with the units run by the cluster's workers; and the flow's tasks submitted there by prefect-dask."""

from __future__ import annotations

import json

import pytest

from stages.core.config import load_config
from stages.core.storage import MANIFEST
from stages.pipeline import PIPELINE
from tests.conftest import out_dir

STAGES = [stage.name for stage in PIPELINE.stages if stage.units]  # (filter with its cheap rules only)


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


def config(small_corpus, root, **overrides):
    return load_config(
        "tiny",
        {
            "storage.root": str(root),
            "ingest.inputs": [str(small_corpus["jsonl"])],
            "ingest.docs_per_shard": 100,
            "dedup.workers": 2,
            # where the units run is what is tested: the slow heuristic rules are off
            **{
                f"filter.{rule}.enabled": False
                for rule in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")
            },  # fmt: skip
            **overrides,
        },
    )


def units_run_by(cluster) -> set[str]:
    """Names of the functions the cluster's scheduler has run tasks of."""
    return set(cluster.scheduler.task_prefixes)


def test_data_stages_on_dask_match_local_processes(small_corpus, cluster, tmp_path):
    local = config(small_corpus, tmp_path / "local")
    remote = config(small_corpus, tmp_path / "dask", **{"cluster.dask_address": cluster.scheduler_address})
    for stage in STAGES:
        PIPELINE.run(stage, local, log=lambda _: None)
        PIPELINE.run(stage, remote, log=lambda _: None)
        manifests = [json.loads((out_dir(stage, c) / MANIFEST).read_text()) for c in (local, remote)]
        assert manifests[0]["files"] == manifests[1]["files"] and manifests[0]["counts"] == manifests[1]["counts"]
        assert manifests[0]["identity"] == manifests[1]["identity"]  # where it ran is not part of what it is
    assert "run_unit" in units_run_by(cluster)  # the units ran on the cluster


def test_flow_submits_data_stages_to_the_cluster_with_prefect_dask(small_corpus, cluster, tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pretrain import run_stages

    cfg = config(small_corpus, tmp_path, **{"cluster.dask_address": cluster.scheduler_address})

    @flow
    def first_stages_on_cluster():
        return run_stages(cfg, tuple(PIPELINE[name] for name in STAGES[:2]))  # (the second waits on the first)

    before = set(units_run_by(cluster))
    with prefect_test_harness(server_startup_timeout=60):
        stats = first_stages_on_cluster()
    for name in STAGES[:2]:
        assert stats[name]["docs_out"] > 0 and (out_dir(name, cfg) / MANIFEST).is_file()
    ran = units_run_by(cluster) - before
    # the Prefect tasks themselves ran on Dask workers (flows/pretrain.py), the second after the first's future
    assert {f"run_{name}" for name in STAGES[:2]} <= ran, ran


def test_ablation_proxy_runs_side_by_side_on_the_cluster(small_corpus, cluster, tmp_path):
    """stages/tools/ablate.py with cluster.dask_address: the proxy runs go to the cluster's workers, side by side,
    and give the numbers the same ablation gives one run after another (training is deterministic on CPU)."""
    from stages.tools import ablate

    def summary(root, **extra):
        overrides = {"storage.root": str(root), "ingest.inputs": [str(small_corpus["jsonl"])],
                     "ingest.docs_per_shard": 100, "train.nproc_per_node": 1, "train.max_steps": 3,
                     "train.checkpoint_every": 3, "train.val_every": 3, "train.micro_batch_size": 2,
                     "train.seq_len": 64, "evaluate.suite": None, "evaluate.every_steps": None,
                     "evaluate.max_docs": 8, "tokenizer.vocab_size": 1000, **extra}  # fmt: skip
        spec = {"variants": {"base": {}, "no-gopher": {"filter.gopher_quality.enabled": False}}, "seeds": [1, 2],
                "overrides": overrides, "heldout_docs": 8, "heldout_permille": 200}  # fmt: skip
        return ablate.run_plain(ablate.load(spec), log=lambda _: None)

    here = summary(tmp_path / "here")
    there = summary(tmp_path / "there", **{"cluster.dask_address": cluster.scheduler_address})
    assert "proxy_run" in units_run_by(cluster)
    for name in ("base", "no-gopher"):
        assert there["variants"][name]["per_seed"] == here["variants"][name]["per_seed"], name
