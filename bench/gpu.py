"""Training on whatever accelerator is here: tokens/s, MFU, peak memory against the budget planner, and where a
step's time goes, per model preset, with and without document masking. Nothing is downloaded.

    .venv/bin/python bench/gpu.py [--steps 20] [--warmup 3] [--out gpu.json] [--write]
    .venv/bin/python bench/gpu.py --smoke       # CPU, llama-1m, a few steps: what CI runs

Per preset (llama-10m as a sanity point, llama-100m, llama-1b; `--smoke`: llama-1m) and masking off and on, the
trainer's own pieces with the production settings: `build_model` (compile per block, bf16 through `train.dtype`
auto), `build_optimizer` (fused AdamW), `lm_loss` (flex_attention's BlockMask when masking on CUDA). One process on
one device: FSDP2 has nothing to shard there, so the trainer runs the model unsharded with autocast, as this does.
The tokens are synthetic (documents of random lengths ending in EOS, drawn with a fixed seed): a step's time does
not depend on which tokens it sees, and the loader's own speed is bench/tokens_throughput.py's figure.

`--warmup` untimed steps (compilation happens there), then `--steps` timed ones, each split by device
synchronizations into data (the batch to the device), forward, backward and optimizer (clipping and the AdamW
step). Per row: tokens/s (median step), MFU against the device's dense bf16 peak (stages/train/scaling.py's table;
none on CPU), peak memory (CUDA's allocator peak; on CPU the growth of the peak resident set) beside the budget
planner's prediction for the same config (stages/train/budget.py, one device), and masking's cost in tokens/s.
Results go to `--out` as JSON, and with `--write` to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

from bench.stage_times import machine, write_section
from stages.core.config import load_config
from stages.train import budget, scaling
from stages.train.metrics import peak_memory_mb
from stages.train.worker import build_model, build_optimizer, compute_dtype, lm_loss, setup_distributed

SECTION = "## Training on an accelerator: throughput, MFU and memory"
# (preset, micro-batch, sequence length, vocabulary): the presets' own vocabularies, micro-batches that fit an
# 80 GB device with room (the planner's figures are in the table)
PRESETS = [("llama-10m", 32, 1024, 32_000), ("llama-100m", 16, 2048, 32_000), ("llama-1b", 8, 2048, 128_256)]
SMOKE = [("llama-1m", 2, 128, 4_096)]
EOS = 0
MEAN_DOCUMENT = 512  # tokens: web documents are a few hundred to a few thousand


def config(preset: str, micro: int, seq: int, masking: bool, device: torch.device):
    return load_config("tiny", {"model.preset": preset, "train.micro_batch_size": micro, "train.seq_len": seq,
                                "train.document_masking": masking, "train.compile": True,
                                "train.device": device.type, "train.nproc_per_node": 1})  # fmt: skip


def batches(micro: int, seq: int, vocab: int, count: int) -> list[torch.Tensor]:
    """`count` blocks of seq + 1 tokens: documents of geometric lengths (mean MEAN_DOCUMENT), each ending in EOS."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(1, vocab, (micro, seq + 1), generator=gen)
        ends = torch.rand((micro, seq + 1), generator=gen) < 1 / MEAN_DOCUMENT
        tokens[ends] = EOS
        out.append(tokens.to(torch.int32).pin_memory() if torch.cuda.is_available() else tokens.to(torch.int32))
    return out


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(preset: str, micro: int, seq: int, vocab: int, masking: bool, steps: int, warmup: int,
            device: torch.device, mesh) -> dict:  # fmt: skip
    cfg = config(preset, micro, seq, masking, device)
    dtype = compute_dtype(cfg, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_mb(device) if device.type == "cpu" else 0.0
    model = build_model(cfg, vocab, device, mesh)
    optimizer = build_optimizer(model, cfg)
    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for k, batch in enumerate(batches(micro, seq, vocab, warmup + steps)):
        start = sync(device)
        batch = batch.to(device, non_blocking=True)
        loaded = sync(device)
        loss = lm_loss(model, batch, device, EOS if masking else None, dtype)
        forward = sync(device)
        loss.backward()
        backward = sync(device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = sync(device)
        if k >= warmup:
            for name, seconds in zip(phases, (loaded - start, forward - loaded, backward - forward, done - backward)):
                phases[name].append(seconds)
    step = statistics.median(map(sum, zip(*phases.values())))
    tokens_per_s = micro * seq / step
    peak = scaling.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flops = scaling.flops_per_token(cfg.model, vocab, seq)
    predicted = budget.memory_per_gpu(cfg, vocab, 1)["total"] / 2**20
    del model, optimizer
    return {
        "preset": preset, "masking": masking, "micro_batch": micro, "seq_len": seq, "vocab": vocab,
        "dtype": str(dtype).removeprefix("torch."), "params": scaling.count_params(cfg.model, vocab),
        "step_s": step, "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops / peak if peak else None,
        "peak_memory_mb": peak_memory_mb(device) - before, "planned_memory_mb": predicted,
        "phases_s": {name: statistics.median(found) for name, found in phases.items()}, "loss": loss.item(),
    }  # fmt: skip


def table(rows: list[dict], failures: list[dict], device_name: str, command: str) -> str:
    lines = [SECTION, "", f"Command: `{command}`", f"{machine()} Device: {device_name}.", "",
             "| preset | masking | micro-batch x seq | tokens/s | MFU | step (data / fwd / bwd / opt), ms | "
             "peak memory (planner), GiB |", "|---|---|---|---:|---:|---|---:|"]  # fmt: skip
    for r in rows:
        p = r["phases_s"]
        split = " / ".join(f"{p[k] * 1e3:.1f}" for k in ("data", "forward", "backward", "optimizer"))
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['preset']} | {'on' if r['masking'] else 'off'} | {r['micro_batch']} x {r['seq_len']} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | {split} | {r['peak_memory_mb'] / 1024:.2f} "
                     f"({r['planned_memory_mb'] / 1024:.2f}) |")  # fmt: skip
    for f in failures:
        lines.append(f"| {f['preset']} | {'on' if f['masking'] else 'off'} | failed: {f['error'][:200]} | | | | |")
    speed = {(r["preset"], r["masking"]): r["tokens_per_s"] for r in rows}
    both = [name for name in dict.fromkeys(p for p, _ in speed) if (name, True) in speed and (name, False) in speed]
    costs = [f"{name} {1 - speed[name, True] / speed[name, False]:.1%}" for name in both]
    lines += ["", "Document masking's cost in tokens/s: " + (", ".join(costs) or "not measured") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="CPU, llama-1m, 2 steps: checks the command runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="gpu.json", help="the results as JSON")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    wanted = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    device, mesh = setup_distributed(load_config("tiny", {"train.device": wanted}))  # (a world of one)
    presets, steps, warmup = (SMOKE, 2, 1) if args.smoke else (PRESETS, args.steps, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows, failures = [], []
    for preset, micro, seq, vocab in presets:
        for masking in (False, True):
            try:
                rows.append(measure(preset, micro, seq, vocab, masking, steps, warmup, device, mesh))
                print(json.dumps(rows[-1]), flush=True)
            except Exception as exc:  # (one preset's failure, out of memory say, must not lose the others' figures)
                if args.smoke:
                    raise
                failures.append({"preset": preset, "masking": masking, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(f"{preset} masking={masking}: {failures[-1]['error']}", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            # after every row: a run cut short (a device's time ran out) keeps what it measured
            Path(args.out).write_text(json.dumps({"device": name, "rows": rows, "failures": failures}, indent=1) + "\n")
    command = "python bench/gpu.py" + (" --smoke" if args.smoke else f" --steps {steps} --write")
    text = table(rows, failures, name, command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
