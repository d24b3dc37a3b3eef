"""Dataset versions: which raw files and which curated, tokenized parts make up the training data, so that a
refresh processes only what is new.

A version is one JSON file, `{root}/dataset/v00001.json`, `v00002.json`, ..., written once and never changed: a
refresh writes the next number. It lists its parts, oldest first. A part is one batch of raw files taken through
every stage training depends on (stages/pipeline.py: `dataset_part`), and records each stage's output by the
stage's name. The first part is the config's own pipeline output (what `pretrain/full`
builds); each refresh adds a part made of the raw files under `ingest.inputs` that no earlier part consumed.

- Dedup against everything kept: a refresh's dedup runs with `dedup.against` naming every earlier part's dedup
  output, so a document exactly or nearly like one already kept is removed from the new part. Every dedup output
  keeps its kept documents' band keys (`signatures/`), and the new part's keys are joined against those: no
  MinHash is computed twice. The join reads the earlier keys once per refresh (16 bytes per document and band,
  sequentially), which is the price of needing no index server; `dedup.index: redis` keeps one in memory instead,
  but is per run, not persisted.
- One tokenizer: a refresh tokenizes with the first part's tokenizer (`tokenizer.path`), so token ids mean the
  same in every part and a model trained on one version continues on the next.
- Restartable: each part's stage outputs are ordinary versioned outputs, so a killed refresh resumes as any
  pipeline run does, and its version is written only after the part is complete, last.

Raw files are recognised by URI and fingerprint (size and mtime or ETag, as the ingest stage's identity). A file
consumed before whose fingerprint changed is reported and left out rather than ingested a second time: data
drops add files, they do not rewrite them.

Continued pretraining after a refresh (`refresh.continue_training`) trains on the new part (`train.data`) from
the latest checkpoint: the one the previous refresh trained, recorded beside its version (`v00002.trained.json`),
else this config's own run's.
"""

from __future__ import annotations

import time

from stages import pipeline
from stages.core import storage
from stages.core.config import PipelineConfig
from stages.core.stage import RAW_FILES
from stages.ingest.stage import list_inputs
from stages.tokenizer.bpe import FILENAME as TOKENIZER_FILE
from stages.train import checkpoints

FOLDER = "dataset"


def ledger_uri(cfg: PipelineConfig) -> str:
    return storage.join(cfg.storage.root, FOLDER)


def version_uri(cfg: PipelineConfig, number: int) -> str:
    return storage.join(ledger_uri(cfg), f"v{number:05d}.json")


def trained_uri(cfg: PipelineConfig, number: int) -> str:
    return storage.join(ledger_uri(cfg), f"v{number:05d}.trained.json")


def version_numbers(cfg: PipelineConfig) -> list[int]:
    found = storage.expand(storage.join(ledger_uri(cfg), "v?????.json"), cfg.storage)
    return sorted(int(uri.rsplit("/", 1)[-1][1:6]) for uri in found)


def latest(cfg: PipelineConfig) -> dict | None:
    numbers = version_numbers(cfg)
    return storage.read_json(version_uri(cfg, numbers[-1]), cfg.storage) if numbers else None


def new_raw_files(cfg: PipelineConfig, version: dict) -> tuple[list[str], list[str]]:
    """Raw files under ingest.inputs that no part of `version` consumed, and consumed ones that changed since."""
    consumed = {uri: fingerprint for part in version["parts"] for uri, fingerprint in part["raw_files"].items()}
    new, changed = [], []
    for uri in list_inputs(cfg):
        if uri not in consumed:
            new.append(uri)
        elif storage.raw_fingerprint(uri, cfg.storage) != consumed[uri]:
            changed.append(uri)
    return new, changed


def increment_config(cfg: PipelineConfig, version: dict, new_files: list[str]) -> PipelineConfig:
    """The config that builds the next part: only the new files, deduplicated against every part so far and
    tokenized with the version's tokenizer."""
    part = cfg.model_copy(deep=True)
    part.ingest.inputs = new_files
    part.dedup.against = [p["dedup"] for p in version["parts"]]
    part.tokenizer.path = version["tokenizer"]["uri"]
    return part


def part_of(cfg: PipelineConfig, registry: pipeline.Pipeline | None = None) -> dict:
    """A finished part as a version lists it: the output of each of its stages (by stage name), the raw files it
    consumed and what it holds (documents and tokens of the training data)."""
    registry = registry or pipeline.PIPELINE
    known: dict = {}
    outputs = {stage.name: registry.output(stage.name, cfg, known) for stage in registry.dataset_part}
    tokens = outputs[registry.training_data]
    tokenized = tokens.manifest()
    if tokenized is None:
        raise RuntimeError(f"a dataset part is recorded once its {registry.training_data} stage has finished")
    raw_files = {}
    for out in outputs.values():
        raw_files.update(out.manifest()["identity"]["inputs"].get(RAW_FILES, {}))
    return {
        "raw_files": raw_files,
        **{name: out.uri for name, out in outputs.items()},
        "tokens": tokens.uri,
        "docs": tokenized["counts"]["docs_in"],  # (the documents the training data was made of)
        "tokens_train": tokenized["counts"]["tokens"]["train"],
        "tokens_val": tokenized["counts"]["tokens"]["val"],
        "tokenizer_sha256": tokenized["counts"]["tokenizer_sha256"],
    }


