"""Evaluate the latest complete checkpoint with lm-evaluation-harness, in-process and offline.

What it reads (all through the storage layer, so local folders and s3:// work alike):
- the run folder's `step-NNNNNN/` (the train stage's output, its `run` input): torch.distributed.checkpoint (DCP)
  directories. Only those with a `meta.json` are complete; the one with the highest step is evaluated;
- the tokenizer named by `meta.json`'s `tokenizer_uri`;
- `val_docs.jsonl` of the dataset the run trained on (`meta.json`'s `data_uri`): the validation split's
  documents, of which the first `evaluate.max_docs` are copied into a local temporary JSONL.

What it writes, next to the checkpoint: `{checkpoint}/eval/results.json` (lm-eval's results, without
per-sample logs), then `stats.json` and `manifest.json` last (`StageOutput`). The identity is the checkpoint's
step and meta.json digest, the `evaluate` config digest, train.seq_len (the window length), the EOS token, a
fingerprint of val_docs.jsonl and a digest of the task YAMLs: a second run with all of them unchanged is skipped.

Tasks are the YAML files in `stages/evaluate/task_yaml/`. lm-eval reads a local file with `dataset_path: json` and
`dataset_kwargs.data_files`, but the path is only known at run time, so the folder is copied to a temporary
directory with its `${NAME}` placeholders filled in and given to `TaskManager(include_path=...)`; lm-eval's
own ~14,000 built-in tasks are indexed only when a requested task is not one of ours (that scan costs ~8 s).

The model is wrapped in `PipelineLM`, an `lm_eval.api.model.LM` implementing loglikelihood,
loglikelihood_rolling and generate_until for the plain-PyTorch `Transformer`, so no Hugging Face export is
needed. This module never imports prefect.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stages.core import failpoints
from stages.core.config import PipelineConfig, StorageConfig
from stages.core.stage import Artifact, Force, OnProgress, Stage, Status, forced_now, mark_forced, package_version
from stages.core.storage import StageOutput, digest_of, exists, join, raw_fingerprint, read_json, write_json
from stages.evaluate.lm import PipelineLM, load_model, load_tokenizer, pick_device
from stages.evaluate.tasks import _clean, _task_manager, available_tasks, prepare_tasks, summarize, tasks_digest
from stages.train.checkpoints import complete_checkpoints, latest_checkpoint, run_of

HISTORY = "eval_history.json"  # {step: {task: {metric: value}}} of every evaluated checkpoint of a run


def checkpoint_step(ckpt: str) -> int:
    return int(ckpt.rstrip("/").rsplit("step-", 1)[1])


def pick_checkpoint(cfg: PipelineConfig, run: str | None, checkpoint: str | None) -> tuple[int, str, dict]:
    """`checkpoint` (its step, URI and meta.json), else the latest complete one in the run folder `run`."""
    storage = cfg.storage
    if checkpoint is None:
        latest = latest_checkpoint(run, storage)
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint (a step-*/ folder with meta.json) under {run}")
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
        "code": package_version(__package__, exclude=("samples.py",)),  # (the train stage's look at a checkpoint)
        "checkpoint_step": step,
        "meta": digest_of(meta),
        "config": cfg.section_digest("evaluate"),
        "seq_len": cfg.train.seq_len,  # the rolling window length changes the numbers
        "eos_token": cfg.tokenizer.eos_token,  # the prefix token of every rolling window
        "val_docs": raw_fingerprint(val_uri, cfg.storage),
        "task_yaml": tasks_digest(),
    }


def evaluate(
    cfg: PipelineConfig,
    run: str | None,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    checkpoint: str | None = None,
    force: Force = False,
) -> dict:
    """Evaluate `checkpoint` (default: the latest complete one of the run folder `run`, and with
    evaluate.every_steps first the kept checkpoints at multiples of it); skip when a checkpoint's eval/ output is
    current (unless `force`). The held-out documents are those of the data the checkpoint was trained on."""
    started = time.time()
    step, ckpt, meta = pick_checkpoint(cfg, run, checkpoint)
    every = cfg.evaluate.every_steps
    if checkpoint is None and every:
        kept = complete_checkpoints(run_of(ckpt), cfg.storage)
        earlier = [uri for s, uri in kept if s % every == 0 and s < step]
        for uri in earlier:
            evaluate_checkpoint(cfg, *pick_checkpoint(cfg, None, uri), log, device, force)
        stats = evaluate_checkpoint(cfg, step, ckpt, meta, log, device, force)
        evaluated = [int(checkpoint_step(u)) for u in earlier] + [step]
        # seconds: the whole stage (every checkpoint evaluated), not the last evaluation's alone
        return {**stats, "evaluated_steps": evaluated, "seconds": round(time.time() - started, 3)}
    return evaluate_checkpoint(cfg, step, ckpt, meta, log, device, force)


def evaluate_checkpoint(cfg: PipelineConfig, step: int, ckpt: str, meta: dict, log, device, force: Force) -> dict:
    """One checkpoint's evaluation, or its recorded stats when its eval/ output is current."""
    started = time.time()
    storage = cfg.storage
    val_uri = heldout_uri(ckpt, meta, storage)
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
    lm = harness_model(cfg, ckpt, step, meta, dev)
    results, n_docs, skipped = run_harness(cfg, lm, val_uri, dev, log)
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
        shown = ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in values.items())
        log(f"evaluate: {task}: {shown}")
    return stats


