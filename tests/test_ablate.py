"""stages/tools/ablate.py without Prefect: what a variant may change, the held-out set, the verdict against the seed
spread, and a whole (tiny) ablation run in plain Python; the run through the server is in tests/test_e2e.py."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from stages.core.config import ConfigError
from stages.tools import ablate


def test_a_variant_changes_the_data_only_and_every_config_is_checked_first(tmp_path):
    with pytest.raises(ValidationError, match=r"variant wide: model.dim: a variant changes the data"):
        ablate.Spec.model_validate({"variants": {"base": {}, "wide": {"model.dim": 256}}})
    with pytest.raises(ConfigError, match=r"variant keys: storage.secret_access_key: a variant changes the data") as e:
        ablate.load({"variants": {"keys": {"storage.secret_access_key": "Never-Echoed/7f3a"}}})
    assert "Never-Echoed" not in str(e.value)  # (a value given is never repeated: it may be a credential)
    with pytest.raises(ValidationError, match="at least 2 items"):
        ablate.Spec.model_validate({"variants": {"base": {}}, "seeds": [1]})
    with pytest.raises(ValidationError, match="each seed once"):
        ablate.Spec.model_validate({"variants": {"base": {}}, "seeds": [3, 3]})
    with pytest.raises(ValidationError, match="names are letters"):
        ablate.Spec.model_validate({"variants": {"a b": {}}})
    spec = {"variants": {"base": {}, "typo": {"filter.gopher_quality.enabld": False}},
            "overrides": {"storage.root": str(tmp_path)}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"(?s)variant typo: .*gopher_quality.enabld: unknown field"):
        ablate.load(spec)


def summary_of(scores: dict[str, list[float]]) -> dict:
    return {name: {"bits_per_byte": ablate._spread(values)} for name, values in scores.items()}


def test_verdict_sets_each_difference_against_the_seed_spread():
    text = ablate.verdict("base", summary_of({"base": [1.50, 1.52], "clean": [1.40, 1.41], "noisy": [1.51, 1.53]}))
    assert "clean is better than base by 0.1050 bits_per_byte, more than the seed spread (0.0200)" in text
    assert "noisy vs base: +0.0100 bits_per_byte, within the seed spread (0.0200)" in text


def test_plain_ablation_shares_stages_and_holds_out_one_set(tmp_path):
    """Two variants of the tiny preset, two seeds, a few steps each, through `run_plain`."""
    overrides = {"storage.root": str(tmp_path), "train.nproc_per_node": 1, "train.max_steps": 4,
                 "train.checkpoint_every": 4, "train.val_every": 4, "evaluate.suite": None,
                 "evaluate.every_steps": None, "evaluate.max_docs": 20, "train.micro_batch_size": 4}  # fmt: skip
    spec = {"variants": {"base": {}, "looser-dedup": {"dedup.bands": 10}}, "seeds": [1, 2], "overrides": overrides}
    lines: list[str] = []
    summary = ablate.run_plain(ablate.load(spec), log=lines.append)
    base, other = summary["variants"]["base"], summary["variants"]["looser-dedup"]
    assert base["per_seed"].keys() == {1, 2} and base["per_seed"][1] != base["per_seed"][2]
    assert base["seconds"]["ingest"] == other["seconds"]["ingest"]  # one ingest output: built once, then skipped
    assert sum("ingest: up to date" in line for line in lines) >= 1
    saved = json.loads((tmp_path / "ablations" / summary["uri"].rsplit("/", 1)[1] / "results.json").read_text())
    assert saved["verdict"] == summary["verdict"] and len(saved["variants"]["base"]["lineage"]) == 2
    heldout = open(summary["heldout"]).read().splitlines()
    assert 4 <= len(heldout) <= 100
    rows = ablate.table(summary)
    assert [r["variant"] for r in rows] == ["base", "looser-dedup"] and rows[1]["overrides"] == '{"dedup.bands": 10}'
    assert summary["png"].startswith(b"\x89PNG") and open(summary["plot_uri"], "rb").read() == summary["png"]
