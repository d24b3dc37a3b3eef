"""Evaluate the latest complete checkpoint with lm-evaluation-harness, in-process and offline.

What it reads (all through the storage layer, so local folders and s3:// work alike):
- the run folder's `step-NNNNNN/` (`stages.launch.run_uri`): torch.distributed.checkpoint (DCP) directories.
  Only those with a `meta.json` are complete; the one with the highest step is evaluated;
- the tokenizer named by `meta.json`'s `tokenizer_uri`;
- `val_docs.jsonl` of the dataset the run trained on (`meta.json`'s `data_uri`): the validation split's
  documents, of which the first `evaluate.max_docs` are copied into a local temporary JSONL.

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

from stages import failpoints  # noqa: E402
from stages.checkpoints import complete_checkpoints, dcp_reader, latest_checkpoint, run_of  # noqa: E402
from stages.config import ModelConfig, PipelineConfig, StorageConfig  # noqa: E402
from stages.launch import run_uri  # noqa: E402
from stages.model import KVCache, Transformer  # noqa: E402
from stages.stage import Force, forced_now, mark_forced  # noqa: E402
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
        self.truncated = 0  # continuations longer than max_length, scored on their last max_length tokens
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
        """Sum of log p(continuation | context) and whether greedy decoding reproduces the continuation.

        A continuation longer than the window keeps its last max_length tokens scored and the rest as context
        (counted in `self.truncated`), where lm-eval's hf backend would slice its logits wrongly."""
        inputs, n_conts = [], []
        for n, (ctx, cont) in enumerate(pairs):
            if not cont:
                inputs.append(None)
                n_conts.append(0)
                continue
            if len(cont) > self.max_length:
                self.truncated += 1
                ctx, cont = ctx + cont[: -self.max_length], cont[-self.max_length :]
                pairs[n] = (ctx, cont)
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
        """Greedy decoding in batches with a KV cache: one prefill of the left-padded prompts, then one position per
        step. A prompt keeps its last max_length - max_gen_toks tokens (as lm-eval's hf backend does)."""
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
            max_new = min(int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context) if context else [self.prefix_token_id]
            prompt = prompt[-(self.max_length - max_new) :] or [self.prefix_token_id]
            jobs.append({"n": n, "prompt": prompt, "generated": [], "until": until, "max_new": max_new})
        # similar prompt lengths share a batch: less padding
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i]["prompt"]))
        for start in range(0, len(order), self.batch_size):
            batch = [jobs[i] for i in order[start : start + self.batch_size]]
            self._generate_batch([j for j in batch if j["max_new"] > 0])
            for job in batch:
                text = self.tok_decode(job["generated"])
                for stop in job["until"]:
                    text = text.split(stop, 1)[0]
                outputs[job["n"]] = text
                self.cache_hook.add_partial("generate_until", requests[job["n"]].args, text)
        self.model_seconds += time.perf_counter() - started
        return outputs

    @torch.inference_mode()
    def _generate_batch(self, batch: list[dict]) -> None:
        if not batch:
            return
        width = max(len(j["prompt"]) for j in batch)
        steps = max(j["max_new"] for j in batch)
        tokens = torch.full((len(batch), width), self.eos_token_id, dtype=torch.long)
        valid = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, job in enumerate(batch):
            tokens[row, width - len(job["prompt"]) :] = torch.tensor(job["prompt"], dtype=torch.long)
            valid[row, width - len(job["prompt"]) :] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model, len(batch), width + steps, self._device, dtype)
        logits = self.model(tokens.to(self._device), cache, positions.to(self._device), valid.to(self._device))
        self.tokens_forwarded += int(valid.sum())
        last = positions[:, -1].to(self._device)
        running = set(range(len(batch)))  # rows still generating; finished rows ride along, ignored
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)
            for row in sorted(running):
                job, token = batch[row], int(nxt[row])
                if token == self.eos_token_id:
                    running.discard(row)
                    continue
                job["generated"].append(token)
                text = self.tok_decode(job["generated"])
                if len(job["generated"]) >= job["max_new"] or any(s in text for s in job["until"]):
                    running.discard(row)
            if not running:
                break
            last = last + 1
            ones = torch.ones((len(batch), 1), dtype=torch.bool, device=self._device)
            logits = self.model(nxt[:, None], cache, last[:, None], ones)
            self.tokens_forwarded += len(running)


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


MC_CONTEXT_WORDS = 32
MC_CHOICE_WORDS = 8


