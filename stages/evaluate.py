"""Evaluate the latest complete checkpoint with lm-evaluation-harness, in-process and offline.

What it reads (all through the storage layer, so local folders and s3:// work alike):
- `{root}/checkpoints/step-NNNNNN/`: torch.distributed.checkpoint (DCP) directories. Only those with a
  `meta.json` are complete; the one with the highest step is evaluated.
- the tokenizer named by `meta.json`'s `tokenizer_uri` (falling back to `{root}/tokenizer/tokenizer.json`);
- `{root}/tokens/val_docs.jsonl`: the validation split's documents, of which the first `evaluate.max_docs`
  are copied into a local temporary JSONL.

What it writes, next to the checkpoint: `{checkpoint}/eval/results.json` (lm-eval's results, without
per-sample logs), then `stats.json` and `manifest.json` last (`StageOutput`). The identity is the checkpoint's
step and meta.json digest, the `evaluate` config digest, train.seq_len (the window length), the EOS token, a
fingerprint of val_docs.jsonl and a digest of the task YAMLs: a second run with all of them unchanged is skipped.

Tasks are the YAML files in `stages/eval_tasks/`. lm-eval reads a local file with `dataset_path: json` and
`dataset_kwargs.data_files`, but the path is only known at run time, so the folder is copied to a temporary
directory with its `${NAME}` placeholders filled in and given to `TaskManager(include_path=...)`; lm-eval's
own ~14,000 built-in tasks are indexed only when a requested task is not one of ours (that scan costs ~8 s).

The model is wrapped in `PipelineLM`, an `lm_eval.api.model.LM` implementing loglikelihood,
loglikelihood_rolling and generate_until for the plain-PyTorch `Transformer`, so no Hugging Face export is
needed. This module never imports prefect.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# No internet: the datasets/hub libraries read these when they are first imported, so set them before any
# import of lm_eval (which imports datasets). setdefault lets an operator with a hub mirror override them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from stages.checkpoints import dcp_reader, latest_checkpoint  # noqa: E402
from stages.config import ModelConfig, PipelineConfig, StorageConfig  # noqa: E402
from stages.model import Transformer  # noqa: E402
from stages.storage import (  # noqa: E402
    StageOutput,
    digest_of,
    exists,
    join,
    open_uri,
    raw_fingerprint,
    read_json,
    write_json,
)

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
EOS_TOKEN = "<|endoftext|>"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


# ----------------------------------------------------------------------------------------------- checkpoints


def load_model(
    ckpt: str, meta: dict, storage: StorageConfig | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Build the Transformer described by meta.json and load only the "model" entry of the DCP checkpoint.

    No process group is needed: `no_dist=True` reads every shard in this process (a checkpoint saved by N
    FSDP ranks loads into plain tensors). Only the keys we ask for are read, so the optimizer, trainer and
    loader state in the same checkpoint are never touched.
    """
    import torch.distributed.checkpoint as dcp

    model = Transformer(ModelConfig.model_validate(meta["model"]), int(meta["vocab_size"]))
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        # output.weight is the same tensor as tok_embeddings.weight; whether the trainer's state dict lists the
        # alias or not, loading tok_embeddings.weight fills both.
        state.pop("output.weight", None)
    reader = dcp_reader(ckpt, storage)
    wrapped = {"model": state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(wrapped, storage_reader=reader, no_dist=True)
    missing, unexpected = model.load_state_dict(wrapped["model"], strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def load_tokenizer(uri: str, storage: StorageConfig | None = None):
    from tokenizers import Tokenizer

    with open_uri(uri, "rb", storage) as f:
        return Tokenizer.from_str(f.read().decode("utf-8"))


def pick_device(device: str | torch.device | None, cfg: PipelineConfig) -> torch.device:
    """Explicit argument, else train.device unless "auto", else cuda when available, else cpu."""
    if device is None and cfg.train.device != "auto":
        device = cfg.train.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# -------------------------------------------------------------------------------------------------- LM class


class PipelineLM(LM):
    """lm-eval's model interface over the pipeline's Transformer and a `tokenizers.Tokenizer`.

    Sequences are right-padded in batches of `batch_size`; the model is causal, so positions before the padding
    never see it and no attention mask is needed. Inputs longer than `max_length` (the training seq_len) keep
    their last `max_length` tokens.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        max_length: int,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        eos_token: str = EOS_TOKEN,
        max_gen_toks: int = 256,
        info: dict | None = None,
    ):
        super().__init__()
        # lm-eval's LM exposes a read-only `device` property backed by `_device`
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {eos_token!r} token")
        self.eos_token = eos_token
        self.eos_token_id = int(eos_id)
        self.tokens_forwarded = 0  # real (unpadded) tokens through the model, for throughput
        self.model_seconds = 0.0  # wall time inside the request methods (tokenize, forward, score)
        self._info = dict(info or {})

    # lm-eval reads these
    @property
    def prefix_token_id(self) -> int:
        return self.eos_token_id

    def get_model_info(self) -> dict:
        return {"num_params": self.model.num_params(), "max_length": self.max_length, **self._info}

    # -- tokens
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention (HFLM._encode_pair): trailing spaces of the context move to the continuation,
        the pair is encoded whole and split at the context's length, so the continuation's first token is the
        one the model would really see; an empty context is replaced by the EOS prefix token."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -- forward
    @torch.inference_mode()
    def _forward_padded(self, seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), self.eos_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            batch[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        self.tokens_forwarded += sum(len(s) for s in seqs)
        return self.model(batch.to(self._device))

    def _score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding reproduces the continuation."""
        inputs, n_conts = [], []
        for ctx, cont in pairs:
            if not cont:
                inputs.append(None)
                n_conts.append(0)
                continue
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens is longer than max_length {self.max_length}")
            if not ctx:
                ctx = [self.prefix_token_id]
            inputs.append((ctx + cont)[-(self.max_length + 1) :][:-1])
            n_conts.append(len(cont))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        # longest first: similar lengths share a batch, and an out-of-memory error shows up at once
        order = sorted((i for i, x in enumerate(inputs) if x is not None), key=lambda i: -len(inputs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            logits = self._forward_padded([inputs[i] for i in idx])
            for row, i in enumerate(idx):
                n, length = n_conts[i], len(inputs[i])
                logprobs = F.log_softmax(logits[row, length - n : length].float(), dim=-1)
                target = torch.tensor(pairs[i][1], dtype=torch.long, device=logprobs.device)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all().item())
                results[i] = (float(total), greedy)
        return results

    # -- lm-eval request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        started = time.perf_counter()
        args = [req.args for req in requests]
        results = self._score_tokens([self._encode_pair(c, x) for c, x in args])
        self.model_seconds += time.perf_counter() - started
        for (context, continuation), res in zip(args, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # All windows of all documents go through one batched pass, then are summed per document.
        started = time.perf_counter()
        owners, windows = [], []
        for n, req in enumerate(requests):
            for w in self.rolling_windows(req.args[0]):
                owners.append(n)
                windows.append(w)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self._score_tokens(windows)):
            totals[owner] += ll
        self.model_seconds += time.perf_counter() - started
        for req, ll in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding without a KV cache: every step re-runs the last `max_length` tokens of each row."""
        started = time.perf_counter()
        outputs: list[str] = [""] * len(requests)
        jobs = []
        for n, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if self.eos_token not in until:
                until.append(self.eos_token)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            prompt = self.tok_encode(context) if context else [self.prefix_token_id]
            jobs.append({"n": n, "tokens": prompt, "start": len(prompt), "until": until, "max_new": max_new})
        for start in range(0, len(jobs), self.batch_size):
            active = [j for j in jobs[start : start + self.batch_size] if j["max_new"] > 0]
            while active:
                seqs = [j["tokens"][-self.max_length :] for j in active]
                logits = self._forward_padded(seqs)
                still = []
                for row, job in enumerate(active):
                    nxt = int(logits[row, len(seqs[row]) - 1].argmax().item())
                    job["tokens"].append(nxt)
                    generated = job["tokens"][job["start"] :]
                    text = self.tok_decode(generated)
                    done = nxt == self.eos_token_id or len(generated) >= job["max_new"]
                    if not done and not any(s in text for s in job["until"]):
                        still.append(job)
                active = still
            for job in jobs[start : start + self.batch_size]:
                text = self.tok_decode(job["tokens"][job["start"] :])
                for stop in job["until"]:
                    text = text.split(stop, 1)[0]
                outputs[job["n"]] = text
                self.cache_hook.add_partial("generate_until", requests[job["n"]].args, text)
        self.model_seconds += time.perf_counter() - started
        return outputs


# ------------------------------------------------------------------------------------------------ the stage


def render_tasks(dest: Path, values: dict[str, str], source: Path = TASKS_DIR) -> Path:
    """Copy the task folder to `dest`, replacing `${NAME}` in YAML files by JSON-quoted `values[NAME]`
    (whole-line comments are left alone)."""
    for path in sorted(source.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):

            def fill(match: re.Match, where: Path = path) -> str:
                if match.group(1) not in values:
                    raise KeyError(f"{where}: unknown placeholder ${{{match.group(1)}}} (known: {sorted(values)})")
                return json.dumps(values[match.group(1)])

            lines = path.read_text().splitlines(keepends=True)
            target.write_text(
                "".join(line if line.lstrip().startswith("#") else _PLACEHOLDER.sub(fill, line) for line in lines)
            )
        else:
            shutil.copy2(path, target)
    return dest


def tasks_digest(source: Path = TASKS_DIR) -> str:
    files = {
        str(p.relative_to(source)): p.read_text()
        for p in sorted(source.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }
    return digest_of(files)


def write_heldout(src: str, dest: Path, max_docs: int | None, storage: StorageConfig | None) -> int:
    """Copy the first `max_docs` non-empty held-out documents to a local JSONL; returns how many."""
    n = 0
    with open_uri(src, "rb", storage) as fin, open(dest, "w", encoding="utf-8") as fout:
        for line in fin:
            if max_docs is not None and n >= max_docs:
                break
            if not line.strip():
                continue
            doc = json.loads(line)
            text = doc.get("text") or ""
            if not text.strip():
                continue
            fout.write(json.dumps({"id": str(doc.get("id", n)), "text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, anything else unknown goes through lm-eval's own serializer."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return _clean(obj.item())
        except (TypeError, ValueError):
            pass
    return _clean(lm_utils.handle_non_serializable(obj))


def summarize(results: dict) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value}} from lm-eval's results; stderr, aliases and sample_len (the document count
    lm-eval adds) dropped, the default filter's
    ",none" suffix removed (other filters keep theirs, e.g. "exact_match,strict-match")."""
    metrics: dict[str, dict[str, float | None]] = {}
    for task, values in (results.get("results") or {}).items():
        row = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if key == "alias" or key == "sample_len" or name.endswith("_stderr") or isinstance(value, (str, bool)):
                continue
            if not isinstance(value, (int, float)):
                continue
            value = float(value)
            row[name if filt in ("", "none") else key] = value if math.isfinite(value) else None
        metrics[task] = row
    return metrics


def _task_manager(include: Path, tasks: Iterable[str]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    return TaskManager(include_path=str(include), include_defaults=True)


def run(cfg: PipelineConfig, log: Callable[[str], None] = print, device: str | torch.device | None = None) -> dict:
    """Evaluate the latest complete checkpoint; skip when its eval/ output is current."""
    started = time.time()
    root, storage = cfg.storage.root, cfg.storage
    latest = latest_checkpoint(root, storage)
    if latest is None:
        raise FileNotFoundError(
            f"no complete checkpoint (a step-*/ folder with meta.json) under {join(root, 'checkpoints')}"
        )
    step, ckpt, meta = latest
    val_uri = join(root, "tokens", "val_docs.jsonl")
    if not exists(val_uri, storage):
        raise FileNotFoundError(f"{val_uri}: held-out documents not found (run the tokenize stage)")
    tokenizer_uri = meta.get("tokenizer_uri") or join(root, "tokenizer", "tokenizer.json")
    if not exists(tokenizer_uri, storage):
        log(f"evaluate: {tokenizer_uri} (from meta.json) not found, using {root}/tokenizer/tokenizer.json")
        tokenizer_uri = join(root, "tokenizer", "tokenizer.json")

    out = StageOutput("evaluate", join(ckpt, "eval"), storage)
    identity = {
        "checkpoint_step": step,
        "meta": digest_of(meta),
        "config": cfg.section_digest("evaluate"),
        "seq_len": cfg.train.seq_len,  # the rolling window length changes the numbers
        "eos_token": cfg.tokenizer.eos_token,  # the prefix token of every rolling window
        "val_docs": raw_fingerprint(val_uri, storage),
        "task_yaml": tasks_digest(),
    }
    if out.is_current(identity):
        stats = read_json(out.path("stats.json"), storage)
        log(f"evaluate: step {step} already evaluated at {out.uri}, skipping")
        return {**stats, "skipped": True}
    out.reset()

    dev = pick_device(device, cfg)
    log(f"evaluate: checkpoint {ckpt} (step {step}) on {dev}")
    model = load_model(ckpt, meta, storage, dev)
    tokenizer = load_tokenizer(tokenizer_uri, storage)
    if tokenizer.get_vocab_size() > model.vocab_size:
        raise ValueError(f"{tokenizer_uri}: {tokenizer.get_vocab_size()} tokens but the model has {model.vocab_size}")
    lm = PipelineLM(
        model,
        tokenizer,
        max_length=cfg.train.seq_len,
        batch_size=cfg.evaluate.batch_size,
        device=dev,
        eos_token=cfg.tokenizer.eos_token,
        info={"checkpoint": ckpt, "step": step, "tokenizer_uri": tokenizer_uri},
    )

    import lm_eval

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        docs_path = Path(tmp) / "heldout_docs.jsonl"
        n_docs = write_heldout(val_uri, docs_path, cfg.evaluate.max_docs, storage)
        if n_docs == 0:
            raise ValueError(f"{val_uri}: no non-empty documents")
        include = render_tasks(
            Path(tmp) / "tasks",
            {
                "HELDOUT_DOCS": str(docs_path),
                "DATASETS_CACHE": str(Path(tmp) / "datasets_cache"),
            },
        )
        log(f"evaluate: {n_docs} held-out docs, tasks {cfg.evaluate.tasks}")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(cfg.evaluate.tasks),
            task_manager=_task_manager(include, cfg.evaluate.tasks),
            batch_size=cfg.evaluate.batch_size,
            device=str(dev),
            log_samples=False,
            bootstrap_iters=1000,
        )
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    results.pop("samples", None)
    # the run-time copies are gone once the temp dir is: record where the documents came from instead
    results = _clean(results)
    results = json.loads(
        json.dumps(results)
        .replace(json.dumps(str(docs_path))[1:-1], json.dumps(val_uri)[1:-1])
        .replace(json.dumps(tmp)[1:-1], "<tmp>")
    )
    results["heldout"] = {"uri": val_uri, "docs": n_docs, "max_docs": cfg.evaluate.max_docs}
    write_json(out.path("results.json"), results, storage)

    metrics = summarize(results)
    stats = {
        "skipped": False,
        "checkpoint": ckpt,
        "step": step,
        "metrics": metrics,
        "docs": n_docs,
        "tokens": lm.tokens_forwarded,
        "device": str(dev),
        "seconds": round(time.time() - started, 3),
        # model throughput: tokens through the model per second spent in the LM's request methods
        "tokens_per_s": round(lm.tokens_forwarded / lm.model_seconds, 1) if lm.model_seconds > 0 else None,
    }
    out.commit(identity, counts={"docs": n_docs, "tokens": lm.tokens_forwarded}, stats=stats, files=["results.json"])
    for task, values in metrics.items():
        log(
            f"evaluate: {task}: "
            + ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in values.items())
        )
    return stats
