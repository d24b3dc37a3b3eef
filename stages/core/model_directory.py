"""A Hugging Face model directory's config.json as this pipeline's model section (`ModelConfig`), or why not.

In core because the config itself reads it: `model.from_pretrained` takes the model section from the directory
when the config is loaded (stages/core/config.py), so a wrong directory fails before any work. The weights are
stages/train/pretrained.py's.

Only `LlamaForCausalLM` (Llama 2 and 3, TinyLlama, SmolLM and the like) is read. What the model cannot compute
exactly is refused naming the config.json field: another architecture, biases, an activation other than SiLU, any
RoPE scaling (Llama 3.1's `llama3`, YaRN, linear: our rotary tables have none), a head_dim other than
hidden_size / heads, pretraining_tp above 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core import storage
from stages.core.presets import ConfigError

if TYPE_CHECKING:  # (config.py imports this module: its classes are imported where they are used)
    from stages.core.config import ModelConfig, StorageConfig

ARCHITECTURE = "LlamaForCausalLM"
CONFIG = "config.json"


def _refuse(where: str, field: str, why: str) -> ConfigError:
    return ConfigError(f"{where}/{CONFIG}: {field}: {why}; only {ARCHITECTURE} as this pipeline's model computes it")


def rope(hf: dict) -> tuple[float, str]:
    """(theta, scaling type) from either transformers' layout: `rope_theta` and `rope_scaling` (4.x, most published
    models), or `rope_parameters` (5.x)."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or parameters.get("rope_type") or "default"
    return float(hf.get("rope_theta") or parameters.get("rope_theta") or 10000.0), kind


def model_config(hf: dict, where: str) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocabulary size) a config.json describes, or ConfigError naming what we cannot run."""
    from stages.core.config import ModelConfig

    architectures = hf.get("architectures") or ([ARCHITECTURE] if hf.get("model_type") == "llama" else [])
    if architectures != [ARCHITECTURE]:
        raise _refuse(where, "architectures", f"{architectures or hf.get('model_type')!r} is another network")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise _refuse(where, field, "biases are not part of the model")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", f"{hf['hidden_act']!r}: the feed-forward is SwiGLU (silu)")
    theta, kind = rope(hf)
    if kind != "default":
        raise _refuse(where, "rope_scaling", f"{kind!r} scaling is not supported (plain rotary positions only)")
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise _refuse(where, "head_dim", f"{hf['head_dim']} is not hidden_size / num_attention_heads ({dim // heads})")
    if hf.get("pretraining_tp", 1) != 1:
        raise _refuse(where, "pretraining_tp", f"{hf['pretraining_tp']}: sliced projections are not supported")
    cfg = ModelConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # (LlamaConfig's default)
    )
    return cfg, int(hf["vocab_size"])


def read_model_config(folder: str, storage_cfg: StorageConfig | None = None) -> tuple[ModelConfig, int]:
    """The directory's model section and vocabulary size (model_config), or ConfigError."""
    uri = storage.join(folder, CONFIG)
    if not storage.exists(uri, storage_cfg):
        raise ConfigError(f"{folder}: no {CONFIG}: not a Hugging Face model directory")
    return model_config(storage.read_json(uri, storage_cfg), folder)


def differences(ours: ModelConfig, theirs: ModelConfig, fields, where: str) -> list[str]:
    """`model.<field>: ours here, theirs in <where>` for each of `fields` on which the two sections differ."""
    return [f"model.{f}: {getattr(ours, f)!r} here, {getattr(theirs, f)!r} in {where}" for f in fields
            if getattr(ours, f) != getattr(theirs, f)]  # fmt: skip


def merge(data: dict, path: Path, overridden: dict[str, Any]) -> None:
    """`model.from_pretrained: DIR` in a config being loaded (stages/core/config.py: load_config) makes the model
    section DIR's config.json's, and DIR the run's initial weights and tokenizer unless those are given. Fields
    given beside it must agree with the directory; when it is chosen by override, only the fields the overrides
    name too are compared (the file's model is another model's)."""
    from pydantic import ValidationError

    from stages.core.config import REPO_ROOT, ModelConfig, StorageConfig

    model = data.get("model")
    if not isinstance(model, dict) or not model.get("from_pretrained"):
        return
    if model.get("preset"):
        raise ConfigError(f"{path}: model.preset and model.from_pretrained: give one (the directory has a shape)")
    folder = str(model["from_pretrained"])
    folder = folder if "://" in folder or Path(folder).is_absolute() else str(REPO_ROOT / folder)
    try:
        storage_cfg = StorageConfig.model_validate(data.get("storage") or {})
    except ValidationError:
        return  # (the whole config's validation names the storage fields)
    derived, _ = read_model_config(folder, storage_cfg)
    given = {k: v for k, v in model.items() if k != "from_pretrained"}
    if overridden.get("model.from_pretrained"):
        given = {k: v for k, v in given.items() if f"model.{k}" in overridden}
    shape = derived.model_dump(exclude={"preset", "from_pretrained"})
    differ = differences(ModelConfig.model_validate({**shape, **given}), derived, given, f"{folder}/{CONFIG}")
    if differ:
        raise ConfigError(f"{path}: " + "; ".join(differ) + " (a pretrained model's shape is its own)")
    data["model"] = {**shape, "from_pretrained": folder}
    tokenizer = data.setdefault("tokenizer", {})
    if not tokenizer.get("path") or overridden.get("model.from_pretrained") and "tokenizer.path" not in overridden:
        # (a local directory loads through transformers' AutoTokenizer; on S3 its tokenizer.json is read)
        tokenizer["path"] = storage.join(folder, "tokenizer.json") if storage.is_remote(folder) else folder
        eos = eos_token(folder, storage_cfg)
        if eos and "tokenizer.eos_token" not in overridden:
            tokenizer["eos_token"] = eos
    train = data.setdefault("train", {})
    if not train.get("initial_checkpoint"):
        train["initial_checkpoint"] = folder


def eos_token(folder: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The directory's end-of-text token, from its tokenizer_config.json (a string or an AddedToken mapping)."""
    uri = storage.join(folder, "tokenizer_config.json")
    if not storage.exists(uri, storage_cfg):
        return None
    found = storage.read_json(uri, storage_cfg).get("eos_token")
    return found.get("content") if isinstance(found, dict) else found
