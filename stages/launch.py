"""Launch distributed training: torchrun over `stages.train`, streamed, parsed, skipped when already done.

`run_training(cfg)` is what the pipeline (a Prefect task, the CLI, the tests) calls. It never imports torch: the
training itself runs in torchrun's children, so the caller stays light and a crash there cannot take the
orchestrator down with it.

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
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from stages import scaling, storage
from stages.checkpoints import final_checkpoint
from stages.config import REPO_ROOT, PipelineConfig, StorageConfig
from stages.stage import Force, forced_now, mark_forced

# The ranks stop when the launching process is gone (torchrun runs in a session of its own, so a SIGKILL of the
# flow run's process would otherwise leave it training beside the retry).
LAUNCHER_PID_ENV = "PRETRAIN_LAUNCHER_PID"
METRIC_PREFIX = "METRIC "
SUMMARY_PREFIX = "SUMMARY "
TAIL_LINES = 30
HISTORY_LINES = 5000


TRAIN_CODE = ("stages/train.py", "stages/model.py", "stages/loader.py", "stages/mixture.py", "stages/checkpoints.py")
TOKENIZER_FILE = "tokenizer.json"  # inside the dataset folder (the tokenize stage copies it there)


def data_uri(cfg: PipelineConfig) -> str:
    """The tokenized dataset the run reads: train.data, else this config's tokenize output."""
    if cfg.train.data:
        return cfg.train.data.rstrip("/")
    from stages import tokenize  # (the data stages' imports, only when the pipeline's own output is meant)

    return tokenize.output(cfg).uri


def mixture_sources(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field, dataset URI) of each source of train.mixture; a source without `data` reads the run's dataset."""
    sources = cfg.train.mixture.sources if cfg.train.mixture else []
    return [
        (f"train.mixture.sources[{i}].data", s.data.rstrip("/") if s.data else data_uri(cfg))
        for i, s in enumerate(sources)
    ]


def check_mixture(cfg: PipelineConfig) -> None:
    """Every source holds training data made with the run's tokenizer; else an error naming the source's field."""
    want = _sha256_of(tokenizer_uri(cfg), cfg)
    for field, uri in mixture_sources(cfg):
        data_digest(cfg, uri, field)
        tokenizer = storage.join(uri, TOKENIZER_FILE)
        if not storage.exists(tokenizer, cfg.storage):
            raise FileNotFoundError(f"{field}: {uri} has no {TOKENIZER_FILE}")
        if _sha256_of(tokenizer, cfg) != want:
            raise ValueError(
                f"{field}: {uri} was tokenized with another tokenizer than the run's ({tokenizer_uri(cfg)}); "
                "tokenize every source with the same one (tokenizer.path)"
            )


def _sha256_of(uri: str, cfg: PipelineConfig) -> str:
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_digest(cfg: PipelineConfig, data: str | None = None, field: str = "train.data") -> str:
    """The dataset's content digest: its tokenize manifest's, or for a dataset made elsewhere its train index's.
    `data`: another dataset than the run's (a mixture's source, named by `field` in errors)."""
    data = data or data_uri(cfg)
    manifest = storage.join(data, storage.MANIFEST)
    if storage.exists(manifest, cfg.storage):
        return storage.read_json(manifest, cfg.storage)["digest"]
    index = storage.join(data, "train", "index.json")
    if not storage.exists(index, cfg.storage):  # fail here, not after torchrun has started every rank
        where = "run the tokenize stage first" if field == "train.data" else field
        raise FileNotFoundError(f"{index}: no tokenized training data ({where})")
    with storage.open_uri(index, "rb", cfg.storage) as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def tokenizer_uri(cfg: PipelineConfig) -> str:
    return storage.join(data_uri(cfg), TOKENIZER_FILE)


def tokenizer_vocab_size(cfg: PipelineConfig) -> int:
    uri = tokenizer_uri(cfg)
    if not storage.exists(uri, cfg.storage):
        raise FileNotFoundError(f"{uri}: no tokenizer beside the training data (run the tokenize stage)")
    return tokenizer_vocab_size_at(uri, cfg.storage)


def tokenizer_vocab_size_at(uri: str, storage_cfg: StorageConfig | None) -> int:
    from tokenizers import Tokenizer

    with storage.open_uri(uri, "rb", storage_cfg) as f:
        return Tokenizer.from_str(f.read().decode("utf-8")).get_vocab_size()


def resolved(cfg: PipelineConfig) -> PipelineConfig:
    """The config as the children get it: train.data resolved, train.max_steps fixed (from max_tokens or the
    Chinchilla budget when unset), so the children, the skip check and the run's identity agree."""
    if cfg.train.data and cfg.train.max_steps is not None:
        return cfg
    out = cfg.model_copy(deep=True)
    out.train.data = data_uri(cfg)
    if out.train.max_steps is None:
        out.train.max_steps, _ = scaling.planned_steps(cfg.model, cfg.train, tokenizer_vocab_size(out))
        out.train.max_tokens = None
    return out