def record(
    cfg: PipelineConfig, previous: dict | None, part_cfg: PipelineConfig, registry: pipeline.Pipeline | None = None
) -> dict:
    """Write the next version: the previous one's parts plus the part `part_cfg` built."""
    part = part_of(part_cfg, registry)
    if previous is None:
        tokenizer = {"uri": storage.join(part["tokens"], TOKENIZER_FILE), "sha256": part["tokenizer_sha256"]}
        parts = [part]
    else:
        tokenizer = previous["tokenizer"]
        if part["tokenizer_sha256"] != tokenizer["sha256"]:
            raise RuntimeError(f"the new part was tokenized with {part['tokenizer_sha256']}, not {tokenizer['sha256']}")
        parts = previous["parts"] + [part]
    number = (previous or {"version": 0})["version"] + 1
    version = {
        "version": number,
        "created_unix": round(time.time(), 3),
        "parts": parts,
        "tokenizer": tokenizer,
        "raw_files": sum(len(p["raw_files"]) for p in parts),
        "docs": sum(p["docs"] for p in parts),
        "tokens_train": sum(p["tokens_train"] for p in parts),
    }
    storage.write_json(version_uri(cfg, number), version, cfg.storage)
    return version


def markdown(version: dict) -> str:
    lines = [
        f"Version {version['version']}: {version['docs']} documents, {version['tokens_train']} training tokens, "
        f"tokenizer sha256 {version['tokenizer']['sha256'][:16]}",
        "",
        "| part | raw files | documents | training tokens | tokens at |",
        "|---:|---:|---:|---:|---|",
    ]
    for i, part in enumerate(version["parts"], 1):
        lines.append(f"| {i} | {len(part['raw_files'])} | {part['docs']} | {part['tokens_train']} | {part['tokens']} |")
    return "\n".join(lines)


def start_checkpoint(cfg: PipelineConfig, version: dict) -> str:
    """Where continued pretraining on `version`'s new part starts: the checkpoint an earlier refresh trained,
    else the latest of this config's run on the first part (pretrain/full's)."""
    for number in range(version["version"] - 1, 0, -1):
        uri = trained_uri(cfg, number)
        if storage.exists(uri, cfg.storage):
            return storage.read_json(uri, cfg.storage)["checkpoint"]
    base = cfg.model_copy(deep=True)
    base.train.data = version["parts"][0]["tokens"]  # (the run pretrain/full made, whatever ingest.inputs is now)
    run = pipeline.PIPELINE.output(pipeline.PIPELINE.trains, base).uri
    found = checkpoints.latest_checkpoint(run, cfg.storage)
    if found is None:
        raise RuntimeError(
            f"refresh.continue_training: no checkpoint to continue from in {run} (run pretrain/full first)"
        )
    return found[1]


def continued_training_config(cfg: PipelineConfig, version: dict) -> PipelineConfig:
    """Training on the version's newest part, from `start_checkpoint`'s weights."""
    part = cfg.model_copy(deep=True)
    part.train.data = version["parts"][-1]["tokens"]
    part.train.initial_checkpoint = start_checkpoint(cfg, version)
    if cfg.refresh.continue_steps:
        part.train.max_tokens, part.train.max_steps = None, cfg.refresh.continue_steps
        part.train.warmup_steps = min(part.train.warmup_steps, cfg.refresh.continue_steps // 2)  # (a valid schedule)
    return part


def trained(cfg: PipelineConfig, version: dict) -> bool:
    """Whether continued pretraining on the version's newest part has finished (and was recorded)."""
    return storage.exists(trained_uri(cfg, version["version"]), cfg.storage)


def record_trained(cfg: PipelineConfig, version: dict, train_cfg: PipelineConfig) -> dict:
    run = pipeline.PIPELINE.output(pipeline.PIPELINE.trains, train_cfg).uri
    found = checkpoints.latest_checkpoint(run, cfg.storage)
    if found is None:
        raise RuntimeError(f"continued pretraining left no complete checkpoint in {run}")
    trained = {"run": run, "checkpoint": found[1], "step": found[0], "from": train_cfg.train.initial_checkpoint}
    storage.write_json(trained_uri(cfg, version["version"]), trained, cfg.storage)
    return trained
