"""Config: presets load, overrides apply, and every kind of mistake fails naming the file and the field."""

import pytest

from stages.config import REPO_ROOT, ConfigError, load_config, parse_overrides
from stages.preflight import preflight


def test_presets_load_with_paths_resolved():
    for preset in ("tiny", "tiny-s3"):
        cfg = load_config(preset)
        assert cfg.name == preset
        assert all(p.startswith(str(REPO_ROOT)) for p in cfg.ingest.inputs)


def test_overrides_from_dict_and_strings():
    cfg = load_config("tiny", {"train.max_steps": 7, "dedup.threshold": 0.9})
    assert (cfg.train.max_steps, cfg.dedup.threshold) == (7, 0.9)
    cfg = load_config("tiny", ["train.max_steps=11", "filter.languages=[en, de]", "tokenizer.path=null"])
    assert cfg.train.max_steps == 11 and cfg.filter.languages == ["en", "de"] and cfg.tokenizer.path is None
    assert parse_overrides(["a.b=true"]) == {"a.b": True}


@pytest.mark.parametrize(
    "overrides, field, problem",
    [
        ({"train.lr_max": 1.0}, "train.lr_max", "Extra inputs are not permitted"),
        ({"train.max_steps": "many"}, "train.max_steps", "valid integer"),
        ({"model.n_heads": 3}, "model", "not divisible"),
        ({"dedup.threshold": 1.5}, "dedup.threshold", "less than 1"),
        ({"nonsense": 1}, "nonsense", "Extra inputs"),
        ({"refresh.schedule": "61 3 * * *"}, "refresh.schedule", "not a cron expression: '61 3 * * *'"),
        ({"dedup.against": ["x"], "dedup.index": "redis"}, "dedup", "against needs index: tables"),
    ],
)
def test_bad_config_names_file_and_field(overrides, field, problem):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert "config/tiny.yaml" in message and f": {field}" in message and problem in message


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config preset"):
        load_config("does-not-exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_preflight_rejects_missing_inputs_before_work(tmp_path):
    cfg = load_config(
        "tiny", {"ingest.inputs": [str(tmp_path / "nowhere" / "*.jsonl")], "storage.root": str(tmp_path / "out")}
    )
    with pytest.raises(ConfigError, match=r"ingest.inputs: .*nowhere.* matches no file"):
        preflight(cfg)
    assert not (tmp_path / "out").exists()
    cfg = load_config("tiny", {"filter.lid_model_path": str(tmp_path / "lid.ftz")})
    with pytest.raises(ConfigError, match="filter.lid_model_path"):
        preflight(cfg)


def test_preflight_names_unreachable_endpoint_and_missing_bucket(s3_endpoint):
    dead = load_config("tiny-s3", {"storage.endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(ConfigError, match="storage.endpoint_url: cannot reach the S3 endpoint http://127.0.0.1:9"):
        preflight(dead)
    missing = load_config(
        "tiny-s3", {"storage.endpoint_url": s3_endpoint["endpoint"], "storage.root": "s3://no-such-bucket/x"}
    )
    with pytest.raises(ConfigError, match="storage.root: bucket 'no-such-bucket' does not exist at http"):
        preflight(missing)
