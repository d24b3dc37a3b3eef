"""Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory that the ecosystem loads offline.

    python -m stages.tools.export CHECKPOINT_URI DEST_DIR

Writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer files
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) through transformers' own
`save_pretrained`, so `AutoModelForCausalLM.from_pretrained(DEST_DIR)` and `lm_eval --model hf` read it as is.

The model is the same network under other names, with one real conversion: rotary embeddings. Ours rotate
interleaved pairs (dims 2i, 2i+1), as Meta's Llama code does; transformers' Llama rotates halves (dims i and
i + head_dim/2). Permuting the output rows of wq and wk per head (the permutation of transformers'
convert_llama_weights_to_hf.py) turns one into the other; q.k is unchanged because q and k move alike.
Everything else maps one to one (tests/test_export.py checks logits to 1e-4 in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from stages.core import storage
from stages.core.config import ModelConfig, StorageConfig
from stages.evaluate.lm import EOS_TOKEN, load_model, load_tokenizer
from stages.train.checkpoints import META
from stages.train.model import Transformer
from stages.train.pretrained import interleaved_to_halves, names
from stages.train.scaling import ffn_hidden_dim


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (stages/train/pretrained.py's table), q and k permuted."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    return {theirs: (interleaved_to_halves(sd[ours], heads) if heads else sd[ours]).contiguous()
            for ours, theirs, heads in names(model.cfg)}  # fmt: skip


def llama_config(cfg: ModelConfig, vocab_size: int, max_positions: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=ffn_hidden_dim(cfg),
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        torch_dtype="float32",
    )


def export(ckpt: str, dest: str | Path, storage_cfg: StorageConfig | None = None) -> dict:
    """Write the Hugging Face directory for checkpoint `ckpt` (local or s3://) into the local folder `dest`."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    meta_uri = storage.join(ckpt, META)
    if not storage.exists(meta_uri, storage_cfg):
        raise FileNotFoundError(f"{ckpt}: no {META}, not a complete checkpoint")
    meta = storage.read_json(meta_uri, storage_cfg)
    model = load_model(ckpt, meta, storage_cfg)
    tokenizer = load_tokenizer(meta["tokenizer_uri"], storage_cfg)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{meta['tokenizer_uri']}: no {EOS_TOKEN!r} token")
    max_positions = int(meta.get("seq_len") or 2048)

    config = llama_config(model.cfg, model.vocab_size, max_positions, eos_id)
    hf_model = LlamaForCausalLM(config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export {ckpt}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf_model.tie_weights()

    dest = Path(dest)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    hf_model.save_pretrained(tmp, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_positions,
    )
    hf_tok.save_pretrained(tmp)
    info = {"checkpoint": ckpt, "step": meta.get("step"), "params": model.num_params(), "dest": str(dest)}
    (tmp / "pipeline_export.json").write_text(json.dumps(info, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)  # the directory appears whole or not at all
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder (with meta.json), local or s3://")
    parser.add_argument("dest", help="local folder to write the Hugging Face model into")
    args = parser.parse_args(argv)
    print(json.dumps(export(args.checkpoint, args.dest), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
