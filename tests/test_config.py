"""Config: presets load, overrides apply, and every kind of mistake fails naming the file and the field, without
ever echoing a credential; a preset never names a file outside the allowed places."""

import logging
import os
import subprocess
import sys
import traceback

import pytest
import yaml

from stages.core.config import MODEL_PRESET_DIR, PRESET_DIR, REPO_ROOT, ConfigError, load_config, parse_overrides
from stages.core.presets import CONFIG_PATH_ENV
from stages.tools.preflight import preflight


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
        ({"train.lr_max": 1.0}, "train.lr_max", "unknown field (expected one of: activation_checkpointing,"),
        ({"train.max_stpes": 5}, "train.max_stpes", "did you mean 'max_steps'?"),
        ({"train.max_steps": "many"}, "train.max_steps", "valid integer (override, got 'many')"),
        ({"train.max_steps": "10"}, "train.max_steps", "valid integer"),  # strict numbers: no string
        ({"ingest.docs_per_shard": True}, "ingest.docs_per_shard", "valid integer (override, got True)"),
        ({"train.lr": False}, "train.lr", "valid number"),
        ({"model.n_heads": 3}, "model", "not divisible"),
        ({"dedup.threshold": 1.5}, "dedup.threshold", "less than 1"),
        ({"nonsense": 1}, "nonsense", "unknown field (expected one of: budget, cluster,"),
        ({"extra.section.deep": 1}, "extra", "unknown field (expected one of: budget"),
        ({"dedup.bands": 1, "dedup.rows": 8, "dedup.threshold": 0.8}, "dedup", "found from a similarity of about 0.91"),
        ({"dedup.bands": 1, "dedup.rows": 8, "dedup.threshold": 0.95, "dedup.verify": True}, "dedup", "probability"),
        ({"refresh.schedule": "61 3 * * *"}, "refresh.schedule", "not a cron expression: '61 3 * * *'"),
        ({"dedup.against": ["x"], "dedup.index": "redis"}, "dedup", "against needs index: tables"),
    ],
)
def test_bad_config_names_file_and_field(overrides, field, problem):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    message = str(err.value)
    assert "config/tiny.yaml" in message and f": {field}: " in message and problem in message
    assert "(override" in message and "(preset" not in message  # every one of them came from an override


def test_yaml_numbers_and_the_banding_a_threshold_chose(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path))
    preset = tmp_path / "p.yaml"
    preset.write_text("ingest: {inputs: [x]}\ntrain: {lr: 3e-4, min_lr: 1E-5}\ndedup: {threshold: 0.9}\n")
    cfg = load_config(preset)
    assert (cfg.train.lr, cfg.train.min_lr) == (3e-4, 1e-5)  # YAML 1.1 would have read the strings '3e-4', '1E-5'
    assert parse_overrides(["train.lr=2e-3"]) == {"train.lr": 2e-3}
    from stages.core.banding import Banding

    chosen = Banding.from_config(cfg.dedup)
    assert chosen.num_perm <= 112 and abs(chosen.half_point - 0.9) <= 0.05
    assert "bands x" in chosen.describe() and "about 0.9" in chosen.describe()


def test_unknown_preset_and_bad_yaml(tmp_path, monkeypatch):
    known = r"\(known in .*: continue-hf, tiny, tiny-s3\)"
    with pytest.raises(ConfigError, match=r"config preset 'does-not-exist': no such file .*" + known):
        load_config("does-not-exist")
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ningest: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML: line 3, column 1: expected ','"):
        load_config(bad)


def test_a_preset_is_a_name_in_config_or_a_path_in_an_allowed_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_PATH_ENV, raising=False)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "private.yaml").write_text("ingest: {inputs: [x]}\n")
    escapes = ["../../" + str(outside.relative_to("/")) + "/private", str(outside / "private.yaml"),
               f"{PRESET_DIR}/../../{outside.relative_to('/')}/private.yaml", "/etc/passwd", "tiny/../tiny", ".."]
    for preset in escapes:
        with pytest.raises(ConfigError, match="config preset .*(allowed places|a YAML file inside)") as err:
            load_config(preset)
        assert str(PRESET_DIR) in str(err.value) and CONFIG_PATH_ENV in str(err.value)
    # the operator allows a directory: its YAML files load by path, symlinks out of it do not
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "mine.yaml").write_text("name: mine\ningest: {inputs: [x]}\n")
    (allowed / "link.yaml").symlink_to(outside / "private.yaml")
    monkeypatch.setenv(CONFIG_PATH_ENV, f"{tmp_path / 'nonexistent'}{os.pathsep}{allowed}")
    assert load_config(allowed / "mine.yaml").name == "mine"
    with pytest.raises(ConfigError, match="outside the allowed places"):
        load_config(allowed / "link.yaml")
    assert load_config("tiny.yaml").name == "tiny"  # a name, with or without its suffix
    # model presets: the same rule, with config/models/
    for model_preset in ("../tiny", str(outside / "private.yaml"), "/etc/passwd"):
        with pytest.raises(ConfigError, match=r"model.preset .*(allowed places|a YAML file inside)"):
            load_config("tiny", {"model.preset": model_preset})
    (allowed / "wide.yaml").write_text("dim: 256\nn_layers: 3\nn_heads: 4\n")
    assert load_config("tiny", {"model.preset": str(allowed / "wide.yaml")}).model.n_layers == 3


