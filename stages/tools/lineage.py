"""Where an output came from: `python -m stages.tools.lineage PATH [--json]`.

PATH is any output of the pipeline, local or s3://, or a file inside one: a stage's version folder
(`{root}/dedup/{version}`), a training checkpoint (`{root}/train/{version}/step-N`) or its `eval/` folder. The
answer is a tree from that output down to the raw input files, each node with its code version (the digest of
the code that made it, and the git commit it ran from), its config digest, when it was made and where it is.

Nothing but the records the stages already keep is needed: a stage's manifest names its inputs by their
manifests' digests, a checkpoint's meta.json names its data's digest, an evaluation's manifest names its
checkpoint. The storage root's manifests (`{root}/*/*/manifest.json`, a handful of small files per stage and
version) are read once and indexed by digest to follow those links. Walking a tree is enough for a pipeline of
this shape; a stage that reads a digest no manifest under the root carries (a dataset made elsewhere) ends its
branch with the digest alone. A tokenized dataset that a data refresh added to a dataset version (the ledger under
`{root}/dataset/`) is shown with the first version that holds it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from stages.core import storage
from stages.core.config import StorageConfig
from stages.core.stage import RAW_FILES
from stages.tools.ledger import FOLDER as DATASET_FOLDER
from stages.train.checkpoints import META


def _find_record(uri: str, cfg: StorageConfig | None) -> tuple[str, str, dict]:
    """(kind, folder, record) of the output `uri` is in: walks up to the nearest manifest.json or meta.json."""
    folder = uri.rstrip("/")
    while folder and folder not in ("s3:", "/"):
        for kind, name in (("checkpoint", META), ("output", storage.MANIFEST)):
            if storage.exists(storage.join(folder, name), cfg):
                return kind, folder, storage.read_json(storage.join(folder, name), cfg)
        if "/" not in folder.rstrip("/"):
            break
        folder = folder.rsplit("/", 1)[0]
    raise FileNotFoundError(f"{uri}: not inside a pipeline output (no manifest.json or meta.json above it)")


def _root_of(folder: str, kind: str) -> str:
    """The storage root: outputs are {root}/{stage}/{version}, checkpoints {root}/train/{version}/step-N."""
    depth = 3 if kind == "checkpoint" else 2
    return folder.rsplit("/", depth)[0]


def _manifests(root: str, cfg: StorageConfig | None) -> dict[str, dict]:
    """Every committed output under the root, by manifest digest."""
    found = {}
    for uri in storage.expand(storage.join(root, "*", "*", storage.MANIFEST), cfg):
        manifest = storage.read_json(uri, cfg)
        found[manifest["digest"]] = {**manifest, "uri": uri.rsplit("/", 1)[0]}
    return found


def _first_versions(root: str, cfg: StorageConfig | None) -> dict[str, int]:
    """The dataset version (stages/tools/ledger.py's ledger) that first held each tokenized part, by the part's URI."""
    first: dict[str, int] = {}
    for uri in sorted(storage.expand(storage.join(root, DATASET_FOLDER, "v?????.json"), cfg)):
        version = storage.read_json(uri, cfg)
        for part in version["parts"]:
            first.setdefault(part["tokens"], version["version"])
    return first


def _digests(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _digests(v)]
    if isinstance(value, list):
        return [d for v in value for d in _digests(v)]
    return []


def _when(unix: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix)) if unix else None


def _node_of_manifest(manifest: dict, index: dict[str, dict]) -> dict:
    identity = manifest["identity"]
    node = {
        "kind": manifest["stage"],
        "uri": manifest["uri"],
        "digest": manifest["digest"],
        "code": identity.get("code"),
        "config": identity.get("config"),
        "git_commit": manifest.get("git_commit"),
        "created": _when(manifest.get("created_unix")),
        "inputs": [],
    }
    if manifest["counts"].get("tokenizer_sha256"):  # (what made the tokens, and which tokenizer)
        node["tokenizer_sha256"] = manifest["counts"]["tokenizer_sha256"]
    if manifest.get("dataset_version"):
        node["dataset_version"] = manifest["dataset_version"]
    for digest in _digests(identity.get("inputs")):
        if digest in index:
            node["inputs"].append(_node_of_manifest(index[digest], index))
    if RAW_FILES in (identity.get("inputs") or {}):
        node["raw_inputs"] = identity["inputs"][RAW_FILES]  # {uri: fingerprint} of the raw files
    return node


def lineage(uri: str, cfg: StorageConfig | None = None) -> dict:
    """The tree of what made `uri`: nested dicts (kind, uri, code, config, git_commit, created, inputs)."""
    kind, folder, record = _find_record(uri, cfg)
    root = _root_of(folder, kind)
    index = _manifests(root, cfg)
    versions = _first_versions(root, cfg)
    for manifest in index.values():
        if manifest["uri"] in versions:
            manifest["dataset_version"] = versions[manifest["uri"]]
    if kind == "output" and record.get("stage") == "evaluate":
        ckpt = folder.rsplit("/", 1)[0]
        node = {
            "kind": "evaluate",
            "uri": folder,
            "config": record["identity"].get("config"),
            "task_yaml": record["identity"].get("task_yaml"),
            "git_commit": record.get("git_commit"),
            "created": _when(record.get("created_unix")),
            "inputs": [lineage(ckpt, cfg)],
        }
        return node
    if kind == "output":
        return _node_of_manifest({**record, "uri": folder}, index)
    identity = record.get("run_identity", {})
    node = {
        "kind": "checkpoint",
        "uri": folder,
        "step": record.get("step"),
        "run_version": record.get("run_version"),
        "code": identity.get("code"),
        "config": identity.get("config"),
        "git_commit": record.get("git_commit"),
        "tokenizer_sha256": record.get("tokenizer_sha256"),
        "data": record.get("data_uri"),
        "inputs": [],
    }
    if identity.get("inputs", {}).get("base_model"):  # (a run started from a Hugging Face model directory)
        node["base_model"] = identity["inputs"]["base_model"]
    data = identity.get("inputs", {}).get("data") or identity.get("data")  # (a checkpoint made before issue 18)
    if data in index:
        node["inputs"].append(_node_of_manifest(index[data], index))
    else:
        node["data_digest"] = data  # a dataset made outside this root
    return node


def render(node: dict, depth: int = 0) -> list[str]:
    shown = ("step", "dataset_version", "code", "config", "git_commit", "tokenizer_sha256", "created", "data_digest")
    details = [f"{key} {node[key]}" for key in shown if node.get(key)]
    lines = [f"{'  ' * depth}{node['kind']}: {node['uri']}" + (f"  ({', '.join(details)})" if details else "")]
    for raw, fingerprint in (node.get("raw_inputs") or {}).items():
        lines.append(f"{'  ' * (depth + 1)}raw: {raw}  ({json.dumps(fingerprint, sort_keys=True)})")
    if node.get("base_model"):
        files = ", ".join(f"{name} {stamp}" for name, stamp in sorted(node["base_model"]["files"].items()))
        lines.append(f"{'  ' * (depth + 1)}base model: {node['base_model']['uri']}  ({files})")
    for child in node["inputs"]:
        lines += render(child, depth + 1)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print where a pipeline output came from.")
    parser.add_argument("path", help="an output folder, checkpoint, eval folder or a file inside one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    tree = lineage(args.path)  # S3 through the standard AWS_* environment variables
    print(json.dumps(tree, indent=2) if args.json else "\n".join(render(tree)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
