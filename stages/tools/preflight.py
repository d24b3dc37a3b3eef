"""Checks that run before any work: every input named in the config exists and every endpoint answers.

A bad config should cost seconds, not a half-finished pipeline. Each stage of the pipeline declares its own
checks (`Stage.check`: missing inputs, a missing language-ID model, a missing perplexity reference or KenLM
build, a missing tokenizer.path, a mixture source without tokens, an unavailable device); here they run in
pipeline order, then the checks that belong to no stage: unresolved credentials, an unreachable or
misconfigured S3 endpoint, and a config the compute plan rejects (state that does not fit the planned GPUs'
memory, a batch larger than the token budget: stages/train/budget.py). Each names the config field to fix.
"""

from __future__ import annotations

from stages import pipeline
from stages.core import storage
from stages.core.config import ConfigError, PipelineConfig
from stages.train import budget


def _check_storage_root(cfg: PipelineConfig) -> None:
    if not storage.is_remote(cfg.storage.root):
        return
    try:
        storage.probe_s3(cfg.storage.root, cfg.storage)
    except storage.StorageError as exc:
        field = {"endpoint": "storage.endpoint_url", "credentials": "storage.access_key_id", "missing": "storage.root"}
        raise ConfigError(f"{field[exc.kind]}: {exc}") from None


def preflight(cfg: PipelineConfig, registry: pipeline.Pipeline | None = None) -> None:
    if cfg.storage.credentials_block:  # (resolving it clears the name and sets the keys)
        raise ConfigError(
            f"storage.credentials_block: the Prefect block {cfg.storage.credentials_block!r} is not resolved; run "
            "through a flow, or call flows.credentials.resolve_credentials(cfg) first"
        )
    for stage in (registry or pipeline.PIPELINE).stages:
        if stage.check is None:
            continue
        try:
            stage.check(cfg)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    _check_storage_root(cfg)
    budget.check(cfg)  # a model, batch or budget that cannot run, with the numbers
