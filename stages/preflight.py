"""Checks that run before any work: every input named in the config exists and every endpoint answers.

A bad config should cost seconds, not a half-finished pipeline: missing inputs, a missing language-ID model,
a missing perplexity reference or KenLM build, a mixture source without tokens,
an unreachable or misconfigured S3 endpoint, an unavailable device and a config the compute plan rejects (state
that does not fit the planned GPUs' memory, a batch larger than the token budget: stages/budget.py) are reported
here, each naming the config field to fix.
"""

from __future__ import annotations

from pathlib import Path

from stages import storage
from stages.config import ConfigError, PipelineConfig


def _check_storage_root(cfg: PipelineConfig) -> None:
    if not storage.is_remote(cfg.storage.root):
        return
    try:
        storage.probe_s3(cfg.storage.root, cfg.storage)
    except storage.StorageError as exc:
        field = {"endpoint": "storage.endpoint_url", "credentials": "storage.access_key_id", "missing": "storage.root"}
        raise ConfigError(f"{field[exc.kind]}: {exc}") from None


def _check_perplexity(cfg: PipelineConfig) -> None:
    pc = cfg.filter.perplexity
    if not pc.enabled:
        return
    for i, uri in enumerate(pc.reference):
        if not storage.expand(uri, cfg.storage):
            raise ConfigError(f"filter.perplexity.reference[{i}]: {uri} does not exist")
    from stages.perplexity_model import kenlm_installed

    missing = kenlm_installed()
    if missing:
        raise ConfigError(f"filter.perplexity: {missing}")


def preflight(cfg: PipelineConfig) -> None:
    from stages.ingest import list_inputs

    if cfg.storage.credentials_block:  # (resolving it clears the name and sets the keys)
        raise ConfigError(
            f"storage.credentials_block: the Prefect block {cfg.storage.credentials_block!r} is not resolved; run "
            "through a flow, or call flows.credentials.resolve_credentials(cfg) first"
        )

    try:
        list_inputs(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if not Path(cfg.filter.lid_model_path).is_file():
        raise ConfigError(f"filter.lid_model_path: {cfg.filter.lid_model_path} does not exist (run `make install`)")
    if cfg.tokenizer.path and not storage.exists(cfg.tokenizer.path, cfg.storage):
        raise ConfigError(f"tokenizer.path: {cfg.tokenizer.path} does not exist")
    _check_perplexity(cfg)
    for i, source in enumerate(cfg.train.mixture.sources if cfg.train.mixture else []):
        if source.data and not storage.exists(storage.join(source.data, "train", "index.json"), cfg.storage):
            raise ConfigError(f"train.mixture.sources[{i}].data: no tokenized training data at {source.data}/train")
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available")
    _check_storage_root(cfg)
    from stages import budget

    budget.check(cfg)  # a model, batch or budget that cannot run, with the numbers
