"""One URI layer for every stage: local paths and s3://bucket/prefix through fsspec.

The same code runs against AWS S3, MinIO, R2 or a local moto server: the endpoint, region and credentials come
from `StorageConfig` or, when not set there, from the standard AWS environment variables (botocore reads
AWS_ENDPOINT_URL itself). Child processes (torchrun, litdata workers) get the same settings through
`storage_env`, so they never need the config's secrets on their command line.

Commit protocol, shared by all stages (datatrove's completion markers, generalised):
- every data file is written with `atomic_write`: to a temporary name then renamed on a local disk; on S3 an
  object PUT (or a completed multipart upload) is already all-or-nothing, so it is written in place;
- the stage's `manifest.json` is written last and names the input fingerprints, the config digest, counts and
  every file with its size and sha256. No manifest means the output is incomplete and will be rebuilt;
- `StageOutput.is_current()` compares a manifest's identity with what the stage would produce now, which is
  how a finished stage is skipped instead of recomputed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

from stages.core.config import StorageConfig
from stages.core.presets import redact_url

MANIFEST = "manifest.json"
STATS = "stats.json"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, *parts: str) -> str:
    root = root.rstrip("/")
    return "/".join([root, *(p.strip("/") for p in parts)])


# Bounded retries for every s3fs call: botocore's standard mode (5 attempts, jittered exponential backoff) and a
# 10 s connect timeout. An endpoint that goes away mid-stage then fails the stage within about a minute, and
# run_stage names it (`unreachable`), instead of the stage hanging on botocore's legacy defaults.
S3_ATTEMPTS = 5
S3_CLIENT_CONFIG = {
    "connect_timeout": 10,
    "read_timeout": 120,
    "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
}


def storage_options(cfg: StorageConfig | None) -> dict[str, Any]:
    """s3fs keyword arguments for the configured endpoint and credentials (none: botocore's environment
    defaults), with bounded retries."""
    opts: dict[str, Any] = {"config_kwargs": S3_CLIENT_CONFIG}
    if cfg is None:
        return opts
    if cfg.endpoint_url:
        opts["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        opts["client_kwargs"] = {"region_name": cfg.region}
    if cfg.access_key_id and cfg.secret_access_key:
        opts["key"] = cfg.access_key_id.get_secret_value()
        opts["secret"] = cfg.secret_access_key.get_secret_value()
    return opts


def storage_env(cfg: StorageConfig | None) -> dict[str, str]:
    """Environment variables carrying the storage settings into a child process."""
    env: dict[str, str] = {}
    if cfg is None:
        return env
    if cfg.endpoint_url:
        env["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    if cfg.region:
        env["AWS_DEFAULT_REGION"] = cfg.region
        env["AWS_REGION"] = cfg.region
    if cfg.access_key_id and cfg.secret_access_key:
        env["AWS_ACCESS_KEY_ID"] = cfg.access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = cfg.secret_access_key.get_secret_value()
    return env


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path within it."""
    if is_remote(uri):
        protocol = uri.split("://", 1)[0]
        opts = storage_options(cfg) if protocol in ("s3", "s3a") else {}
        fs = fsspec.filesystem(protocol, **opts)
        return fs, fs._strip_protocol(uri)
    path = uri.removeprefix("file://")
    return fsspec.filesystem("file"), str(Path(path).absolute())


def _unstrip(fs: fsspec.AbstractFileSystem, uri_like: str, path: str) -> str:
    if is_remote(uri_like):
        return f"{uri_like.split('://', 1)[0]}://{path}"
    return path


def open_uri(uri: str, mode: str = "rb", cfg: StorageConfig | None = None, **kwargs) -> IO:
    fs, path = filesystem(uri, cfg)
    return fs.open(path, mode, **kwargs)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return fs.exists(path)


