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

from stages.core import storage
from stages.core.presets import ConfigError

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


def model_config(hf: dict, where: str):
    """(ModelConfig, vocabulary size) a config.json describes, or ConfigError naming what we cannot run."""
    from stages.core.config import ModelConfig  # (config.py imports this module)

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


def read_model_config(folder: str, storage_cfg=None):
    uri = storage.join(folder, CONFIG)
    if not storage.exists(uri, storage_cfg):
        raise ConfigError(f"{folder}: no {CONFIG}: not a Hugging Face model directory")
    return model_config(storage.read_json(uri, storage_cfg), folder)




def eos_token(folder: str, storage_cfg=None) -> str | None:
    """The directory's end-of-text token, from its tokenizer_config.json (a string or an AddedToken mapping)."""
    uri = storage.join(folder, "tokenizer_config.json")
    if not storage.exists(uri, storage_cfg):
        return None
    found = storage.read_json(uri, storage_cfg).get("eos_token")
    return found.get("content") if isinstance(found, dict) else found
