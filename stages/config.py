"""Typed pipeline configuration, loaded from a YAML preset plus dotted overrides.

One pydantic model per stage, gathered in `PipelineConfig`. Every model forbids unknown fields, so a typo
(`train.lr_max`) fails at load time instead of being silently ignored (torchtitan's rule: no silent no-op
options). `load_config` reports errors as `<file>: <dotted.field>: <problem>` so a user can find the line.

Presets live in `config/*.yaml` at the repository root; `tiny` is the embedded default used by the demo and
the tests. Relative paths in a preset are resolved against the repository root, so the same preset works from
any working directory and inside a Prefect worker.

Overrides are `{"train.max_steps": 10}` mappings (a deployment parameter) or `["train.max_steps=10"]` strings
(the command line); string values are parsed as YAML scalars, so `10` is an int and `true` a bool.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "config"


class ConfigError(ValueError):
    """A configuration problem, named by file and field, raised before any work starts."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Strict):
    # Where every stage writes: a local folder or s3://bucket/prefix. Credentials not given here come from the
    # standard AWS environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
    root: str = "outputs/tiny"
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None


class IngestConfig(Strict):
    # Files or globs, local or s3://. Formats are recognised by extension: .jsonl[.gz], .parquet, .warc[.gz].
    inputs: list[str] = Field(min_length=1)
    docs_per_shard: int = Field(5000, gt=0)
    min_text_chars: int = Field(1, ge=1)  # fewer non-blank characters: quarantined as empty_text
    max_doc_bytes: int = Field(10_000_000, gt=0)  # larger documents: quarantined as too_large
    workers: int = Field(1, ge=1)  # processes; one input file each at a time


class FilterConfig(Strict):
    # FineWeb's pipeline keeps English with a fastText score >= 0.65; its other thresholds are datatrove's
    # defaults, which the stage uses unless a rule is switched off here.
    languages: list[str] = ["en"]
    language_threshold: float = Field(0.65, ge=0.0, le=1.0)
    lid_model_path: str = "models/lid.176.ftz"
    workers: int = Field(1, ge=1)  # processes; one ingest shard each at a time
    gopher_repetition: bool = True
    gopher_quality: bool = True
    c4_quality: bool = True
    fineweb_quality: bool = True


class DedupConfig(Strict):
    ngram: int = Field(5, ge=1)
    num_perm: int = Field(112, ge=16)
    threshold: float = Field(0.75, gt=0.0, lt=1.0)
    seed: int = 1


class TokenizerConfig(Strict):
    # Either train a byte-level BPE on the deduplicated text, or load `path` (a tokenizer.json).
    path: str | None = None
    vocab_size: int = Field(4096, ge=300)
    max_train_chars: int = Field(200_000_000, gt=0)  # a bounded sample: training cost must not grow with the corpus
    eos_token: str = "<|endoftext|>"


class TokenizeConfig(Strict):
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    chunk_bytes: str = "16MB"
    workers: int = Field(1, ge=1)


class ModelConfig(Strict):
    dim: int = Field(128, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = None  # None: multi-head attention; fewer: grouped-query attention
    ffn_multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        return self


class TrainConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda (NCCL, bf16) when available, else cpu (gloo)
    nproc_per_node: int = Field(2, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None  # host:port of the rendezvous when nnodes > 1
    seq_len: int = Field(128, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # sequences per rank per step
    max_steps: int = Field(60, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 1234
    loader_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class EvaluateConfig(Strict):
    tasks: list[str] = ["heldout_ppl"]
    max_docs: int | None = Field(200, gt=0)  # held-out documents scored; None: all
    batch_size: int = Field(8, gt=0)


class PipelineConfig(Strict):
    name: str = "tiny"
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def section_digest(self, *sections: str) -> str:
        """Digest of the named sections: a stage's identity includes only the config it reads."""
        data = self.model_dump(mode="json", include=set(sections))
        for section in data.values():
            if isinstance(section, dict):
                section.pop("workers", None)  # how many processes changes the speed, never the output
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """Full config including secrets, for handing to a child process; never log this."""
        data = self.model_dump(mode="json")
        for key in ("access_key_id", "secret_access_key"):
            secret = getattr(self.storage, key)
            data["storage"][key] = secret.get_secret_value() if secret else None
        return json.dumps(data)


def resolve_preset(preset: str | Path) -> Path:
    """A preset name (`tiny`) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"{path}: no such config preset (known presets: {known})")
    return path


def parse_overrides(overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _apply_override(data: dict, dotted: str, value: Any, source: str) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _resolve_relative(cfg: PipelineConfig) -> PipelineConfig:
    def local(p: str) -> str:
        return p if "://" in p or Path(p).is_absolute() else str(REPO_ROOT / p)

    cfg.storage.root = local(cfg.storage.root)
    cfg.ingest.inputs = [local(p) for p in cfg.ingest.inputs]
    cfg.filter.lid_model_path = local(cfg.filter.lid_model_path)
    if cfg.tokenizer.path:
        cfg.tokenizer.path = local(cfg.tokenizer.path)
    return cfg


def load_config(preset: str | Path = "tiny", overrides: dict[str, Any] | list[str] | None = None) -> PipelineConfig:
    path = resolve_preset(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = copy.deepcopy(data)
    parsed = parse_overrides(overrides)
    for dotted, value in parsed.items():
        _apply_override(data, dotted, value, f"{path} (override)")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "<root>"
            origin = "override" if any(field == k or field.startswith(k + ".") for k in parsed) else "preset"
            problems.append(f"{path}: {field}: {err['msg']} ({origin}, got {err.get('input')!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None
    return _resolve_relative(cfg)