def expand(pattern: str, cfg: StorageConfig | None = None) -> list[str]:
    """Files matching a path, folder or glob, sorted so every run sees the same order."""
    fs, path = filesystem(pattern, cfg)
    if any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = fs.find(path)
    else:
        found = [path] if fs.exists(path) else []
    return sorted(_unstrip(fs, pattern, p) for p in found if not fs.isdir(p))


def remove(uri: str, cfg: StorageConfig | None = None) -> None:
    fs, path = filesystem(uri, cfg)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_json(uri: str, cfg: StorageConfig | None = None) -> Any:
    with open_uri(uri, "rb", cfg) as f:
        return json.loads(f.read())


@contextlib.contextmanager
def atomic_write(uri: str, cfg: StorageConfig | None = None, mode: str = "wb") -> Iterator[IO]:
    """Write `uri` so that readers see either nothing or the whole file."""
    fs, path = filesystem(uri, cfg)
    if is_remote(uri):
        with fs.open(path, mode) as f:
            yield f
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        # (a write or fsync that fails names no file, and the temporary's name means nothing to a user)
        raise OSError(exc.errno, exc.strerror, path) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# A local write that cannot succeed until someone acts: named with its path and stage (`unwritable`), never retried.
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def unwritable(exc: BaseException) -> str | None:
    """`<strerror>: <path>` when `exc` (or its cause) is a local write refused for want of room or permission."""
    seen = _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in UNWRITABLE and bool(e.filename))
    return None if seen is None else f"{seen.strerror or os.strerror(seen.errno)}: {seen.filename}"


def _in_chain(exc: BaseException, matches) -> BaseException | None:
    """The first of `exc` and its causes (or contexts) that `matches`."""
    seen = exc
    while seen is not None and not matches(seen):
        seen = seen.__cause__ or seen.__context__
    return seen


