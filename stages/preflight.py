"""Checks that run before any work: every input named in the config exists and every endpoint answers.

A bad config should cost seconds, not a half-finished pipeline: missing inputs, a missing language-ID model,
an unreachable or misconfigured S3 endpoint and an unavailable device are reported here, each naming the
config field to fix.
"""

from __future__ import annotations

from pathlib import Path

from stages import storage
from stages.config import ConfigError, PipelineConfig


def _check_storage_root(cfg: PipelineConfig) -> None:
    root = cfg.storage.root
    if not storage.is_remote(root):
        return
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket = root.split("://", 1)[1].split("/", 1)[0]
    quick = botocore.config.Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1})
    opts = storage.litdata_storage_options(cfg.storage)
    client = boto3.client("s3", config=quick, **opts)
    endpoint = storage.effective_endpoint(cfg.storage) or "AWS default"
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.EndpointConnectionError as exc:
        raise ConfigError(f"storage.endpoint_url: cannot reach {endpoint}: {exc}") from None
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError("storage: no S3 credentials (set storage.access_key_id/secret_access_key or AWS_*)") from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        what = {"404": "does not exist", "403": "is not accessible with these credentials"}.get(
            code, f"failed ({code})"
        )
        raise ConfigError(f"storage.root: bucket {bucket!r} at {endpoint} {what}") from None


def preflight(cfg: PipelineConfig) -> None:
    from stages.ingest import list_inputs

    try:
        list_inputs(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if not Path(cfg.filter.lid_model_path).is_file():
        raise ConfigError(f"filter.lid_model_path: {cfg.filter.lid_model_path} does not exist (run `make install`)")
    if cfg.tokenizer.path and not storage.exists(cfg.tokenizer.path, cfg.storage):
        raise ConfigError(f"tokenizer.path: {cfg.tokenizer.path} does not exist")
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available")
    _check_storage_root(cfg)
