"""Launch distributed training: torchrun over `stages.train.worker`, streamed, parsed, skipped when already done.

`STAGE` (a `TrainStage`) is the train stage of stages/pipeline.py: its run resolves the config against its input
(the tokenize stage's output, unless train.data names one), calls `run_training`, then draws the loss curve and
the final checkpoint's samples. `run_training(cfg)` (also what the tests and benches call, with train.data set)
never imports torch: the training itself runs in torchrun's children, so the caller stays light and a crash
there cannot take the orchestrator down with it.

- The config goes to the children as a JSON file WITHOUT the storage secrets; credentials and the endpoint go
  through the environment (`storage.storage_env`), where s3fs, botocore and obstore read them.
- Every line the children print is handed to `on_line` as it arrives (stdout and stderr merged). Rank 0 prints
  `METRIC {json}` once per step and `SUMMARY {json}` at the end; both are parsed here.
- Where: a run's identity is the training code's version, the model and train sections (less the runtime-only
  fields) with max_steps resolved, and the digest of the data it reads (the tokenize manifest's, or for a
  hand-made dataset its train index's). Its checkpoints live in `{root}/train/{version}/`: another config never
  resumes from, or overwrites, this one's checkpoints. The data is `train.data` or this config's tokenize
  output; the children get it resolved in their config.
- Skip: a finished run leaves `step-{max_steps:06d}/meta.json` with a summary; then the stored summary is
  returned with `skipped: True` and nothing is launched. Any earlier complete checkpoint of the same run makes
  the children resume from it (a retried or killed run).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from stages.core import storage
from stages.core.config import REPO_ROOT, ConfigError, PipelineConfig
from stages.core.stage import Artifact, Force, OnProgress, Stage, Status, forced_now, mark_forced
from stages.core.storage import StageOutput
from stages.train import checkpoints, pretrained, report, scaling
from stages.train.checkpoints import final_checkpoint
from stages.train.data import check_mixture, data_digest, mixture_sources, model_vocab_size, tokenizer_vocab_size
from stages.train.protocol import LAUNCHER_PID_ENV, METRIC_PREFIX, SUMMARY_PREFIX, parse

TAIL_LINES = 30
HISTORY_LINES = 5000


def resolved(cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> PipelineConfig:
    """The config as the children get it: train.data set (to the tokens input's output when the config leaves
    it unset), train.max_steps fixed (from max_tokens or the Chinchilla budget when unset), so the children, the
    skip check and the run's identity agree."""
    if cfg.train.data and cfg.train.max_steps is not None:
        return cfg
    out = cfg.model_copy(deep=True)
    out.train.data = cfg.train.data.rstrip("/") if cfg.train.data else upstream["tokens"].uri
    if out.train.max_steps is None:
        vocab = model_vocab_size(out, tokenizer_vocab_size(out))
        out.train.max_steps, _ = scaling.planned_steps(cfg.model, cfg.train, vocab)
        out.train.max_tokens = None
    return out


def reads(cfg: PipelineConfig) -> tuple[str, ...]:
    return () if cfg.train.data else ("tokens",)


def check(cfg: PipelineConfig) -> None:
    for i, source in enumerate(cfg.train.mixture.sources if cfg.train.mixture else []):
        if source.data and not storage.exists(storage.join(source.data, "train", "index.json"), cfg.storage):
            field = f"train.mixture.sources[{i}].data"
            raise FileNotFoundError(f"{field}: no tokenized training data at {source.data}/train")
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("train.device: cuda requested but no CUDA device is available")
    start = cfg.train.initial_checkpoint
    if start and pretrained.is_model_directory(start, cfg.storage):  # (unsupported models are refused here too)
        found = pretrained.mismatches(cfg.model, start, cfg.storage)
        if found:
            differ = "; ".join(found)
            raise ConfigError(f"train.initial_checkpoint {start}: the model section is not its model: {differ}")