def write_heldout_mc(docs_path: Path, dest: Path) -> int:
    """heldout_mc's questions from the held-out JSONL: a document's opening words, its true next 8 words and the
    8 words at the same place in three other documents; returns how many questions."""
    import hashlib

    docs = []
    with open(docs_path, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            words = doc["text"].split()
            if len(words) >= 8 + MC_CHOICE_WORDS:
                cut = min(MC_CONTEXT_WORDS, len(words) - MC_CHOICE_WORDS)
                docs.append((doc["id"], " ".join(words[:cut]), " ".join(words[cut : cut + MC_CHOICE_WORDS])))
    n = 0
    with open(dest, "w", encoding="utf-8") as out:
        if len(docs) < 4:
            return 0
        for i, (doc_id, context, answer) in enumerate(docs):
            others = [docs[(i + k) % len(docs)][2] for k in (1, 2, 3)]
            label = int(hashlib.sha256(str(doc_id).encode()).hexdigest(), 16) % 4
            choices = others[:label] + [answer] + others[label:]
            if len(set(choices)) < 4:  # a repeated passage would make two answers right
                continue
            out.write(json.dumps({"id": doc_id, "context": context, "choices": choices, "label": label}) + "\n")
            n += 1
    return n


def prepare_tasks(cfg: PipelineConfig, val_uri: str, tmp: Path) -> tuple[Path, Path, int]:
    """The task folder, rendered for this run under `tmp`: (include path, local held-out JSONL, documents)."""
    docs_path = tmp / "heldout_docs.jsonl"
    n_docs = write_heldout(val_uri, docs_path, cfg.evaluate.max_docs, cfg.storage)
    if n_docs == 0:
        raise ValueError(f"{val_uri}: no non-empty documents")
    write_heldout_mc(docs_path, tmp / "heldout_mc.jsonl")
    include = render_tasks(
        tmp / "tasks",
        {
            "HELDOUT_DOCS": str(docs_path),
            "HELDOUT_MC": str(tmp / "heldout_mc.jsonl"),
            "DATASETS_CACHE": str(tmp / "datasets_cache"),
        },
    )
    return include, docs_path, n_docs


def available_tasks(include: Path, tasks: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """The requested tasks that can run here, and for the others why not: lm-eval's standard suites need their
    datasets in the local Hugging Face cache (or a network), and a missing one is skipped, not fatal."""
    from lm_eval.tasks import get_task_dict

    manager = _task_manager(include, tasks)
    runnable, skipped = [], {}
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"evaluate.tasks: {unknown}: no such task here or in lm-eval")
    for name in tasks:
        try:
            get_task_dict([name], manager)  # loads the dataset: offline, from the cache or not at all
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many kinds; all mean "not here"
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            continue
        runnable.append(name)
    return runnable, skipped


def _task_manager(include: Path, tasks: Iterable[str]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    return TaskManager(include_path=str(include), include_defaults=True)


HISTORY = "eval_history.json"  # {step: {task: {metric: value}}} of every evaluated checkpoint of a run


def checkpoint_step(ckpt: str) -> int:
    return int(ckpt.rstrip("/").rsplit("step-", 1)[1])


def pick_checkpoint(cfg: PipelineConfig, checkpoint: str | None) -> tuple[int, str, dict]:
    storage = cfg.storage
    if checkpoint is None:
        where = run_uri(cfg)
        latest = latest_checkpoint(where, storage)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint (a step-*/ folder with meta.json) under {where}")
        return latest
    meta_uri = join(checkpoint.rstrip("/"), "meta.json")
    if not exists(meta_uri, storage):
        raise FileNotFoundError(f"{checkpoint}: no meta.json, not a complete checkpoint")
    meta = read_json(meta_uri, storage)
    return int(meta["step"]), checkpoint.rstrip("/"), meta


def compare(metrics: dict, previous: dict | None) -> list[dict]:
    """One row per task and metric: its value, the previously evaluated checkpoint's, and the change."""
    rows = []
    before_all = (previous or {}).get("metrics", {})
    for task, values in sorted(metrics.items()):
        for name, value in sorted(values.items()):
            before = before_all.get(task, {}).get(name)
            change = value - before if value is not None and before is not None else None
            rows.append(
                {
                    "task": task,
                    "metric": name,
                    "value": value,
                    "previous": before,
                    "previous_step": (previous or {}).get("step") if before is not None else None,
                    "change": change,
                }
            )
    return rows


def record_history(run: str, step: int, metrics: dict, storage: StorageConfig | None) -> dict | None:
    """Add this evaluation to the run's history; returns the latest earlier one ({step, metrics}) or None.
    Kept beside, not inside, the checkpoints, which keep_last may delete."""
    uri = join(run, HISTORY)
    history = read_json(uri, storage) if exists(uri, storage) else {}
    earlier = sorted((int(k) for k in history if int(k) < step), reverse=True)
    history[str(step)] = metrics
    write_json(uri, history, storage)
    return {"step": earlier[0], "metrics": history[str(earlier[0])]} if earlier else None


def heldout_uri(ckpt: str, meta: dict, storage: StorageConfig | None) -> str:
    uri = join(meta["data_uri"], "val_docs.jsonl")
    if not exists(uri, storage):
        raise FileNotFoundError(f"{uri}: the held-out documents of {ckpt}'s training data are not there")
    return uri


def output(ckpt: str, storage: StorageConfig | None) -> StageOutput:
    return StageOutput("evaluate", join(ckpt, "eval"), storage)


def eval_identity(cfg: PipelineConfig, step: int, meta: dict, val_uri: str) -> dict:
    return {
        "checkpoint_step": step,
        "meta": digest_of(meta),
        "config": cfg.section_digest("evaluate"),
        "seq_len": cfg.train.seq_len,  # the rolling window length changes the numbers
        "eos_token": cfg.tokenizer.eos_token,  # the prefix token of every rolling window
        "val_docs": raw_fingerprint(val_uri, cfg.storage),
        "task_yaml": tasks_digest(),
    }


def run(
    cfg: PipelineConfig,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    checkpoint: str | None = None,
    force: Force = False,
) -> dict:
    """Evaluate `checkpoint` (default: the latest complete one of this config's run, and with
    evaluate.every_steps first the kept checkpoints at multiples of it); skip when a checkpoint's eval/ output is
    current (unless `force`). The held-out documents are those of the data the checkpoint was trained on."""
    started = time.time()
    storage = cfg.storage
    step, ckpt, meta = pick_checkpoint(cfg, checkpoint)
    every = cfg.evaluate.every_steps
    if checkpoint is None and every:
        earlier = [uri for s, uri in complete_checkpoints(run_of(ckpt), storage) if s % every == 0 and s < step]
        for uri in earlier:
            run(cfg, log, device, checkpoint=uri, force=force)
        stats = run(cfg, log, device, checkpoint=ckpt, force=force)
        evaluated = [int(checkpoint_step(u)) for u in earlier] + [step]
        # seconds: the whole stage (every checkpoint evaluated), not the last evaluation's alone
        return {**stats, "evaluated_steps": evaluated, "seconds": round(time.time() - started, 3)}
    val_uri = heldout_uri(ckpt, meta, storage)
    tokenizer_uri = meta["tokenizer_uri"]
    out = output(ckpt, storage)
    identity = eval_identity(cfg, step, meta, val_uri)
    forced = forced_now(out.uri, force, storage, log, "evaluate")
    if out.is_current(identity) and not forced:
        stats = read_json(out.path("stats.json"), storage)
        log(f"evaluate: step {step} already evaluated at {out.uri}, skipping")
        return {**stats, "skipped": True}
    out.reset()
    if forced:
        mark_forced(out.uri, force, storage)

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
        include, docs_path, n_docs = prepare_tasks(cfg, val_uri, Path(tmp))
        tasks, skipped = available_tasks(include, cfg.evaluate.tasks)
        for name, reason in skipped.items():
            log(f"evaluate: {name} skipped: {reason}")
        if not tasks:
            raise ValueError(f"evaluate.tasks {cfg.evaluate.tasks}: none can run here ({skipped})")
        log(f"evaluate: {n_docs} held-out docs, tasks {tasks}")
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=_task_manager(include, tasks),
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
    results["tasks_skipped"] = skipped
    write_json(out.path("results.json"), results, storage)

    metrics = summarize(results)
    stats = {
        "skipped": False,
        "checkpoint": ckpt,
        "step": step,
        "metrics": metrics,
        "tasks_skipped": skipped,
        "truncated_continuations": lm.truncated,
        "docs": n_docs,
        "tokens": lm.tokens_forwarded,
        "device": str(dev),
        "seconds": round(time.time() - started, 3),
        # model throughput: tokens through the model per second spent in the LM's request methods
        "tokens_per_s": round(lm.tokens_forwarded / lm.model_seconds, 1) if lm.model_seconds > 0 else None,
    }
    stats["previous"] = record_history(run_of(ckpt), step, metrics, storage)
    failpoints.hold("evaluate.commit")
    out.commit(identity, counts={"docs": n_docs, "tokens": lm.tokens_forwarded}, stats=stats, files=["results.json"])
    for task, values in metrics.items():
        log(
            f"evaluate: {task}: "
            + ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in values.items())
        )
    return stats
