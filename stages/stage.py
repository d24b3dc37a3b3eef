"""The skeleton every stage shares: identity, versioned output, skip, reset, run, commit, stats.

A stage's identity is a digest of its own source (the code version), the digest of the config sections it reads
and the fingerprints of its inputs: raw files for ingest, the manifest digests of upstream outputs for the rest.
Its output lives at `{root}/{stage}/{version}`, the version being a digest of that identity (as Marin's executor
derives paths): another config or code version writes beside, never over, an earlier output, so switching back
is free and two configs can share a root. If the manifest at the version's path carries the identity the stage
is skipped and its recorded stats returned; `force` rebuilds it anyway (once per flow run: a retry of the run
that forced it does not start the rebuild over). Otherwise the stage is built, committing its manifest last.

Inputs are fingerprinted by content (an upstream's manifest digest), not by the upstream's version: a stage
whose code changed but whose output did not (a comment, a refactor) leaves everything downstream skipped, as
Bazel's early cutoff does. The price is that a downstream version is known only once its upstream has run: a
dry run (stages/plan.py) lists those as "after <upstream>, unless its output comes out unchanged".

Stages whose work splits into independent units (ingest: one input file; filter: one shard) also resume: each
unit writes its outputs, then a completion marker in `_progress/` holding its result (datatrove's
completions/ folder). A rerun with the same identity after a kill keeps the finished units and redoes only the
rest; units are deterministic, so the result is byte-identical to an uninterrupted run. A different identity
clears the folder first: outputs of another config are never mixed in.

Stats are plain JSON: counts in and out, removals per rule, seconds and throughput. The Prefect layer turns
them into artifacts; nothing here knows about Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from stages import failpoints, storage
from stages.config import PipelineConfig, StorageConfig
from stages.parallel import map_in_processes
from stages.storage import StageOutput

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass
class StageResult:
    files: list[str]
    counts: dict
    stats: dict = field(default_factory=dict)


def code_version(*modules) -> str:
    source = "".join(inspect.getsource(module) for module in modules)
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def stage_identity(module_name: str, cfg: PipelineConfig, section: str, inputs, helpers=()) -> dict:
    """What a stage's output is a function of: its code (its module and the `helpers` modules holding its
    algorithms), the config section it reads and its inputs."""
    code = code_version(sys.modules[module_name], *helpers)
    return {"code": code, "config": cfg.section_digest(section), "inputs": inputs}


def versioned_output(stage: str, folder: str, cfg: PipelineConfig, identity: dict) -> StageOutput:
    """`{root}/{folder}/{version}`: where the output of this identity lives."""
    return StageOutput(stage, storage.join(cfg.storage.root, folder, storage.version_of(identity)), cfg.storage)


def other_versions(output: StageOutput) -> list[dict]:
    """Manifests of the stage's other committed versions beside `output`, newest first."""
    parent = output.uri.rstrip("/").rsplit("/", 1)[0]
    found = []
    for uri in storage.expand(storage.join(parent, "*", storage.MANIFEST), output.storage):
        if uri.rsplit("/", 1)[0] != output.uri.rstrip("/"):
            found.append({**storage.read_json(uri, output.storage), "uri": uri.rsplit("/", 1)[0]})
    return sorted(found, key=lambda m: m.get("created_unix", 0), reverse=True)


PROGRESS = "_progress"


@dataclass
class Progress:
    """Completion markers of a stage's work units; picklable, so worker processes mark their own units."""

    output: StageOutput

    def _uri(self, unit: str) -> str:
        return self.output.path(PROGRESS, f"{unit}.json")

    def result(self, unit: str) -> dict | None:
        uri = self._uri(unit)
        return storage.read_json(uri, self.output.storage) if storage.exists(uri, self.output.storage) else None

    def mark(self, unit: str, result: dict) -> None:
        storage.write_json(self._uri(unit), result, self.output.storage)


def run_units(
    progress: Progress,
    units: dict[str, T],
    work: Callable[[str, T], dict],
    workers: int,
    log: Log,
    dask_address: str | None = None,
):
    """Results of every unit, running only those without a completion marker. `work(name, item)` must mark."""
    pending = {name: item for name, item in units.items() if progress.result(name) is None}
    if len(pending) < len(units):
        log(f"{progress.output.stage}: {len(units) - len(pending)} of {len(units)} units already done, resuming")
    run = partial(_run_unit, work=work, stage=progress.output.stage)
    map_in_processes(run, list(pending.items()), workers, dask_address)
    return {name: progress.result(name) for name in units}, len(units) - len(pending)