class TrainStage(Stage):
    """Training through the stage contract. The output is the run folder, `{root}/train/{version}`: checkpoints,
    metrics.jsonl, the loss curve and the evaluation history. Its identity is the training code (this package),
    the model and train sections of the resolved config and the digest of the data it reads (and each mixture
    source's: what each holds, not where it lives). It is skipped when the folder holds the final checkpoint,
    resumed from its latest complete one, else started."""

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> dict:
        cfg = resolved(cfg, upstream)
        inputs = {"data": data_digest(cfg)}
        start = cfg.train.initial_checkpoint
        if start and pretrained.is_model_directory(start, cfg.storage):  # (the base model's files, for lineage too)
            inputs["base_model"] = {"uri": start, "files": pretrained.fingerprints(start, cfg.storage)}
        if cfg.train.mixture:
            inputs["mixture"] = [data_digest(cfg, uri, field) for field, uri in mixture_sources(cfg)]
        return {"code": self.code_version(), "config": cfg.section_digest(*self.sections), "inputs": inputs}

    def status(self, cfg: PipelineConfig, upstream: dict[str, StageOutput], forced: bool) -> Status:
        cfg = resolved(cfg, upstream)
        run = self.output(cfg, upstream).uri
        found = checkpoints.complete_checkpoints(run, cfg.storage)
        final = final_checkpoint(run, cfg.train.max_steps, cfg.storage)
        if forced:
            return Status("run", "forced: from step 0", run)
        if final:
            early = " (a mixture source ran out)" if final[1].get("data_exhausted") else ""
            return Status("skip", f"complete at step {final[1]['step']}{early}", run)
        if found:
            return Status("run", f"resumes from step {found[-1][0]} of {cfg.train.max_steps}", run)
        return Status("run", f"never trained: {cfg.train.max_steps} steps", run)

    def run(
        self,
        cfg: PipelineConfig,
        upstream: dict[str, StageOutput],
        log=print,
        force: Force = False,
        progress: OnProgress | None = None,
    ) -> dict:
        on_metric = (lambda m: progress(m["step"], m["max_steps"])) if progress else None
        cfg = resolved(cfg, upstream)
        stats = run_training(cfg, on_line=log, on_metric=on_metric, force=force)
        stats["run"] = run = self.output(cfg, upstream).uri
        started = time.perf_counter()
        stats["loss_curve"] = report.write(run, cfg)["png_uri"]  # (matplotlib's import and drawing: a second or two)
        stats["report_seconds"] = round(time.perf_counter() - started, 3)
        if stats.get("checkpoint"):  # the final checkpoint continues a few fixed prompts: a look by a human
            from stages.evaluate import samples  # (torch: never imported by the launcher before it is needed)

            started = time.perf_counter()
            samples.run(cfg, stats["checkpoint"], log)
            stats["samples_seconds"] = round(time.perf_counter() - started, 3)
            stats["samples"] = storage.join(stats["checkpoint"], samples.SAMPLES)
        return stats

    def artifacts(self, cfg: PipelineConfig, stats: dict) -> list[Artifact]:
        """The loss curve, a table of per-step metrics and the final checkpoint's samples."""
        shown = []
        if stats.get("loss_curve"):
            with storage.open_uri(stats["loss_curve"], "rb", cfg.storage) as f:
                png = f.read()
            shown.append(Artifact("image", "train-loss-curve", png, f"saved at {stats['loss_curve']}"))
            table = report.metrics_table(report.read_metrics(stats["run"], cfg))
            shown.append(Artifact("table", "train-metrics", table, "per-step metrics"))
        if stats.get("samples"):
            from stages.evaluate import samples

            text = samples.markdown(storage.read_json(stats["samples"], cfg.storage))
            shown.append(Artifact("markdown", "train-samples", text, "continuations"))
        return shown


STAGE = TrainStage(
    name="train",
    folder="train",
    package=__package__,
    sections=("model", "train"),
    build=None,  # (run: torchrun over the worker)
    needs=("tokens",),
    reads=reads,
    check=check,
    # (the cost estimate and the loss plot: a change there must not start the run over in a new folder)
    code_exclude=("budget.py", "report.py"),
)


def run_uri(cfg: PipelineConfig) -> str:
    """The run folder of a config whose train.data is set (the train stage resolves it for the pipeline's)."""
    cfg = resolved(cfg, {})
    return STAGE.output(cfg, {}).uri


def child_config_json(cfg: PipelineConfig) -> str:
    """The config for the children, with the storage secrets removed (they travel in the environment)."""
    data = cfg.model_dump(mode="json")
    data["storage"]["access_key_id"] = None
    data["storage"]["secret_access_key"] = None
    data["storage"]["credentials_block"] = None  # (resolved by the flow; its keys are in the environment)
    return json.dumps(data)


def torchrun_command(cfg: PipelineConfig, config_file: str, run_file: str) -> list[str]:
    t = cfg.train
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(t.nproc_per_node),
        "--nnodes",
        str(t.nnodes),
    ]
    if t.nnodes == 1:
        cmd.append("--standalone")
    else:  # config validation guarantees rdzv_endpoint
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", t.rdzv_endpoint, "--rdzv-id", f"{cfg.name}-train"]
    # `--config-json` is not a prefix of any torchrun option (a flag such as `--log` would be ambiguous there).
    return cmd + ["-m", "stages.train.worker", "--config-json", config_file, "--run-json", run_file]


def _completed_summary(cfg: PipelineConfig, run: str) -> dict | None:
    fs, _ = storage.filesystem(run, cfg.storage)
    fs.invalidate_cache()  # s3fs caches listings per process; a run may have just written this
    final = final_checkpoint(run, cfg.train.max_steps, cfg.storage)
    return final[1].get("summary") if final else None


