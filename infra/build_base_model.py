"""Build models/base-llama/: a small Hugging Face LlamaForCausalLM directory, laid out as a downloaded base model is,
for the `continue-hf` preset (continued pretraining from a Hugging Face model) and its test.

No model can be downloaded here, so this is a stand-in for SmolLM or TinyLlama on disk, built by transformers
itself: `save_pretrained` safetensors and config.json, and a tokenizer.json / tokenizer_config.json pair from
`PreTrainedTokenizerFast` (a byte-level BPE of 4,096 tokens with Llama's `<s>` and `</s>`, trained on the bundled
sample's documents). The weights are transformers' own random initialization (seed 0): what the preset shows is
the pipeline taking a model it did not make, and the evaluation's first rows are that model's score. Untied
embeddings and grouped-query attention, as in Llama.

Run by `make install`; idempotent (a complete directory is left alone), deterministic for a given sample.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGET = REPO / "models" / "base-llama"
SAMPLE = REPO / "data" / "sample" / "docs.jsonl.gz"
VOCAB = 4096
SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
             max_position_embeddings=2048)  # fmt: skip
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def sample_texts(limit: int = 2000):
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= limit:
                return
            yield json.loads(line)["text"]


def build(target: Path = TARGET) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from stages.tokenizer.bpe import train_bpe

    if all((target / name).is_file() for name in FILES):
        print(f"{target} present")
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    bpe = train_bpe(sample_texts(), VOCAB, ["<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), bos_token_id=bpe.token_to_id("<s>"),
                         eos_token_id=bpe.token_to_id("</s>"), **SHAPE)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    print(f"wrote {target} ({config.vocab_size} tokens, {sum(p.stat().st_size for p in target.iterdir())} bytes)")
    return target


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