def _run_unit(job: tuple, work: Callable, stage: str) -> None:
    work(*job)
    failpoints.hold(f"{stage}.unit-done")


Force = bool | str  # True, or a token naming the request (a flow run's id): see forced_now
FORCED_BY = "forced_by.json"


def forced_now(output_uri: str, force: Force, cfg: StorageConfig | None, log: Log, stage: str) -> bool:
    """Whether this attempt rebuilds `output_uri`. `force=True`: always. A token: only until an attempt carrying
    the same token has started the rebuild (mark_forced), so a retried flow run that asked for the rebuild resumes
    or keeps what its first attempt rebuilt instead of throwing it away again."""
    if not isinstance(force, str):
        return bool(force)
    marker = storage.join(output_uri, FORCED_BY)
    if storage.exists(marker, cfg) and storage.read_json(marker, cfg).get("forced_by") == force:
        log(f"{stage}: already rebuilt for this forced run ({force}), not forced again")
        return False
    return True


def mark_forced(output_uri: str, force: Force, cfg: StorageConfig | None) -> None:
    if isinstance(force, str):
        storage.write_json(storage.join(output_uri, FORCED_BY), {"forced_by": force}, cfg)


def run_stage(
    output: StageOutput, identity: dict, build: Callable[[], StageResult], log: Log, force: Force = False
) -> dict:
    """Skip when `output` holds `identity` (unless forced), resume an interrupted build of it, or build it."""
    token, force = force, forced_now(output.uri, force, output.storage, log, output.stage)
    if output.is_current(identity) and not force:
        stats = storage.read_json(output.path(storage.STATS), output.storage)
        log(f"{output.stage}: up to date at {output.uri}, skipped")
        return {**stats, "skipped": True}
    with problems_named(output):
        return _build(output, identity, build, log, force, token)


@contextlib.contextmanager
def problems_named(output: StageOutput):
    """An endpoint that stopped answering, or a local disk that is full, read-only or refused, named with the
    stage and the path: the finished units are kept, and the message says to rerun once it is fixed."""
    try:
        yield
    except Exception as exc:
        lost, refused = storage.unreachable(exc, output.storage), storage.unwritable(exc)
        if lost is None and refused is None:
            raise
        kind, problem = ("endpoint", lost) if lost else ("unwritable", refused)
        remedy = "the endpoint is back" if lost else "it is fixed"
        raise storage.StorageError(
            kind,
            f"{output.stage}: {problem} (while building {output.uri}); the units it finished are kept, rerun "
            f"once {remedy}",
        ) from exc


def _build(output: StageOutput, identity: dict, build: Callable[[], StageResult], log: Log, force: bool, token) -> dict:
    started_as = output.path(PROGRESS, "identity.json")
    if (
        not force
        and output.manifest() is None
        and storage.exists(started_as, output.storage)
        and (storage.read_json(started_as, output.storage) == identity)
    ):
        log(f"{output.stage}: resuming an interrupted build of {output.uri}")
    else:
        output.reset()
        storage.write_json(started_as, identity, output.storage)
        if force:
            mark_forced(output.uri, token, output.storage)
        log(f"{output.stage}: {'rebuilding (forced)' if force else 'building'} {output.uri}")
    started = time.perf_counter()
    result = build()
    seconds = time.perf_counter() - started
    stats = {
        "stage": output.stage,
        "output": output.uri,
        **result.counts,
        **result.stats,
        "seconds": round(seconds, 3),
        "skipped": False,
    }
    if "docs_in" in result.counts:
        stats["docs_per_s"] = round(result.counts["docs_in"] / max(seconds, 1e-9), 1)
    failpoints.hold(f"{output.stage}.commit")
    manifest = output.commit(identity, result.counts, stats, result.files)
    log(f"{output.stage}: committed {len(result.files)} files, manifest {manifest['digest']} ({seconds:.1f}s)")
    return stats


def upstream_digest(output: StageOutput) -> str:
    """The manifest digest of a finished upstream stage: the fingerprint of everything it produced."""
    manifest = output.manifest()
    if manifest is None:
        raise RuntimeError(f"{output.stage} output at {output.uri} has no manifest: run {output.stage} first")
    return manifest["digest"]


def committed_shards(upstream: StageOutput) -> list[str]:
    """Document shards named in an upstream manifest: only committed files, never a directory listing."""
    upstream_digest(upstream)
    files = upstream.manifest()["files"]
    return sorted(name for name in files if name.endswith(".parquet") and "/" not in name)