def run_training(
    cfg: PipelineConfig,
    on_line: Callable[[str], None] = print,
    on_metric: Callable[[dict], None] | None = None,
    force: Force = False,
) -> dict[str, Any]:
    """Train (or resume, or skip) a config whose train.data is set; returns the run's summary plus seconds and
    losses. `force` deletes the run's folder first and trains from step 0 (with a token, once:
    stages/core/stage.py forced_now).

    `on_line` gets every line the ranks print, `on_metric` every per-step record (step, max_steps, loss, ...)."""
    started = time.time()
    data_digest(cfg)  # no data: fail here, not after torchrun has started every rank
    check_mixture(cfg)
    check(cfg)  # (preflight's checks: a run started without the flow fails as early)
    cfg = resolved(cfg, {})
    identity = STAGE.identity(cfg, {})
    run = STAGE.output(cfg, {}, identity).uri
    if forced_now(run, force, cfg.storage, on_line, "train"):
        # its old checkpoints go first: a retry after a crash must not find the old final one (and a retry of this
        # forced run resumes from the new ones: the mark)
        on_line(f"training from scratch (forced): removing {run}")
        storage.remove(run, cfg.storage)
        mark_forced(run, force, cfg.storage)
    done = _completed_summary(cfg, run)
    if done is not None:
        on_line(f"training already complete at {done['checkpoint']}: skipped")
        summary, initial_loss, skipped = done, done.get("first_loss"), True
    else:
        summary, initial_loss = launch(cfg, run, identity, on_line, on_metric)
        skipped = False
    return {
        **summary,
        "skipped": skipped,
        "seconds": round(time.time() - started, 3),
        "initial_loss": initial_loss if initial_loss is not None else summary.get("first_loss"),
        "final_loss": summary.get("final_loss"),
    }


def launch(cfg: PipelineConfig, run: str, identity: dict, on_line, on_metric) -> tuple[dict, float | None]:
    """torchrun over the worker, its output streamed to `on_line`: the run's summary and its first loss."""
    env = dict(os.environ)
    env.update(storage.storage_env(cfg.storage))
    env["PYTHONUNBUFFERED"] = "1"
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="train-config-") as tmp:
        config_file, run_file = os.path.join(tmp, "config.json"), os.path.join(tmp, "run.json")
        with open(config_file, "w") as f:
            f.write(child_config_json(cfg))
        os.chmod(config_file, 0o600)
        with open(run_file, "w") as f:
            json.dump({"uri": run, "identity": identity}, f)
        proc = subprocess.Popen(
            torchrun_command(cfg, config_file, run_file),
            cwd=str(REPO_ROOT),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,
        )
        code, tail, history, summary, initial_loss = _follow(proc, on_line, on_metric)
    if code != 0:
        cause = _first_traceback(list(history))
        raise RuntimeError(
            f"training failed: torchrun exited with code {code}"
            + (f"; first error:\n{cause}" if cause else "")
            + f"\n--- last {len(tail)} lines of output ---\n"
            + "\n".join(tail)
        )
    if summary is None and cfg.train.nnodes > 1:
        # Rank 0 ran on another node: the final checkpoint it wrote (shared storage) holds the summary.
        summary = _completed_summary(cfg, run)
    if summary is None:
        raise RuntimeError("training exited 0 but printed no SUMMARY line; last lines:\n" + "\n".join(tail))
    return summary, initial_loss


def _follow(proc: subprocess.Popen, on_line, on_metric):
    """Every line of the children to `on_line`, METRIC records to `on_metric`; the exit code, the last lines,
    a longer history (to find the root cause), the SUMMARY record and the first loss."""
    initial_loss: float | None = None
    summary: dict | None = None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    history: collections.deque[str] = collections.deque(maxlen=HISTORY_LINES)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            history.append(line)
            on_line(line)
            if (m := parse(line, METRIC_PREFIX)) is not None:
                initial_loss = m.get("loss") if initial_loss is None else initial_loss
                if on_metric:
                    on_metric(m)
            elif (found := parse(line, SUMMARY_PREFIX)) is not None:
                summary = found
        return proc.wait(), tail, history, summary, initial_loss
    except BaseException:
        # Cancelled (KeyboardInterrupt, a Prefect cancellation, a failing on_line): take the children down.
        _terminate(proc)
        raise


def _first_traceback(lines: list[str], limit: int = 60) -> str | None:
    """The first Python traceback a rank printed (torchrun's own summary at the end hides the cause).

    Ranks' lines carry a `[rankN]:` prefix; the block ends at its first unindented line (the exception)."""
    marker = "Traceback (most recent call last)"
    for i, line in enumerate(lines):
        if marker not in line:
            continue
        prefix = line[: line.index(marker)]
        block = [line]
        for nxt in lines[i + 1 :]:
            if prefix and not nxt.startswith(prefix):
                continue
            block.append(nxt)
            body = nxt[len(prefix) :]
            if body and not body[0].isspace():
                break
        if len(block) > limit:
            block = block[:10] + ["..."] + block[-(limit - 11) :]
        return "\n".join(block)
    return None


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