def run_identity(cfg: PipelineConfig) -> dict:
    cfg = resolved(cfg)
    code = hashlib.sha256(b"".join((REPO_ROOT / path).read_bytes() for path in TRAIN_CODE)).hexdigest()[:12]
    identity = {"code": code, "config": cfg.section_digest("model", "train"), "data": data_digest(cfg)}
    if cfg.train.mixture:  # what each source holds, not where it lives
        identity["mixture"] = [data_digest(cfg, uri, field) for field, uri in mixture_sources(cfg)]
    return identity


def run_uri(cfg: PipelineConfig, identity: dict | None = None) -> str:
    """`{root}/train/{version}`: this run's checkpoints, metrics.jsonl, loss curve and evaluation history."""
    return storage.join(cfg.storage.root, "train", storage.version_of(identity or run_identity(cfg)))


def child_config_json(cfg: PipelineConfig) -> str:
    """The config for the children, with the storage secrets removed (they travel in the environment)."""
    data = cfg.model_dump(mode="json")
    data["storage"]["access_key_id"] = None
    data["storage"]["secret_access_key"] = None
    data["storage"]["credentials_block"] = None  # (resolved by the flow; its keys are in the environment)
    return json.dumps(data)


def torchrun_command(cfg: PipelineConfig, config_file: str) -> list[str]:
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
    return cmd + ["-m", "stages.train", "--config-json", config_file]


def _completed_summary(cfg: PipelineConfig, run: str) -> dict | None:
    fs, _ = storage.filesystem(run, cfg.storage)
    fs.invalidate_cache()  # s3fs caches listings per process; a run may have just written this
    final = final_checkpoint(run, cfg.train.max_steps, cfg.storage)
    return final[1].get("summary") if final else None


def _parse(line: str, prefix: str) -> dict | None:
    idx = line.find(prefix)
    if idx < 0:
        return None
    try:
        return json.loads(line[idx + len(prefix) :])
    except json.JSONDecodeError:
        return None


def run_training(
    cfg: PipelineConfig,
    on_line: Callable[[str], None] = print,
    on_metric: Callable[[dict], None] | None = None,
    force: Force = False,
) -> dict[str, Any]:
    """Train (or resume, or skip) as configured; returns the run's summary plus seconds and losses. `force`
    deletes the run's folder first and trains from step 0 (with a token, once: stages/stage.py forced_now).

    `on_line` gets every line the ranks print, `on_metric` every per-step record (step, max_steps, loss, ...)."""
    started = time.time()
    data_digest(cfg)  # no data: fail here, not after torchrun has started every rank
    check_mixture(cfg)
    cfg = resolved(cfg)
    run = run_uri(cfg)
    if forced_now(run, force, cfg.storage, on_line, "train"):
        # its old checkpoints go first: a retry after a crash must not find the old final one (and a retry of this
        # forced run resumes from the new ones: the mark)
        on_line(f"training from scratch (forced): removing {run}")
        storage.remove(run, cfg.storage)
        mark_forced(run, force, cfg.storage)
    done = _completed_summary(cfg, run)
    if done is not None:
        on_line(f"training already complete at {done['checkpoint']}: skipped")
        return {
            **done,
            "skipped": True,
            "seconds": round(time.time() - started, 3),
            "initial_loss": done.get("first_loss"),
            "final_loss": done.get("final_loss"),
        }

    env = dict(os.environ)
    env.update(storage.storage_env(cfg.storage))
    env["PYTHONUNBUFFERED"] = "1"
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)

    initial_loss: float | None = None
    summary: dict | None = None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    history: collections.deque[str] = collections.deque(maxlen=HISTORY_LINES)  # to find the root cause
    with tempfile.TemporaryDirectory(prefix="train-config-") as tmp:
        config_file = os.path.join(tmp, "config.json")
        with open(config_file, "w") as f:
            f.write(child_config_json(cfg))
        os.chmod(config_file, 0o600)
        cmd = torchrun_command(cfg, config_file)
        proc = subprocess.Popen(
            cmd,
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
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                history.append(line)
                on_line(line)
                if (m := _parse(line, METRIC_PREFIX)) is not None:
                    initial_loss = m.get("loss") if initial_loss is None else initial_loss
                    if on_metric:
                        on_metric(m)
                elif (s := _parse(line, SUMMARY_PREFIX)) is not None:
                    summary = s
            code = proc.wait()
        except BaseException:
            # Cancelled (KeyboardInterrupt, a Prefect cancellation, a failing on_line): take the children down.
            _terminate(proc)
            raise
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
    return {
        **summary,
        "skipped": False,
        "seconds": round(time.time() - started, 3),
        "initial_loss": initial_loss if initial_loss is not None else summary.get("first_loss"),
        "final_loss": summary.get("final_loss"),
    }


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
