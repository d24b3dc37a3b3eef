"""Evaluation tokens/s: the in-process LM (stages/evaluate/stage.py) against lm-eval's `hf` backend on the export.

    .venv/bin/python bench/eval_throughput.py [--docs 200] [--repeats 3] [--write]

The tiny preset's pipeline on the bundled sample (outputs/bench-train, reused when its manifests match) gives a
trained checkpoint; stages/tools/export.py turns it into a LlamaForCausalLM directory. The documents scored are all
the deduplicated ones (up to --docs; the sample's validation split alone is a handful). Then, alternating in one run,
`lm_eval.simple_evaluate` on the same rendered tasks (heldout_ppl: loglikelihood_rolling; heldout_mc:
loglikelihood) with the same batch size, once with `PipelineLM` and once with lm-eval's `HFLM` over the export,
both in fp32 on the CPU, both models built before the clock starts. Tokens are those the in-process LM put
through the model (the same tokenizer and windows on both sides); the best of the repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section  # noqa: E402
from stages.core.config import load_config  # noqa: E402
from stages.core.documents import read_docs  # noqa: E402
from stages.evaluate import lm as harness
from stages.evaluate import tasks as eval_tasks
from stages.pipeline import PIPELINE
from stages.tools import export
from stages.train import checkpoints

SECTION = "## Evaluation throughput against lm-eval's hf backend"
TASKS = ["heldout_ppl", "heldout_mc"]


def timed_eval(model, include: Path, batch_size: int) -> tuple[float, dict]:
    import lm_eval

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=TASKS,
        task_manager=eval_tasks._task_manager(include, TASKS),
        batch_size=batch_size,
        log_samples=False,
        bootstrap_iters=0,
    )
    return time.perf_counter() - started, eval_tasks.summarize(results)


def measure(docs: int, repeats: int) -> dict:
    cfg = load_config("tiny", {"storage.root": str(REPO / "outputs" / "bench-train"), "evaluate.max_docs": docs})
    for stage in PIPELINE.dataset_part:
        PIPELINE.run(stage.name, cfg, log=lambda _: None)
    PIPELINE.run("train", cfg, log=lambda _: None)
    step, ckpt, meta = checkpoints.latest_checkpoint(PIPELINE.output("train", cfg).uri)
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        export.export(ckpt, tmp / "hf")
        # The sample's validation split is a handful of documents: score every deduplicated document instead.
        docs_uri = tmp / "docs.jsonl"
        with open(docs_uri, "w") as f:
            for shard in sorted(Path(PIPELINE.output("dedup", cfg).uri).glob("part-*.parquet")):
                for doc in read_docs(str(shard)):
                    f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
        include, _, n_docs = eval_tasks.prepare_tasks(cfg, str(docs_uri), tmp)
        batch = cfg.evaluate.batch_size
        ours = harness.PipelineLM(
            harness.load_model(ckpt, meta),
            harness.load_tokenizer(meta["tokenizer_uri"]),
            max_length=cfg.train.seq_len,
            batch_size=batch,
        )
        theirs = HFLM(
            pretrained=str(tmp / "hf"), dtype="float32", max_length=cfg.train.seq_len, batch_size=batch, device="cpu"
        )
        best = {"in-process": float("inf"), "hf": float("inf")}
        metrics = {}
        tokens = 0
        for _ in range(repeats):
            ours.tokens_forwarded = 0
            seconds, metrics["in-process"] = timed_eval(ours, include, batch)
            tokens = ours.tokens_forwarded
            best["in-process"] = min(best["in-process"], seconds)
            seconds, metrics["hf"] = timed_eval(theirs, include, batch)
            best["hf"] = min(best["hf"], seconds)
            print({k: round(v, 2) for k, v in best.items()}, flush=True)
    return {"best": best, "tokens": tokens, "docs": n_docs, "metrics": metrics, "step": step, "batch": batch}


def table(r: dict, command: str) -> str:
    ours, theirs = r["tokens"] / r["best"]["in-process"], r["tokens"] / r["best"]["hf"]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        machine(),
        f"The tiny preset's checkpoint at step {r['step']}, {r['docs']} held-out documents, tasks {', '.join(TASKS)}, "
        f"batch size {r['batch']}, fp32 on the CPU; {r['tokens']:,} tokens through the model per evaluation.",
        "",
        "| model | seconds | tokens/s | ratio | heldout_ppl bits/byte | heldout_mc acc |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rate in (("in-process PipelineLM", ours), ("lm-eval hf (LlamaForCausalLM export)", theirs)):
        key = "in-process" if name.startswith("in-process") else "hf"
        m = r["metrics"][key]
        lines.append(
            f"| {name} | {r['best'][key]:.2f} | {rate:,.0f} | {rate / theirs:.2f}x | "
            f"{m['heldout_ppl']['bits_per_byte']:.4f} | {m['heldout_mc']['acc']:.3f} |"
        )
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    command = f"python bench/eval_throughput.py --docs {args.docs} --repeats {args.repeats} --write"
    text = table(measure(args.docs, args.repeats), command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
