"""Tokens per second: the tokenize stage against raw `tokenizers` batch encoding, and the trainer's loader reading
from a local S3 endpoint against what the trainer consumes.

    .venv/bin/python bench/tokens_throughput.py [--docs 8000] [--workers 2] [--write]

Corpus: `--docs` real documents drawn at random from the Debian documentation and manual pages installed here, in
several languages (bench/scale_corpus.py gathers them; its docstring names the packages), committed as a stage
output in shards of 1,000 (the tokenizer and tokenize stages read it as their documents); the tokenizer stage
trains the tiny preset's BPE (vocab 4,096) on it. Then, side by side in one run:
1. raw: `--workers` processes, each reading its shards' texts and calling `Tokenizer.encode_batch_fast` on them
   (the same batches of 256 the stage uses), counting tokens; nothing written;
2. the tokenize stage with the same number of workers, decontamination off (it is another job: 13-gram checks
   against evaluation texts), so the difference is what the stage adds: the split, EOS, sharding and writing
   through litdata; and the stage with the tiny preset's decontamination against the held-out split. The three
   runs alternate three times, and the medians count;
3. the loader: the same tokens written by the stage to a local moto S3 endpoint over HTTP, then one epoch read
   with the trainer's loader (stages/train/loader.py: StreamingDataLoader, batches of micro_batch_size x (seq_len + 1),
   a fresh cache so every chunk is downloaded), against the tokens/s the tiny preset's training consumes while
   stepping (a real 2-process run of `stages.train.stage.run_training` on the sample, in the same run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section
from stages.core.config import load_config
from stages.core.documents import Doc, ShardWriter, read_texts
from stages.core.storage import StageOutput
from stages.pipeline import PIPELINE
from stages.tokenizer.bpe import FILENAME as TOKENIZER_FILE
from stages.train import loader

SECTION = "## Tokenize and loader throughput"
REPEATS = 3
NO_DECONTAMINATION = {"evaluate.tasks": [], "evaluate.decontaminate_with": []}
TEXT_POOL = Path("/tmp/scale_corpus/.text_pool.jsonl.gz")  # (bench/scale_corpus.py's cache, shared with bench/scale.py)


def real_corpus(n: int, root: Path, seed: int = 0) -> StageOutput:
    """`n` real documents drawn from the installed documentation, committed at `{root}/corpus` as a stage's output
    is: what the tokenizer and tokenize stages then read as their `docs` input."""
    import random

    from bench.scale_corpus import gather

    TEXT_POOL.parent.mkdir(parents=True, exist_ok=True)
    texts, _ = gather(TEXT_POOL)
    chosen = random.Random(seed).sample(texts, min(n, len(texts)))
    out = StageOutput("corpus", str(root / "corpus"))
    with ShardWriter(out.uri, "part", 1000) as writer:
        for i, text in enumerate(chosen):
            writer.write(Doc(f"doc-{i:08d}", text["text"], "bench"))
    out.commit({"bench": n}, {}, {}, writer.files)
    return out


def encode_raw(job: tuple[str, str]) -> int:
    from tokenizers import Tokenizer

    shard_uri, tokenizer_path = job
    tok = Tokenizer.from_file(tokenizer_path)
    texts = [text for _, text in read_texts(shard_uri)]
    return sum(
        len(e.ids) for start in range(0, len(texts), 256) for e in tok.encode_batch_fast(texts[start : start + 256])
    )


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_tokenize(docs: int, workers: int, root: Path) -> dict:
    corpus = real_corpus(docs, root)  # (the stages read it as their `docs` input: the contract takes any output)
    base = {"storage.root": str(root), "tokenize.workers": workers}
    cfg = load_config("tiny", {**base, **NO_DECONTAMINATION})
    PIPELINE["tokenizer"].run(cfg, {"docs": corpus}, log=lambda _: None)
    inputs = {"docs": corpus, "tokenizer": PIPELINE["tokenizer"].output(cfg, {"docs": corpus})}
    shards = [corpus.path(s) for s in sorted(corpus.manifest()["files"]) if s.endswith(".parquet")]
    tokenizer_path = inputs["tokenizer"].path(TOKENIZER_FILE)
    decon_root = root / "decontaminated"
    decon = load_config("tiny", {**base, "storage.root": str(decon_root)})
    raw_s, stage_s, decon_s = [], [], []
    for _ in range(REPEATS):  # alternated, medians: the machine's noise hits all alike
        with ProcessPoolExecutor(workers) as pool:
            raw_tokens, seconds = timed(lambda: sum(pool.map(encode_raw, [(s, tokenizer_path) for s in shards])))
        raw_s.append(seconds)
        shutil.rmtree(root / "tokens", ignore_errors=True)
        stats, seconds = timed(lambda: PIPELINE["tokenize"].run(cfg, inputs, log=lambda _: None))
        stage_s.append(seconds)
        shutil.rmtree(decon_root, ignore_errors=True)
        decon_stats, seconds = timed(lambda: PIPELINE["tokenize"].run(decon, inputs, log=lambda _: None))
        decon_s.append(seconds)
    raw_s, stage_s, decon_s = (statistics.median(found) for found in (raw_s, stage_s, decon_s))
    stage_tokens = sum(stats["tokens"].values()) - stats["docs_in"]  # minus one EOS per document
    return {
        "docs": docs,
        "text_mb": stats["bytes_in"] / 1e6,
        "workers": workers,
        "raw_tokens": raw_tokens,
        "raw_s": raw_s,
        "stage_tokens": stage_tokens,
        "stage_s": stage_s,
        "decon_s": decon_s,
        "decon_tokens": sum(decon_stats["tokens"].values())
        - (decon_stats["docs_in"] - decon_stats["removed"]["decontaminated"]),
        "decontaminated_docs": decon_stats["removed"]["decontaminated"],
    }


def measure_loader(root: Path) -> dict:
    """One epoch of the trainer's loader over the tokenized corpus on a local S3 endpoint, cold cache."""
    import boto3

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")  # fmt: skip
        client.create_bucket(Bucket="bench")
        cfg = load_config("tiny-s3", {"storage.endpoint_url": endpoint, "storage.root": "s3://bench/run",
                                      "tokenize.workers": 2, **NO_DECONTAMINATION})  # fmt: skip
        inputs = {}
        for role, folder in (("docs", root / "corpus"), ("tokenizer", next((root / "tokenizer").iterdir()))):
            key = f"run/{folder.relative_to(root)}"
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    client.upload_file(str(path), "bench", f"{key}/{path.relative_to(folder)}")
            inputs[role] = StageOutput(role, f"s3://bench/{key}", cfg.storage)
        PIPELINE["tokenize"].run(cfg, inputs, log=lambda _: None)
        tokens = PIPELINE["tokenize"].output(cfg, inputs).uri
        with tempfile.TemporaryDirectory() as cache:
            os.environ[loader.CACHE_ENV] = cache
            batches = loader.make_loader(cfg, "train", cfg.train.micro_batch_size, shuffle=True, num_workers=0,
                                         data=tokens)  # fmt: skip
            tokens, seconds = timed(lambda: sum(batch.numel() for batch in batches))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return {"loader_tokens": tokens, "loader_s": seconds}