def write_json(uri: str, data: Any, cfg: StorageConfig | None = None) -> None:
    with atomic_write(uri, cfg, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def file_digest(uri: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open_uri(uri, "rb", cfg) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def raw_fingerprint(uri: str, cfg: StorageConfig | None = None) -> str:
    """Cheap identity of a raw input file: size plus modification time or ETag, never its content.

    Reading terabytes to decide whether to skip would cost as much as the work; object stores give an ETag
    that changes with the content, and local files have mtime.
    """
    fs, path = filesystem(uri, cfg)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return hashlib.sha256(f"{uri}|{info.get('size')}|{stamp}".encode()).hexdigest()[:16]


def digest_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this code runs from (with "+dirty" when it has local changes), or None."""
    import subprocess

    from stages.core.config import REPO_ROOT

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def version_of(identity: dict) -> str:
    """The folder name of an output: a digest of what it is a function of."""
    return digest_of(identity)[:12]


@dataclass
class StageOutput:
    """A stage's output folder and its manifest: the unit of commit and skip."""

    stage: str
    uri: str
    storage: StorageConfig | None = None

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def manifest(self) -> dict | None:
        uri = self.path(MANIFEST)
        return read_json(uri, self.storage) if exists(uri, self.storage) else None

    def is_current(self, identity: dict) -> bool:
        manifest = self.manifest()
        return manifest is not None and manifest.get("identity") == identity

    def reset(self) -> None:
        """Drop an incomplete or outdated output before rebuilding it."""
        remove(self.uri, self.storage)

    def commit(self, identity: dict, counts: dict, stats: dict, files: list[str]) -> dict:
        """Sweep temporaries a killed writer left, checksum every file, write stats.json, then the manifest last."""
        started = time.time()
        for leftover in expand(self.path("**", "*.tmp-*"), self.storage):
            remove(leftover, self.storage)
        entries = {name: file_digest(self.path(name), self.storage) for name in sorted(files)}
        write_json(self.path(STATS), stats, self.storage)
        manifest = {
            "stage": self.stage,
            "identity": identity,
            "counts": counts,
            "files": entries,
            "created_unix": round(started, 3),
            "git_commit": git_commit(),  # lineage only: the identity's code digest is what decides a rebuild
        }
        manifest["digest"] = digest_of({"identity": identity, "files": entries})
        write_json(self.path(MANIFEST), manifest, self.storage)
        return manifest


class StorageError(RuntimeError):
    """Storage that cannot be used, saying which: `kind` is endpoint (unreachable), credentials (missing or
    rejected), missing (no such bucket or object) or unwritable (a local disk full, read-only or refused)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def probe_s3(uri: str, cfg: StorageConfig | None, key: str | None = None, seconds: float = 10.0) -> None:
    """Check in seconds that the S3 endpoint answers, accepts the credentials and holds `uri`'s bucket (and
    `key` under `uri`, if given). One attempt with short timeouts: a wrong endpoint would otherwise cost the
    minutes that botocore's and litdata's retries take."""
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket, _, prefix = uri.split("://", 1)[1].partition("/")
    quick = botocore.config.Config(connect_timeout=seconds / 2, read_timeout=seconds, retries={"max_attempts": 1})
    client = boto3.client("s3", config=quick, **litdata_storage_options(cfg))
    endpoint = shown_endpoint(cfg)
    try:
        if key is None:
            client.head_bucket(Bucket=bucket)
        else:
            client.head_object(Bucket=bucket, Key="/".join(p for p in (prefix.strip("/"), key) if p))
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        raise StorageError("endpoint", f"cannot reach the S3 endpoint {endpoint}: {redact_url(str(exc))}") from None
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            "credentials", "no S3 credentials (storage.access_key_id/secret_access_key or AWS_*)"
        ) from None
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            raise StorageError("credentials", f"{endpoint} rejected the credentials for {uri} ({code})") from None
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            what = f"bucket {bucket!r}" if key is None else f"{join(uri, key)}"
            raise StorageError("missing", f"{what} does not exist at {endpoint}") from None
        raise StorageError("endpoint", f"{endpoint}: {uri}: S3 error {code}") from None


def unreachable(exc: BaseException, cfg: StorageConfig | None) -> str | None:
    """What went wrong, naming the endpoint, when `exc` (or its cause) says it could not be reached; else None."""
    import botocore.exceptions

    lost = (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectionClosedError,
        botocore.exceptions.ConnectTimeoutError,
        botocore.exceptions.ReadTimeoutError,
    )
    seen = _in_chain(exc, lambda e: isinstance(e, lost))
    if seen is None:
        return None
    return f"the S3 endpoint {shown_endpoint(cfg)} stopped answering ({redact_url(str(seen))}; {S3_ATTEMPTS} attempts)"


def effective_endpoint(cfg: StorageConfig | None) -> str | None:
    return (
        (cfg.endpoint_url if cfg else None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def shown_endpoint(cfg: StorageConfig | None) -> str:
    """The endpoint as errors and logs name it: without any user-info a URL may carry (`http://key:secret@host`)."""
    return redact_url(effective_endpoint(cfg) or "the AWS default endpoint")


def litdata_storage_options(cfg: StorageConfig | None) -> dict[str, Any]:
    """boto3 client keyword arguments in the form litdata's `storage_options` takes."""
    opts: dict[str, Any] = {}
    if cfg is None:
        return opts
    if cfg.endpoint_url:
        opts["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        opts["region_name"] = cfg.region
    if cfg.access_key_id and cfg.secret_access_key:
        opts["aws_access_key_id"] = cfg.access_key_id.get_secret_value()
        opts["aws_secret_access_key"] = cfg.secret_access_key.get_secret_value()
    return opts


def prepare_litdata(cfg: StorageConfig | None) -> dict[str, Any]:
    """Make litdata work with the configured endpoint; returns its `storage_options`.

    litdata 0.2.76 moves chunks with obstore, whose client refuses plain-http endpoints (`BadScheme`); a local
    moto or MinIO server speaks http, so we allow it exactly when the endpoint is http.
    """
    endpoint = effective_endpoint(cfg)
    if endpoint and endpoint.startswith("http://"):
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
    return litdata_storage_options(cfg)
