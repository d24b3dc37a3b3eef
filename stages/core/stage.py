"""The contract every stage shares (`Stage`) and the skeleton that runs it: identity, versioned output, skip,
resume, commit, stats.

A stage is data (datatrove's PipelineStep and Marin's ExecutorStep are the models): its name, its output
folder, the config sections and inputs its identity covers, the function that builds it, and whether its work
splits into resumable units. Which stage feeds which input is not the stage's business: stages/pipeline.py
wires them, once, for the whole DAG. A build gets its inputs' outputs handed in and never imports another
stage's build.

A stage's identity is the code version (a digest of its own package's source, stages/<name>/), the digest of
the config sections it reads, and the fingerprints of its inputs: the manifest digests of its upstreams'
outputs, plus whatever else it reads (raw files for ingest, models and word lists for filter). Its output lives
at `{root}/{folder}/{version}`, the version being a digest of that identity (as Marin's executor derives
paths): another config or code version writes beside, never over, an earlier output, so switching back is free
and two configs can share a root. If the manifest at the version's path carries the identity the stage is
skipped and its recorded stats returned; `force` rebuilds it anyway (once per flow run: a retry of the run that
forced it does not start the rebuild over). Otherwise the stage is built, committing its manifest last.

Inputs are fingerprinted by content (an upstream's manifest digest), not by the upstream's version: a stage
whose code changed but whose output did not (a comment, a refactor) leaves everything downstream skipped, as
Bazel's early cutoff does. The price is that a downstream version is known only once its upstream has run: a
dry run (stages/tools/plan.py) lists those as "after <upstream>, unless its output comes out unchanged".

Stages whose work splits into independent units (ingest: one input file; filter: one shard) also resume: each
unit writes its outputs, then a completion marker in `_progress/` holding its result (datatrove's
completions/ folder). A rerun with the same identity after a kill keeps the finished units and redoes only the
rest; units are deterministic, so the result is byte-identical to an uninterrupted run. A different identity
clears the folder first: outputs of another config are never mixed in.

Training and evaluation keep the same interface (identity, output, status, run) with a skip of their own: a run
folder holding its final checkpoint, a checkpoint's `eval/` holding its identity (stages/train/stage.py,
stages/evaluate/stage.py).

Stats are plain JSON: counts in and out, removals per rule, seconds and throughput. A stage with a row in the
data funnel reports the core keys (`CORE_KEYS`), so the funnel and the flows need no per-stage code. The Prefect
layer turns stats into artifacts; nothing here knows about Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from stages.core import failpoints, storage
from stages.core.config import PipelineConfig, StorageConfig
from stages.core.parallel import map_in_processes
from stages.core.storage import StageOutput

Log = Callable[[str], None]
T = TypeVar("T")


OnProgress = Callable[[int, int], None]  # (done, total) of a stage's work, for a progress bar


@dataclass
class StageResult:
    files: list[str]
    counts: dict
    stats: dict = field(default_factory=dict)


CORE_KEYS = ("docs_in", "docs_out", "bytes_in", "bytes_out", "removed")  # of every stage with a funnel row
RAW_FILES = "raw_files"  # the identity input naming the raw files a stage consumed ({uri: fingerprint})


@functools.cache
def package_version(package: str, also: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> str:
    """Digest of a package's source (its .py and .yaml files, by relative path): a stage's code version. Moving
    a helper into the package brings it under the digest; nothing to keep in step by hand. (A stage defined in a
    single module, such as a test's, is that module's source.) `also`: shared modules whose algorithm its output
    depends on; `exclude`: files of the package that cannot change its output (each must exist)."""
    source = Path(importlib.import_module(package).__file__)
    root = source.parent
    if source.name == "__init__.py":
        files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    else:
        files = [source]
    missing = [name for name in exclude if not (root / name).is_file()]
    if missing:
        raise ValueError(f"{package}: code_exclude names {missing}, which are not files of the package")
    files = [p for p in files if p.relative_to(root).as_posix() not in exclude]
    files += [Path(importlib.import_module(module).__file__) for module in also]
    digest = hashlib.sha256()
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def versioned_output(stage: str, folder: str, cfg: PipelineConfig, identity: dict) -> StageOutput:
    """`{root}/{folder}/{version}`: where the output of this identity lives."""
    return StageOutput(stage, storage.join(cfg.storage.root, folder, storage.version_of(identity)), cfg.storage)


@dataclass(frozen=True)
class Build:
    """What a stage's build function gets: the config, where to write, its inputs' outputs (by role), its
    identity, the log and a progress callback."""

    cfg: PipelineConfig
    out: StageOutput
    inputs: dict[str, StageOutput]
    identity: dict
    log: Log
    progress: OnProgress | None = None


@dataclass(frozen=True)
class Artifact:
    """What a stage shows beside its stats table, as data (the flows make Prefect artifacts of it): a `table`
    (a list of rows), `markdown` (text) or an `image` (PNG bytes)."""

    kind: str
    key: str
    content: Any
    description: str = ""


@dataclass(frozen=True)
class Status:
    """What a run would do with a stage: `run` or `skip`, why, and where its output is (when known)."""

    action: str
    reason: str
    output: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage, as data. `needs` names the roles of its inputs ("docs", "tokenizer", ...); stages/pipeline.py
    wires each role to an earlier stage (`inputs`). `reads(cfg)` says which roles a config makes it read (a given
    tokenizer.path reads no documents); `fingerprints(cfg)` what else its identity covers (raw files, models);
    `check(cfg)` what preflight verifies before any work. `units`: its work splits into resumable units (run on
    a Dask cluster when one is configured). `scratch`: folders in its output removed once it is committed.
    `funnel`: its row in the data funnel (it then reports CORE_KEYS). `code_also` and `code_exclude` adjust its code
    version (`package_version`). `show(cfg, stats)`: the artifacts it shows beside its stats table."""

    name: str
    folder: str
    package: str
    sections: tuple[str, ...]
    build: Callable[[Build], StageResult] | None
    needs: tuple[str, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)
    reads: Callable[[PipelineConfig], tuple[str, ...]] | None = None
    fingerprints: Callable[[PipelineConfig], dict] | None = None
    check: Callable[[PipelineConfig], None] | None = None
    units: bool = False
    scratch: tuple[str, ...] = ()
    funnel: str | None = None
    code_also: tuple[str, ...] = ()
    code_exclude: tuple[str, ...] = ()
    show: Callable[[PipelineConfig, dict], list[Artifact]] | None = None  # what it shows beside its stats table

    def wired(self, **inputs: str) -> Stage:
        """This stage with each of its roles fed by the named stage."""
        return replace(self, inputs=dict(inputs))

    def read_roles(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return self.needs if self.reads is None else self.reads(cfg)

    def code_version(self) -> str:
        return package_version(self.package, self.code_also, self.code_exclude)

    def after(self, upstream: str) -> str:
        """Why it runs when `upstream`, which it depends on, runs first (the dry run's words)."""
        return f"after {upstream}, unless its output comes out unchanged"

    def identity(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> dict:
        inputs = {role: upstream_digest(upstream[role]) for role in self.read_roles(cfg)}
        inputs.update(self.fingerprints(cfg) if self.fingerprints else {})
        return {"code": self.code_version(), "config": cfg.section_digest(*self.sections), "inputs": inputs}

    def output(self, cfg: PipelineConfig, upstream: dict[str, StageOutput], identity: dict | None = None):
        return versioned_output(self.name, self.folder, cfg, identity or self.identity(cfg, upstream))

    def artifacts(self, cfg: PipelineConfig, stats: dict) -> list[Artifact]:
        """What to show beside the stats table once it has run (`show`'s; the stats table alone, by default)."""
        return self.show(cfg, stats) if self.show else []

    def lock_uri(self, cfg: PipelineConfig, upstream: dict[str, StageOutput]) -> str:
        """What a run of this stage holds the lock on while it builds (flows/locks.py): its output."""
        return self.output(cfg, upstream).uri

    def status(self, cfg: PipelineConfig, upstream: dict[str, StageOutput], forced: bool) -> Status:
        identity = self.identity(cfg, upstream)
        out = self.output(cfg, upstream, identity)
        if forced:
            return Status("run", "forced", out.uri)
        if out.is_current(identity):
            return Status("skip", "up to date", out.uri)
        return Status("run", why_it_runs(out, identity), out.uri)

    def run(
        self,
        cfg: PipelineConfig,
        upstream: dict[str, StageOutput],
        log: Log = print,
        force: Force = False,
        progress: OnProgress | None = None,
    ) -> dict:
        identity = self.identity(cfg, upstream)
        out = self.output(cfg, upstream, identity)
        build = partial(self._build_checked, Build(cfg, out, upstream, identity, log, progress))
        stats = run_stage(out, identity, build, log, force)
        for folder in self.scratch:  # (also after a skip: a kill between commit and cleanup leaves them)
            storage.remove(out.path(folder), cfg.storage)
        return stats

    def _build_checked(self, build: Build) -> StageResult:
        result = self.build(build)
        missing = [key for key in CORE_KEYS if key not in result.counts] if self.funnel else []
        if missing:
            raise RuntimeError(f"{self.name}: its counts lack the core keys {missing} (stages/core/stage.py)")
        return result


def why_it_runs(out: StageOutput, identity: dict) -> str:
    """Why a data stage's output is not current: interrupted, never built, or what differs from its newest
    other version (code, config section, which inputs)."""
    if out.manifest() is None and storage.exists(out.path(PROGRESS, "identity.json"), out.storage):
        return "resumes an interrupted build"
    others = other_versions(out)
    if not others:
        return "never built"
    before = others[0]["identity"]
    changed = [part for part in ("code", "config", "inputs") if before.get(part) != identity.get(part)]
    if "inputs" in changed and isinstance(before.get("inputs"), dict):
        keys = sorted(k for k in identity["inputs"] if identity["inputs"][k] != before["inputs"].get(k))
        changed[changed.index("inputs")] = f"inputs ({', '.join(keys)})"
    what = {"code": "code", "config": "config section"}
    return f"{', '.join(what.get(c, c) for c in changed)} changed since {others[0]['uri'].rsplit('/', 1)[1]}"


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
    on_progress: OnProgress | None = None,
):
    """Results of every unit, running only those without a completion marker. `work(name, item)` must mark.
    `on_progress(done, total)` follows the units as they finish."""
    pending = {name: item for name, item in units.items() if progress.result(name) is None}
    done = len(units) - len(pending)
    if done:
        log(f"{progress.output.stage}: {done} of {len(units)} units already done, resuming")
    run = partial(_run_unit, work=work, stage=progress.output.stage)
    count = partial(on_progress, total=len(units)) if on_progress else None
    map_in_processes(run, list(pending.items()), workers, dask_address, on_result=_counter(count, done))
    return {name: progress.result(name) for name in units}, len(units) - len(pending)


def _counter(report: Callable | None, start: int) -> Callable | None:
    if report is None:
        return None
    done = [start]

    def finished(_result) -> None:
        done[0] += 1
        report(done[0])

    return finished


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