def harness_model(cfg: PipelineConfig, ckpt: str, step: int, meta: dict, dev: torch.device) -> PipelineLM:
    """The checkpoint's model and tokenizer as lm-eval's LM."""
    model = load_model(ckpt, meta, cfg.storage, dev)
    tokenizer_uri = meta["tokenizer_uri"]
    tokenizer = load_tokenizer(tokenizer_uri, cfg.storage)
    if tokenizer.get_vocab_size() > model.vocab_size:
        raise ValueError(f"{tokenizer_uri}: {tokenizer.get_vocab_size()} tokens but the model has {model.vocab_size}")
    return PipelineLM(
        model,
        tokenizer,
        max_length=cfg.train.seq_len,
        batch_size=cfg.evaluate.batch_size,
        device=dev,
        eos_token=cfg.tokenizer.eos_token,
        info={"checkpoint": ckpt, "step": step, "tokenizer_uri": tokenizer_uri},
    )


def run_harness(cfg: PipelineConfig, lm: PipelineLM, val_uri: str, dev: torch.device, log) -> tuple[dict, int, dict]:
    """lm_eval.simple_evaluate over the tasks that can run here: its results (cleaned, with where the held-out
    documents came from), the number of held-out documents and the tasks skipped, with the reason."""
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
    results = json.loads(
        json.dumps(_clean(results))
        .replace(json.dumps(str(docs_path))[1:-1], json.dumps(val_uri)[1:-1])
        .replace(json.dumps(tmp)[1:-1], "<tmp>")
    )
    results["heldout"] = {"uri": val_uri, "docs": n_docs, "max_docs": cfg.evaluate.max_docs}
    results["tasks_skipped"] = skipped
    return results, n_docs, skipped


class EvaluateStage(Stage):
    """Evaluation through the stage contract: the run folder of its `run` input holds the checkpoints; the latest
    complete one is evaluated (and with every_steps the kept ones at its multiples). Its output is that
    checkpoint's `eval/`, skipped when its manifest holds the identity (`eval_identity`)."""

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> dict:
        step, ckpt, meta = pick_checkpoint(cfg, upstream["run"].uri, None)
        return eval_identity(cfg, step, meta, heldout_uri(ckpt, meta, cfg.storage))

    def output(self, cfg: PipelineConfig, upstream: dict[str, StageOutput], identity: dict | None = None):
        return output(pick_checkpoint(cfg, upstream["run"].uri, None)[1], cfg.storage)

    def after(self, upstream: str) -> str:
        return f"after {upstream}"  # (a run that trains writes a checkpoint, which is then evaluated)

    def lock_uri(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> str:
        return upstream["run"].uri  # (the evaluations of every checkpoint of the run)

    def status(self, cfg: PipelineConfig, upstream: dict[str, StageOutput], forced: bool) -> Status:
        out = self.output(cfg, upstream)
        if forced:
            return Status("run", "forced", out.uri)
        if out.is_current(self.identity(cfg, upstream)):
            return Status("skip", "up to date", out.uri)
        return Status("run", "not evaluated with this config" if out.manifest() else "never evaluated", out.uri)

    def run(self, cfg, upstream, log=print, force: Force = False, progress: OnProgress | None = None) -> dict:
        return evaluate(cfg, upstream["run"].uri, log, force=force)

    def artifacts(self, cfg: PipelineConfig, stats: dict) -> list[Artifact]:
        return evaluation_artifacts(stats)


def evaluation_artifacts(stats: dict) -> list[Artifact]:
    """Every metric beside the previously evaluated checkpoint's."""
    skipped = stats.get("tasks_skipped") or "none"
    where = f"step {stats['step']} of {stats['checkpoint']}; skipped tasks: {skipped}"
    return [Artifact("table", "eval-metrics", compare(stats["metrics"], stats.get("previous")), where)]


STAGE = EvaluateStage(
    name="evaluate",
    folder="train",  # (inside the run's checkpoints: step-N/eval/)
    package=__package__,
    sections=("evaluate",),
    build=None,  # (run: lm-eval over the checkpoints)
    needs=("run",),
)
