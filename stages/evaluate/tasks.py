"""The evaluation tasks: the YAML files in `task_yaml/`, rendered with their run-time paths for lm-eval's
TaskManager, the held-out documents they read (and the multiple-choice set built from them), which of the
requested tasks can run offline, and lm-eval's results reduced to one number per metric.

lm-eval reads a local file with `dataset_path: json` and `dataset_kwargs.data_files`, but the path is only known
at run time, so the folder is copied to a temporary directory with its `${NAME}` placeholders filled in; lm-eval's
own ~14,000 built-in tasks are indexed only when a requested task is not one of ours (that scan costs ~8 s).
Ours include the standard suite's tasks, lm-eval's definitions on local data (stages/evaluate/benchmarks.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lm_eval import utils as lm_utils

from stages.core.config import PipelineConfig, StorageConfig
from stages.core.storage import digest_of, open_uri
from stages.evaluate import benchmarks

TASKS_DIR = Path(__file__).resolve().parent / "task_yaml"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)\}")


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
    benchmarks.write_task_yamls(include / "benchmarks", cfg.evaluate.benchmark_data, str(tmp / "datasets_cache"))
    return include, docs_path, n_docs


def requested_tasks(cfg: PipelineConfig) -> list[str]:
    """evaluate.tasks, then the tasks of evaluate.suite not already among them."""
    suite = benchmarks.SUITES[cfg.evaluate.suite] if cfg.evaluate.suite else []
    return list(dict.fromkeys([*cfg.evaluate.tasks, *suite]))


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
