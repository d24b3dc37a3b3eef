"""A Hugging Face Llama-family model directory's weights as this pipeline's model: where continued pretraining
starts.

A `LlamaForCausalLM` directory (Llama 2 and 3, TinyLlama, SmolLM and the like; local or on S3, read offline through
stages.core.storage): its config.json is read by stages/core/model_directory.py (which refuses what the model
cannot compute), its safetensors (one file, or shards with their index) become our parameters (`state_dict`). This
is stages/tools/export.py backwards, through the one table of names both use (`names`), with the one real
conversion undone: transformers rotates the halves of each head (dims i and i + head_dim/2), we rotate interleaved
pairs (2i, 2i+1), so the rows of q_proj and k_proj are permuted back per head. Weights other than the ones the
table names are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.core import storage
from stages.core.config import ConfigError, ModelConfig, StorageConfig
from stages.core.model_directory import CONFIG, differences, read_model_config
from stages.train.checkpoints import META
from stages.train.scaling import ffn_hidden_dim

if TYPE_CHECKING:  # (torch only where tensors are: the launcher that checks a config never imports it)
    import torch

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def is_model_directory(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    """A Hugging Face model directory (config.json), not one of our checkpoints (meta.json)."""
    return storage.exists(storage.join(uri, CONFIG), storage_cfg) and not storage.exists(
        storage.join(uri, META), storage_cfg
    )


def mismatches(cfg: ModelConfig, folder: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """How the model section differs from the directory's model, field by field (empty: it is that model)."""
    theirs, _ = read_model_config(folder, storage_cfg)
    ours = cfg.model_copy(update={"ffn_hidden_dim": ffn_hidden_dim(cfg), "n_kv_heads": cfg.n_kv_heads or cfg.n_heads})
    fields = [f for f in ModelConfig.model_fields if f not in ("preset", "from_pretrained", "ffn_multiple_of")]
    return differences(ours, theirs, fields, f"its {CONFIG}")


def fingerprints(folder: str, storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """The directory's config and weight files with their fingerprints (size and mtime or ETag), for identity
    and lineage."""
    index = storage.join(folder, INDEX)
    files = [CONFIG] + (sorted(set(storage.read_json(index, storage_cfg)["weight_map"].values())) + [INDEX]
                        if storage.exists(index, storage_cfg) else [WEIGHTS])  # fmt: skip
    return {name: storage.raw_fingerprint(storage.join(folder, name), storage_cfg) for name in files}


def names(cfg: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(our parameter, transformers' parameter, heads whose rotary rows are permuted or None) for every tensor."""
    table = [("tok_embeddings.weight", "model.embed_tokens.weight", None), ("norm.weight", "model.norm.weight", None)]
    if not cfg.tie_embeddings:
        table.append(("output.weight", "lm_head.weight", None))
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        table += [
            (ours + "attention.wq.weight", theirs + "self_attn.q_proj.weight", cfg.n_heads),
            (ours + "attention.wk.weight", theirs + "self_attn.k_proj.weight", cfg.n_kv_heads or cfg.n_heads),
            (ours + "attention.wv.weight", theirs + "self_attn.v_proj.weight", None),
            (ours + "attention.wo.weight", theirs + "self_attn.o_proj.weight", None),
            (ours + "feed_forward.w1.weight", theirs + "mlp.gate_proj.weight", None),
            (ours + "feed_forward.w3.weight", theirs + "mlp.up_proj.weight", None),
            (ours + "feed_forward.w2.weight", theirs + "mlp.down_proj.weight", None),
            (ours + "attention_norm.weight", theirs + "input_layernorm.weight", None),
            (ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight", None),
        ]
    return table


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection reordered per head from (x0, x1, x2, ...) pairs to (x0, x2, ..., x1, x3, ...)."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """interleaved_to_halves undone."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _tensors(folder: str, storage_cfg: StorageConfig | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    index = storage.join(folder, INDEX)
    if storage.exists(index, storage_cfg):
        files = sorted(set(storage.read_json(index, storage_cfg)["weight_map"].values()))
    elif storage.exists(storage.join(folder, WEIGHTS), storage_cfg):
        files = [WEIGHTS]
    else:
        raise ConfigError(f"{folder}: neither {WEIGHTS} nor {INDEX} (only safetensors weights are read)")
    found: dict[str, torch.Tensor] = {}
    for name in files:  # (a shard at a time: read whole, as an object store gives it)
        with storage.open_uri(storage.join(folder, name), "rb", storage_cfg) as f:
            found.update(load(f.read()))
    return found


def state_dict(folder: str, cfg: ModelConfig, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """The directory's weights under our names, in fp32; an extra or a missing tensor is refused by name."""
    found = _tensors(folder, storage_cfg)
    table = names(cfg)
    expected = {theirs for _, theirs, _ in table} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(set(found) - expected - {k for k in found if k.endswith("rotary_emb.inv_freq")})
    missing = sorted({theirs for _, theirs, _ in table} - set(found))
    if extra or missing:
        raise ConfigError(f"{folder}: weights {extra[:5]} are not part of the model, {missing[:5]} are missing")
    out = {}
    for ours, theirs, heads in table:
        weight = found[theirs].float()
        out[ours] = halves_to_interleaved(weight, heads) if heads else weight
    if cfg.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out

