"""Samples: continuations of a few fixed prompts by a checkpoint, a quick human check beside the loss and evals.

After training, the final checkpoint continues each of `samples.prompts` once greedily and `samples.sampled` times
by sampling (temperature, top-k, a fixed seed: the same checkpoint and settings give the same text). The result
is `{checkpoint}/samples.json` (prompts, settings, continuations) and a markdown rendering that the flow shows as
an artifact. A checkpoint whose samples.json holds the same settings is not sampled again.

Decoding is nanoGPT's loop over the model's KV cache, one prompt at a time: a handful of prompts and tens of
tokens cost well under a second for the small presets, so batching them is not worth its padding logic here
(`stages.evaluate.PipelineLM` batches for lm-eval's generation tasks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.evaluate.lm import load_model, load_tokenizer, pick_device
from stages.train.model import KVCache, Transformer

SAMPLES = "samples.json"


@torch.inference_mode()
def continue_prompt(
    model: Transformer,
    prompt: list[int],
    max_new: int,
    eos_id: int | None,
    temperature: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Token ids continuing `prompt`: greedy without a temperature, else sampled (top-k, then temperature)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model, 1, len(prompt) + max_new, device, dtype)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    logits = model(tokens, cache, positions, torch.ones_like(tokens, dtype=torch.bool))
    out: list[int] = []
    for position in range(len(prompt), len(prompt) + max_new):
        last = logits[0, -1].float().cpu()  # (sampled on the CPU: one generator for every device)
        if temperature is None:
            token = int(last.argmax())
        else:
            if top_k is not None and top_k < last.numel():
                last[last < torch.topk(last, top_k).values[-1]] = -float("inf")
            token = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        if token == eos_id:
            break
        out.append(token)
        step = torch.tensor([[token]], device=device)
        logits = model(step, cache, torch.tensor([[position]], device=device), torch.ones_like(step, dtype=torch.bool))
    return out


def settings(cfg: PipelineConfig) -> dict:
    return {**cfg.samples.model_dump(), "context": cfg.train.seq_len}


def generate(cfg: PipelineConfig, checkpoint: str, device: str | torch.device | None = None) -> dict:
    meta = storage.read_json(storage.join(checkpoint, "meta.json"), cfg.storage)
    model = load_model(checkpoint, meta, cfg.storage, pick_device(device, cfg))
    tokenizer = load_tokenizer(meta["tokenizer_uri"], cfg.storage)
    eos_id = tokenizer.token_to_id(cfg.tokenizer.eos_token)
    sc = cfg.samples
    generator = torch.Generator().manual_seed(sc.seed)
    rows = []
    for prompt in sc.prompts:
        # the prompt's last tokens that leave room for the continuation within the trained context
        ids = tokenizer.encode(prompt).ids[-max(1, cfg.train.seq_len - sc.max_new_tokens) :]
        greedy = continue_prompt(model, ids, sc.max_new_tokens, eos_id)
        sampled = [
            continue_prompt(model, ids, sc.max_new_tokens, eos_id, sc.temperature, sc.top_k, generator)
            for _ in range(sc.sampled)
        ]
        rows.append(
            {"prompt": prompt, "greedy": tokenizer.decode(greedy), "sampled": [tokenizer.decode(s) for s in sampled]}
        )
    return {"checkpoint": checkpoint, "step": meta["step"], "settings": settings(cfg), "samples": rows}


def markdown(result: dict) -> str:
    s = result["settings"]
    top_k = f", top-k {s['top_k']}" if s["top_k"] else ""
    lines = [
        f"# Samples at step {result['step']}",
        "",
        f"`{result['checkpoint']}`: up to {s['max_new_tokens']} new tokens per prompt; greedy, then {s['sampled']} "
        f"sampled at temperature {s['temperature']}{top_k} (seed {s['seed']}).",
    ]
    for row in result["samples"]:
        lines += ["", f"**{_inline(row['prompt'])}**", "", f"- greedy: {_inline(row['greedy'])}"]
        lines += [f"- sampled: {_inline(text)}" for text in row["sampled"]]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """One markdown line that shows the text as it is (no markup from the model's output)."""
    escaped = "".join("\\" + c if c in "\\`*_[]<>#|" else c for c in text.replace("\n", " ⏎ "))
    return escaped.strip() or "(nothing: EOS first)"


def run(cfg: PipelineConfig, checkpoint: str, log: Callable[[str], None] = print) -> dict:
    """Samples of `checkpoint` (generated, or read back when its samples.json has these settings)."""
    uri = storage.join(checkpoint, SAMPLES)
    if storage.exists(uri, cfg.storage):
        kept = storage.read_json(uri, cfg.storage)
        if kept.get("settings") == settings(cfg):
            log(f"samples: {uri} has these settings already")
            return {**kept, "markdown": markdown(kept), "skipped": True}
    result = generate(cfg, checkpoint)
    storage.write_json(uri, result, cfg.storage)
    log(f"samples: {len(result['samples'])} prompts continued, saved at {uri}")
    return {**result, "markdown": markdown(result), "skipped": False}
