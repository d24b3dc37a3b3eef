"""Evaluate the latest complete checkpoint with lm-evaluation-harness, in-process and offline.

What it reads (all through the storage layer, so local folders and s3:// work alike):
- the run folder's `step-NNNNNN/` (the train stage's output, its `run` input): torch.distributed.checkpoint (DCP)
  directories. Only those with a `meta.json` are complete; the one with the highest step is evaluated;
- the tokenizer named by `meta.json`'s `tokenizer_uri`;
- `val_docs.jsonl` of the dataset the run trained on (`meta.json`'s `data_uri`): the validation split's
  documents, of which the first `evaluate.max_docs` are copied into a local temporary JSONL (or, with
  `evaluate.heldout`, that file's documents: one set for every run, as an ablation needs).

What it writes, next to the checkpoint: `{checkpoint}/eval/results.json` (lm-eval's results, without
per-sample logs), then `stats.json` and `manifest.json` last (`StageOutput`). The identity is the checkpoint's
step and meta.json digest, the `evaluate` config digest, train.seq_len (the window length), the EOS token, a
fingerprint of val_docs.jsonl and a digest of the task YAMLs: a second run with all of them unchanged is skipped.

Tasks are the YAML files in `stages/evaluate/task_yaml/` and, with `evaluate.suite: standard` (or any of them named
in evaluate.tasks), the standard benchmarks: lm-eval's own definitions on local data (stages/evaluate/benchmarks.py),
scored on their first `evaluate.suite_limit` examples; each result names lm-eval's task version and the data file's
sha256, which are also in the identity. lm-eval reads a local file with `dataset_path: json` and
`dataset_kwargs.data_files`, but the path is only known at run time, so the folder is copied to a temporary
directory with its `${NAME}` placeholders filled in and given to `TaskManager(include_path=...)`; lm-eval's
own ~14,000 built-in tasks are indexed only when a requested task is not one of ours (that scan costs ~8 s).

The model is wrapped in `PipelineLM`, an `lm_eval.api.model.LM` implementing loglikelihood,
loglikelihood_rolling and generate_until for the plain-PyTorch `Transformer`, so no Hugging Face export is
needed. This module never imports prefect.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.core import failpoints
from stages.core.config import PipelineConfig, StorageConfig
from stages.core.stage import Artifact, Force, OnProgress, Stage, Status, forced_now, mark_forced, package_version
from stages.core.storage import StageOutput, digest_of, exists, join, raw_fingerprint, read_json, write_json
from stages.evaluate import benchmarks
from stages.evaluate.lm import PipelineLM, load_base_model, load_model, load_tokenizer, pick_device
from stages.evaluate.tasks import (
    _clean,
    _task_manager,
    available_tasks,
    prepare_tasks,
    requested_tasks,
    summarize,
    tasks_digest,
)
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


def compare(metrics: dict, previous: dict | None, base: dict | None = None, label: str = "checkpoint") -> list[dict]:
    """One row per task and metric: its value, the previously evaluated checkpoint's, and the change. With `base`
    (the run's base model: {uri, metrics}), the base model's rows come first and each row has its change from
    them; rows of the standard benchmarks carry chance and the published GPT-2 124M and Pythia-160M figures."""
    before_all = (previous or {}).get("metrics", {})
    base_all = (base or {}).get("metrics", {})
    rows = [row(task, name, value, "base model") for task, name, value in _flat(base_all)]
    for task, name, value in _flat(metrics):
        before = before_all.get(task, {}).get(name)
        entry = row(task, name, value, label)
        entry.update(previous=before, change=_minus(value, before),
                     previous_step=(previous or {}).get("step") if before is not None else None)  # fmt: skip
        if base:
            entry["change_from_base"] = _minus(value, base_all.get(task, {}).get(name))
        rows.append(entry)
    columns = dict.fromkeys(key for r in rows for key in r)  # (every row has every column, in one order)
    return [{key: r.get(key) for key in columns} for r in rows]


def row(task: str, metric: str, value, model: str) -> dict:
    scale = benchmarks.for_scale(task, metric) if task in benchmarks.BY_TASK else {}
    return {"model": model, "task": task, "metric": metric, "value": value, **scale}


def _flat(metrics: dict):
    return [(task, name, value) for task, values in sorted(metrics.items()) for name, value in sorted(values.items())]


def _minus(a, b):
    return a - b if a is not None and b is not None else None


def record_history(run: str, step: int, metrics: dict, storage: StorageConfig | None) -> dict | None:
    """Add this evaluation to the run's history; returns the latest earlier one ({step, metrics}) or None.
    Kept beside, not inside, the checkpoints, which keep_last may delete."""
    uri = join(run, HISTORY)
    history = read_json(uri, storage) if exists(uri, storage) else {}
    earlier = sorted((int(k) for k in history if int(k) < step), reverse=True)
    history[str(step)] = metrics
    write_json(uri, history, storage)
    return {"step": earlier[0], "metrics": history[str(earlier[0])]} if earlier else None


def heldout_uri(cfg: PipelineConfig, ckpt: str, meta: dict) -> str:
    """evaluate.heldout, else the validation documents of the data the checkpoint trained on."""
    if cfg.evaluate.heldout:
        if not exists(cfg.evaluate.heldout, cfg.storage):
            raise FileNotFoundError(f"evaluate.heldout: {cfg.evaluate.heldout} does not exist")
        return cfg.evaluate.heldout
    uri = join(meta["data_uri"], "val_docs.jsonl")
    if not exists(uri, cfg.storage):
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
        **benchmark_identity(cfg),
    }


def benchmark_identity(cfg: PipelineConfig) -> dict:
    """The standard tasks' definitions and data files, when any is requested (their sha256: ~15 MB, read once)."""
    data = cfg.evaluate.benchmark_data
    suite = [t for t in requested_tasks(cfg) if t in benchmarks.BY_TASK]
    if not suite:
        return {}
    present = [t for t in suite if not benchmarks.missing(data, [t])]  # (a missing one is skipped, see run_harness)
    return {
        "benchmarks": benchmarks.definitions_digest(),
        "benchmark_data": {t: benchmarks.file_sha256(benchmarks.data_file(data, t)) for t in present},
    }


def check(cfg: PipelineConfig) -> None:
    """evaluate.suite's data files are all there (a task named in evaluate.tasks alone may be skipped)."""
    if cfg.evaluate.suite:
        benchmarks.check(cfg.evaluate.benchmark_data, benchmarks.SUITES[cfg.evaluate.suite])


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
    """One checkpoint's evaluation, or its recorded stats when its eval/ output is current; for a run started from
    a Hugging Face base model, the base model's evaluation too (once per run), which the stats carry as `base`."""
    storage = cfg.storage
    val_uri = heldout_uri(cfg, ckpt, meta)
    base = base_model_of(meta)
    base_stats = evaluate_base(cfg, base, ckpt, meta, val_uri, log, device, force) if base else None

    def load(dev: torch.device):
        return load_model(ckpt, meta, storage, dev)

    def record(stats: dict) -> None:
        stats["previous"] = record_history(run_of(ckpt), step, stats["metrics"], storage)
        if base_stats:
            stats["base"] = {"uri": base["uri"], "metrics": base_stats["metrics"]}

    scored = Scored(output(ckpt, storage), eval_identity(cfg, step, meta, val_uri), f"checkpoint {ckpt} (step {step})",
                    load, {"checkpoint": ckpt, "step": step})  # fmt: skip
    return score(cfg, scored, meta["tokenizer_uri"], val_uri, log, device, force, record)


def base_model_of(meta: dict) -> dict | None:
    """The Hugging Face directory a run started from ({uri, files}), as its identity records it."""
    return ((meta.get("run_identity") or {}).get("inputs") or {}).get("base_model")


def evaluate_base(cfg: PipelineConfig, base: dict, ckpt: str, meta: dict, val_uri: str, log, device, force) -> dict:
    """The base model itself, on the same tasks, documents and tokenizer: the score continued pretraining starts
    from. Kept in the run folder's base_eval/ (its identity: the base model's files and the evaluation's)."""
    storage = cfg.storage
    out = StageOutput("evaluate", join(run_of(ckpt), "base_eval"), storage)

    def load(dev: torch.device):
        return load_base_model(base["uri"], storage, dev)

    identity = eval_identity(cfg, 0, {"base_model": base}, val_uri)
    scored = Scored(out, identity, f"base model {base['uri']}", load, {"checkpoint": base["uri"], "step": 0})
    return score(cfg, scored, meta["tokenizer_uri"], val_uri, log, device, force)


@dataclass
class Scored:
    """What one evaluation scores and where it goes: its output, identity, a name for the log, how its model loads
    and the fields its stats start with."""

    out: StageOutput
    identity: dict
    what: str
    load: Callable[[torch.device], torch.nn.Module]
    fields: dict


def score(cfg: PipelineConfig, s: Scored, tokenizer_uri: str, val_uri: str, log, device, force: Force,
          before_commit: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Run the harness on one model, or return its recorded stats when its output is current."""
    started = time.time()
    storage = cfg.storage
    forced = forced_now(s.out.uri, force, storage, log, "evaluate")
    if s.out.is_current(s.identity) and not forced:
        stats = read_json(s.out.path("stats.json"), storage)
        log(f"evaluate: {s.what} already evaluated at {s.out.uri}, skipping")
        return {**stats, "skipped": True}
    s.out.reset()
    if forced:
        mark_forced(s.out.uri, force, storage)
    dev = pick_device(device, cfg)
    log(f"evaluate: {s.what} on {dev}")
    lm = harness_model(cfg, s.load(dev), tokenizer_uri, s.fields, dev)
    results, n_docs, skipped = run_harness(cfg, lm, val_uri, dev, log)
    write_json(s.out.path("results.json"), results, storage)
    metrics = summarize(results)
    stats = {
        "skipped": False,
        **s.fields,
        "metrics": metrics,
        "tasks_skipped": skipped,
        "benchmarks": results.get("benchmarks", {}),
        "benchmarks_limit": results.get("benchmarks_limit"),
        "truncated_continuations": lm.truncated,
        "docs": n_docs,
        "tokens": lm.tokens_forwarded,
        "device": str(dev),
        "seconds": round(time.time() - started, 3),
        # model throughput: tokens through the model per second spent in the LM's request methods
        "tokens_per_s": round(lm.tokens_forwarded / lm.model_seconds, 1) if lm.model_seconds > 0 else None,
    }
    if before_commit:
        before_commit(stats)
    failpoints.hold("evaluate.commit")
    counts = {"docs": n_docs, "tokens": lm.tokens_forwarded}
    s.out.commit(s.identity, counts=counts, stats=stats, files=["results.json"])
    for task, values in metrics.items():
        shown = ", ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan" for k, v in values.items())
        log(f"evaluate: {task}: {shown}")
    return stats


def harness_model(cfg: PipelineConfig, model, tokenizer_uri: str, info: dict, dev: torch.device) -> PipelineLM:
    """A model and the run's tokenizer as lm-eval's LM."""
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
        info={**info, "tokenizer_uri": tokenizer_uri},
    )


def run_harness(cfg: PipelineConfig, lm: PipelineLM, val_uri: str, dev: torch.device, log) -> tuple[dict, int, dict]:
    """lm_eval.simple_evaluate over the tasks that can run here: its results (cleaned, with where the held-out
    documents came from), the number of held-out documents and the tasks skipped, with the reason."""
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp, bootstrap_in_process():
        include, docs_path, n_docs = prepare_tasks(cfg, val_uri, Path(tmp))
        requested = requested_tasks(cfg)
        tasks, skipped = available_tasks(include, requested)
        for name, reason in skipped.items():
            log(f"evaluate: {name} skipped: {reason}")
        if not tasks:
            raise ValueError(f"evaluate.tasks {requested}: none can run here ({skipped})")
        log(f"evaluate: {n_docs} held-out docs, tasks {tasks}")
        suite = [t for t in tasks if t in benchmarks.BY_TASK]
        groups = [([t for t in tasks if t not in suite], None), (suite, cfg.evaluate.suite_limit)]
        results = merge_results(
            lm_eval.simple_evaluate(
                model=lm,
                tasks=group,
                task_manager=_task_manager(include, group),
                batch_size=cfg.evaluate.batch_size,
                device=str(dev),
                log_samples=False,
                bootstrap_iters=1000,
                limit=limit,  # (the first N examples of each benchmark task; never the held-out documents)
            )
            for group, limit in groups
            if group
        )
    results.pop("samples", None)
    if suite:
        results["benchmarks"] = benchmarks.provenance(cfg.evaluate.benchmark_data, suite, results.get("versions", {}))
        results["benchmarks_limit"] = cfg.evaluate.suite_limit
    # the run-time copies are gone once the temp dir is: record where the documents came from instead
    results = json.loads(
        json.dumps(_clean(results))
        .replace(json.dumps(str(docs_path))[1:-1], json.dumps(val_uri)[1:-1])
        .replace(json.dumps(tmp)[1:-1], "<tmp>")
    )
    results["heldout"] = {"uri": val_uri, "docs": n_docs, "max_docs": cfg.evaluate.max_docs}
    results["tasks_skipped"] = skipped
    return results, n_docs, skipped


@contextlib.contextmanager
def bootstrap_in_process():
    """lm-eval bootstraps a perplexity's stderr (LAMBADA's) in a multiprocessing Pool of one process per core,
    forked from this one: in a Prefect flow run the pool never returns (Prefect's at-fork handler raises in each
    child), and forking a process that holds a CUDA context is unsafe anyway. Its DISABLE_MULTIPROC switch keeps
    the resampling here (seconds for all 5,153 LAMBADA passages)."""
    before = os.environ.get(_NO_POOL)
    os.environ[_NO_POOL] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_NO_POOL, None)
        else:
            os.environ[_NO_POOL] = before


_NO_POOL = "DISABLE_MULTIPROC"
_PER_TASK = ("results", "versions", "configs", "n-shot", "higher_is_better", "n-samples", "group_subtasks")


def merge_results(runs) -> dict:
    """One lm-eval results dict from several simple_evaluate calls (each its own tasks): per-task sections
    joined, the rest (config, timing) from the first."""
    merged: dict = {}
    for results in runs:
        if results is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        if not merged:
            merged = results
            continue
        for key in _PER_TASK:
            if key in results:
                merged.setdefault(key, {}).update(results[key])
    return merged


class EvaluateStage(Stage):
    """Evaluation through the stage contract: the run folder of its `run` input holds the checkpoints; the latest
    complete one is evaluated (and with every_steps the kept ones at its multiples). Its output is that
    checkpoint's `eval/`, skipped when its manifest holds the identity (`eval_identity`)."""

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> dict:
        step, ckpt, meta = pick_checkpoint(cfg, upstream["run"].uri, None)
        return eval_identity(cfg, step, meta, heldout_uri(cfg, ckpt, meta))

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
    """Every metric beside the previously evaluated checkpoint's (and the base model's, first, when there is one)."""
    skipped = stats.get("tasks_skipped") or "none"
    where = f"step {stats['step']} of {stats['checkpoint']}; skipped tasks: {skipped}"
    if stats.get("base"):
        where += f"; the first rows are the base model {stats['base']['uri']}"
    if stats.get("benchmarks"):
        limit = stats.get("benchmarks_limit")
        where += (
            f"; standard benchmarks on {f'their first {limit} examples' if limit else 'all their examples'} "
            "(validation splits), lm-eval's definitions: a model this small scores near chance; the published "
            "GPT-2 124M and Pythia-160M figures (zero-shot lm-eval, test splits where there is one) are for scale"
        )
    rows = compare(stats["metrics"], stats.get("previous"), stats.get("base"), f"step {stats['step']}")
    return [Artifact("table", "eval-metrics", rows, where)]


STAGE = EvaluateStage(
    name="evaluate",
    folder="train",  # (inside the run's checkpoints: step-N/eval/)
    package=__package__,
    sections=("evaluate",),
    build=None,  # (run: lm-eval over the checkpoints)
    needs=("run",),
    check=check,
)
