"""S3 keys from a Prefect AwsCredentials block (prefect-aws), read once by the flow before any stage runs.

The config names the block (`storage.credentials_block`), never the keys, so configs and flow parameters can be
shared and logged. The flow loads the block from the server it reports to and puts the key pair into the run's
in-memory config as secrets (pydantic SecretStr: hidden in reprs); from there the keys travel as they do when
given any other way: to s3fs as arguments, to torchrun's children in their environment, never into a file,
log line or artifact. The block's region and endpoint fill the config's only where it leaves them unset.
"""

from __future__ import annotations

from prefect_aws import AwsCredentials
from pydantic import SecretStr

from stages.core.config import ConfigError, PipelineConfig


def resolve_credentials(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` with the keys of its credentials block (`cfg` itself when it names none)."""
    name = cfg.storage.credentials_block
    if not name:
        return cfg
    try:
        block = AwsCredentials.load(name)
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise ConfigError(f"storage.credentials_block: no AwsCredentials block {name!r} on the Prefect server ({exc})")
    secret = block.aws_secret_access_key
    if not block.aws_access_key_id or not secret:
        raise ConfigError(f"storage.credentials_block: block {name!r} has no access key id and secret access key")
    storage = cfg.storage.model_copy(
        update={
            "credentials_block": None,  # resolved: what follows reads the keys
            "access_key_id": SecretStr(block.aws_access_key_id),
            "secret_access_key": SecretStr(secret.get_secret_value()),
            "region": cfg.storage.region or block.region_name,
            "endpoint_url": cfg.storage.endpoint_url or block.aws_client_parameters.endpoint_url,
        }
    )
    return cfg.model_copy(update={"storage": storage})