def test_a_model_preset_chosen_by_override_is_that_preset(tmp_path, monkeypatch):
    llama = yaml.safe_load((MODEL_PRESET_DIR / "llama-1b.yaml").read_text())
    model = load_config("tiny", {"model.preset": "llama-1b"}).model
    assert {k: getattr(model, k) for k in llama} == llama  # not tiny's dim 128 and 2 layers
    model = load_config("tiny", {"model.preset": "llama-1b", "model.n_layers": 4}).model
    assert (model.dim, model.n_layers, model.ffn_hidden_dim) == (2048, 4, 8192)  # fields the overrides name win
    # in the file, fields beside the preset win (tests/test_scaling.py); an override of one field keeps the preset
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path))
    (tmp_path / "p.yaml").write_text("ingest: {inputs: [x]}\nmodel: {preset: llama-1b, n_layers: 2}\n")
    model = load_config(tmp_path / "p.yaml", {"model.dim": 1024}).model
    assert (model.dim, model.n_layers, model.n_heads) == (1024, 2, 32)
    from stages.train.scaling import model_shape

    assert model_shape(model) == "preset llama-1b: dim 1024, 2 layers, 32 heads, 8 KV heads, feed-forward 8192"


def test_storage_root_that_is_a_file_fails_at_load(tmp_path):
    (tmp_path / "afile").write_text("x")
    for root in (tmp_path / "afile", tmp_path / "afile" / "below"):
        with pytest.raises(ConfigError, match=rf"storage.root: {tmp_path / 'afile'} is a file, not a folder"):
            load_config("tiny", {"storage.root": str(root)})
    assert load_config("tiny", {"storage.root": str(tmp_path / "new" / "dir")}).storage.root.endswith("new/dir")


SECRET = "Zq9xSECRETv7f3e1a"  # distinctive: found in any output it reaches
NUMERIC_SECRET = 918273645546


def secret_errors(tmp_path):
    """(what, preset file text or None, overrides): every way a user can put a secret into a failing config."""
    s = SECRET
    return [
        ("typo under storage", f"storage: {{secret_key: {s}}}", None),
        ("block and both keys", f"storage: {{credentials_block: b, access_key_id: {s}, secret_access_key: {s}}}", None),
        ("typo by override", None, {"storage.secret_acess_key": s}),
        ("typo by string override", None, [f"storage.secret_acess_key={s}"]),
        ("numeric secret", None, [f"storage.secret_acess_key={NUMERIC_SECRET}"]),
        ("numeric key of the wrong type", None, {"storage.access_key_id": NUMERIC_SECRET}),
        ("a key of the wrong type", None, {"storage.secret_access_key": [s]}),
        ("override without =", None, [f"storage.secret_access_key:{s}"]),
        ("unknown top-level key", f"aws_secret_access_key: {s}", None),
        ("unknown key elsewhere", None, {"train.aws_secret": s}),
        ("a secret under a list field", None, {"ingest.inputs": {"key": s}}),
        ("a secret in a list of the wrong type", None, {"filter.languages": [s, 1]}),
        ("broken YAML on the secret's line", f"storage:\n  secret_access_key: {s}: more\n", None),
        ("broken YAML in a string override", None, [f"storage.secret_access_key=[{s}"]),
        ("storage section of the wrong type", f"storage: [{s}]", None),
        ("endpoint with user-info and a bad type", None, {"storage.endpoint_url": 5, "storage.region": s}),
        ("a string field given a URL with user-info", None, {"train.seq_len": f"http://k:{s}@host"}),
    ]


def test_no_config_error_echoes_a_secret(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv(CONFIG_PATH_ENV, str(tmp_path))
    caplog.set_level(logging.INFO)  # (what a deployment logs; botocore's DEBUG lines name every URL it calls)
    printed = []
    for n, (what, text, overrides) in enumerate(secret_errors(tmp_path)):
        preset = "tiny"
        if text is not None:
            preset = tmp_path / f"case{n}.yaml"
            preset.write_text("ingest: {inputs: [x]}\n" + text + "\n")
        with pytest.raises(ConfigError) as err:
            load_config(preset, overrides)
        shown = "".join(traceback.format_exception(err.value))  # the whole chain, as a flow run's log shows it
        assert "storage" in shown or "aws_secret" in shown or "override" in shown, (what, shown)
        printed.append((what, shown))
    # through preflight: an endpoint URL carrying the key is never named with it
    cfg = load_config("tiny-s3", {"storage.endpoint_url": f"http://key:{SECRET}@127.0.0.1:9"})
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert "http://***@127.0.0.1:9" in str(err.value)
    printed.append(("preflight", "".join(traceback.format_exception(err.value))))
    # the command line: python -m stages.tools.budget with the typo and with a bad endpoint
    for args in (["--set", f"storage.secret_acess_key={SECRET}"], ["--set", f"storage.endpoint_url={NUMERIC_SECRET}"]):
        run = subprocess.run([sys.executable, "-m", "stages.tools.budget", "tiny", *args], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode != 0 and "storage." in run.stderr + run.stdout, run.stderr
        printed.append(("budget CLI", run.stdout + run.stderr))
    captured = capsys.readouterr()
    printed.append(("captured", captured.out + captured.err + caplog.text))
    for what, text in printed:
        assert SECRET not in text and str(NUMERIC_SECRET) not in text, f"{what} leaked the secret:\n{text}"


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
