"""The skeleton every stage shares: identity, skip, reset, run, commit, stats.

A stage's identity is its name, a digest of its own source file (the code version), the digest of the config
sections it reads and the fingerprints of its inputs. If the manifest in its output folder carries the same
identity the stage is skipped and its recorded stats returned; otherwise the folder is cleared (a partial
output from a killed run is never trusted) and the stage is rebuilt, committing its manifest last.

Stats are plain JSON: counts in and out, removals per rule, seconds and throughput. The Prefect layer turns
them into artifacts; nothing here knows about Prefect.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stages import storage
from stages.config import PipelineConfig
from stages.storage import StageOutput

Log = Callable[[str], None]


@dataclass
class StageResult:
    files: list[str]
    counts: dict
    stats: dict = field(default_factory=dict)


def code_version(module) -> str:
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:12]


def stage_identity(module_name: str, cfg: PipelineConfig, section: str, inputs) -> dict:
    """What a stage's output is a function of: its code, the config section it reads and its inputs."""
    return {"code": code_version(sys.modules[module_name]), "config": cfg.section_digest(section), "inputs": inputs}


def run_stage(output: StageOutput, identity: dict, build: Callable[[], StageResult], log: Log) -> dict:
    if output.is_current(identity):
        stats = storage.read_json(output.path(storage.STATS), output.storage)
        log(f"{output.stage}: up to date at {output.uri}, skipped")
        return {**stats, "skipped": True}
    output.reset()
    log(f"{output.stage}: building {output.uri}")
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