def measure_training() -> dict:
    """The tiny preset's training on the sample: tokens/s while stepping, 2 processes."""
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config("tiny", {"storage.root": root})
        for stage in PIPELINE.dataset_part:
            PIPELINE.run(stage.name, cfg, log=lambda _: None)
        stats = PIPELINE.run("train", cfg, log=lambda _: None)
    return {"train_tokens_per_s": stats["tokens_per_s"]}


def table(r: dict, command: str) -> str:
    raw = r["raw_tokens"] / r["raw_s"]
    stage = r["stage_tokens"] / r["stage_s"]
    decon = r["decon_tokens"] / r["decon_s"]
    load = r["loader_tokens"] / r["loader_s"]
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}`",
            f"{machine()} {r['docs']:,} real documents (Debian documentation and manual pages, several languages; "
            f"{r['text_mb']:,.0f} MB of text), {r['workers']} processes, tiny preset's tokenizer (vocab 4,096).",
            "",
            "| run | tokens | seconds | tokens/s | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| raw `encode_batch_fast`, no writing | {r['raw_tokens']:,} | {r['raw_s']:.1f} | {raw:,.0f} | 1.00 |",
            f"| tokenize stage (split, EOS, litdata shards) | {r['stage_tokens']:,} | {r['stage_s']:.1f} "
            f"| {stage:,.0f} | {stage / raw:.2f} |",
            f"| tokenize stage with 13-gram decontamination against the held-out split | {r['decon_tokens']:,} "
            f"| {r['decon_s']:.1f} | {decon:,.0f} | {decon / raw:.2f} |",
            "",
            "| reader | tokens/s | ratio |",
            "|---|---:|---:|",
            f"| trainer's loader, one epoch from the local S3 endpoint (cold cache) | {load:,.0f} "
            f"| {load / r['train_tokens_per_s']:.1f}x |",
            f"| tiny preset's training while stepping (2 processes) | {r['train_tokens_per_s']:,.0f} | 1.0x |",
            "",
            "Token counts exclude the EOS the stage adds after each document; the raw run counts the same texts. "
            f"Decontamination drops {r['decontaminated_docs']:,} training documents that share a 13-gram with a "
            "held-out one (documentation repeats boilerplate: licences, option tables).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    command = f"python bench/tokens_throughput.py --docs {args.docs} --workers {args.workers} --write"
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_tokenize(args.docs, args.workers, Path(tmp))
        print(result, flush=True)
        result |= measure_loader(Path(tmp))
        print(result, flush=True)
    result |= measure_training()
    text = table(result, command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
