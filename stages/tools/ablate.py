"""Data ablations: which variant of the data makes the better model, measured the way FineWeb and DCLM chose their
filters (train small proxy models on each variant, compare their evaluations).

An ablation is a base preset, shared overrides and named variants, each a set of overrides of the data sections
(`no-gopher: {filter.gopher_quality.enabled: false}`, `dedup-0.8: {dedup.threshold: 0.8}`). Outputs are versioned
by identity, so the stages variants share (ingest, usually) are built once. What keeps the comparison fair:

- one tokenizer: the first variant's (the reference) is given to every variant (`tokenizer.path`), so the same
  text is the same tokens everywhere and losses compare directly;
- one proxy model and token budget: the base config's model and train sections; a variant may not change them
  (nor evaluate), which is refused before any work starts;
- one held-out set no variant trained on: documents of the reference's deduplicated output picked by a hash of
  their id, written once to `heldout-<version of that output>.jsonl` under the ablation's folder; every variant's
  tokenize stage drops the training documents sharing a 13-gram with it (`evaluate.decontaminate_with`) and every
  evaluation reads it (`evaluate.heldout`);
- at least two seeds (`train.seed`: initialization and data order) per variant, so a difference can be set
  against the spread between seeds.

`run` takes the steps in order through `execute(cfg, stages)` (the flow: its stage tasks; `run_plain`: the
stages here, one after another; with `cluster.dask_address`, the proxy runs side by side on the cluster's
workers) and returns the summary: per variant the held-out bits per byte (tokenizer-free)
and loss per seed with mean and spread, the data kept (documents, tokens), the seconds each stage took to build,
and a verdict saying whether the differences exceed the seed spread. It is saved with a plot and every run's
lineage in `{storage.root}/ablations/{digest}/` (the digest: base, overrides, variants and seeds).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stages import pipeline
from stages.core import parallel, storage
from stages.core.config import ConfigError, PipelineConfig, load_config
from stages.core.documents import read_docs
from stages.core.stage import committed_shards
from stages.core.storage import StageOutput
from stages.tools.preflight import preflight

# What a variant may change: the data stages' sections but the tokenizer's (every variant gets the reference's).
# Not storage: the variants share one root (and a variant's overrides are shown in the artifacts, where a
# credential must never be).
DATA_SECTIONS = tuple(
    section
    for stage in pipeline.PIPELINE.dataset_part
    if stage is not pipeline.PIPELINE["tokenizer"]
    for section in stage.sections
)
METRIC = ("heldout_ppl", "bits_per_byte")  # lower is better; tokenizer-free
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
Execute = Callable[[PipelineConfig, tuple], dict]


class Spec(BaseModel):
    """What the `pretrain/ablate` deployment takes (and `run_plain`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    preset: str = "tiny"
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    seeds: list[int] = Field([1, 2], min_length=2)
    overrides: dict[str, Any] = {}  # for every variant: storage.root, train.max_steps, ...
    heldout_docs: int = Field(100, gt=0)  # documents in the common held-out set
    heldout_permille: int = Field(50, gt=0, le=1000)  # of the reference's documents eligible for it (by id hash)

    @field_validator("variants")
    @classmethod
    def _variant_keys(cls, variants: dict) -> dict:
        for name, overrides in variants.items():
            if not NAME.match(name):
                raise ValueError(f"variant {name!r}: names are letters, digits and . _ % + - (at most 64)")
            for key in overrides:
                if key.split(".", 1)[0] not in DATA_SECTIONS:
                    sections = ", ".join(DATA_SECTIONS)
                    raise ValueError(f"variant {name}: {key}: a variant changes the data ({sections}); the proxy "
                                     "model, its token budget and the evaluation are the same for all")  # fmt: skip
        return variants

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds}: each seed once")
        return seeds


@dataclass
class Ablation:
    spec: Spec
    configs: dict[str, PipelineConfig]  # each variant's config as loaded (before the shared tokenizer and held-out)
    uri: str

    @property
    def reference(self) -> str:
        return next(iter(self.configs))


def load(spec: Spec | dict, resolve: Callable[[PipelineConfig], PipelineConfig] = lambda c: c) -> Ablation:
    """Every variant's config loaded and checked (preflight) before any work: a bad one fails naming the variant.
    `resolve`: what the flow does to a config first (its credentials block)."""
    if not isinstance(spec, Spec):
        try:
            spec = Spec.model_validate(spec)
        except ValidationError as exc:  # (its messages without the values given: they may hold a credential)
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"ablation: {problems}") from None
    configs = {}
    for name, overrides in spec.variants.items():
        try:
            cfg = resolve(load_config(spec.preset, {**spec.overrides, **overrides}))
            preflight(cfg)
        except ConfigError as exc:
            raise ConfigError(f"variant {name}: {exc}") from None
        if METRIC[0] not in cfg.evaluate.tasks:
            raise ConfigError(f"variant {name}: evaluate.tasks {cfg.evaluate.tasks}: an ablation compares {METRIC[0]}")
        configs[name] = cfg
    base = configs[next(iter(configs))]
    digest = hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Ablation(spec, configs, storage.join(base.storage.root, "ablations", digest))


def variant_config(ab: Ablation, name: str, tokenizer: str, heldout: str, seed: int | None = None) -> PipelineConfig:
    """A variant with the shared tokenizer and held-out set (and a seed: one proxy run)."""
    cfg = ab.configs[name].model_copy(deep=True)
    cfg.tokenizer.path = tokenizer
    cfg.evaluate.heldout = heldout
    cfg.evaluate.decontaminate_with = [heldout, *cfg.evaluate.decontaminate_with]
    if seed is not None:
        cfg.train.seed = seed
    return cfg


def write_heldout(ab: Ablation, docs: StageOutput) -> str:
    """The common held-out set: the first `heldout_docs` documents of the reference's deduplicated output whose id
    hashes into the eligible `heldout_permille` (shards read in order, only until there are enough)."""
    cfg, spec = ab.configs[ab.reference], ab.spec
    uri = storage.join(ab.uri, f"heldout-{docs.uri.rstrip('/').rsplit('/', 1)[1]}.jsonl")  # (that output's version)
    if storage.exists(uri, cfg.storage):
        return uri  # (the same reference output and spec give the same documents)
    picked: list[str] = []
    for shard in committed_shards(docs):
        for doc in read_docs(docs.path(shard), cfg.storage):
            if int(hashlib.sha256(doc.id.encode()).hexdigest()[:8], 16) % 1000 < spec.heldout_permille:
                picked.append(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False))
            if len(picked) >= spec.heldout_docs:
                break
        if len(picked) >= spec.heldout_docs:
            break
    if len(picked) < 4:
        raise ValueError(f"{docs.uri}: {len(picked)} documents for the held-out set; raise heldout_permille")
    with storage.atomic_write(uri, cfg.storage, "w") as f:
        f.write("".join(line + "\n" for line in picked))
    return uri


PROXY = ("train", "evaluate")  # the stages of one proxy run


def run(ab: Ablation, execute: Execute, log: Callable[[str], None] = print) -> dict:
    """The reference's data up to its tokenizer, the held-out set, each variant's data, then the proxy runs (train
    and evaluate, one per variant and seed); the summary, saved. The variants' data are built one after another
    (two variants may share a stage the reference does not; each stage's units spread over a Dask cluster when one
    is configured); with `cluster.dask_address` the proxy runs, whose outputs are all distinct, run side by side on
    its workers, each a plain run of the two stages there."""
    registry = pipeline.PIPELINE
    reference = ab.configs[ab.reference]
    before_tokens = registry.ancestors(registry.training_data)  # (up to the tokenizer: the held-out comes first)
    execute(reference, before_tokens)
    docs = registry.output(registry[registry.training_data].inputs["docs"], reference)
    tokenizer = storage.join(registry.output("tokenizer", reference).uri, "tokenizer.json")
    heldout = write_heldout(ab, docs)
    log(f"ablation: held-out set {heldout}; tokenizer {tokenizer} for every variant")
    data = {name: execute(variant_config(ab, name, tokenizer, heldout), registry.dataset_part) for name in ab.configs}
    pairs = [(name, seed) for name in ab.configs for seed in ab.spec.seeds]
    proxies = [variant_config(ab, name, tokenizer, heldout, seed) for name, seed in pairs]
    address = reference.cluster.dask_address
    if address:
        log(f"ablation: {len(proxies)} proxy runs side by side on {address}")
        runs = parallel.map_in_processes(proxy_run, proxies, workers=1, dask_address=address)
    else:
        runs = []
        for (name, seed), cfg in zip(pairs, proxies):
            log(f"ablation: variant {name}, seed {seed}")
            runs.append(execute(cfg, tuple(registry[stage] for stage in PROXY)))
    results = {name: {"data": data[name], "runs": []} for name in ab.configs}
    for (name, seed), stats in zip(pairs, runs):
        results[name]["runs"].append({"seed": seed, **stats})
    summary = summarize(ab, results, heldout)
    png = save(ab, summary)
    log(f"ablation: {summary['verdict']}")
    return {**summary, "png": png}  # (the plot's bytes for an artifact: not in results.json)


def proxy_run(cfg: PipelineConfig) -> dict:
    """One proxy run as plain stage calls (on whichever machine runs it: a Dask worker, side by side)."""
    return {stage: pipeline.PIPELINE.run(stage, cfg, log=lambda _: None) for stage in PROXY}


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip


def summarize(ab: Ablation, results: dict[str, dict], heldout: str) -> dict:
    """Per variant: the metric per seed with its mean and spread, held-out loss, data kept and build seconds per
    stage; the verdict against the reference."""
    registry = pipeline.PIPELINE
    variants = {}
    for name, result in results.items():
        scores = [run["evaluate"]["metrics"][METRIC[0]][METRIC[1]] for run in result["runs"]]
        tokens = result["data"][registry.training_data]
        variants[name] = {
            "overrides": ab.spec.variants[name],
            METRIC[1]: _spread(scores),
            "per_seed": {run["seed"]: score for run, score in zip(result["runs"], scores)},
            "heldout_mc_acc": _spread([run["evaluate"]["metrics"].get("heldout_mc", {}).get("acc", float("nan"))
                                       for run in result["runs"]]),  # fmt: skip
            "train_loss": _spread([run["train"]["final_loss"] for run in result["runs"]]),
            "tokens_per_run": result["runs"][0]["train"]["tokens_seen"],
            "docs_kept": tokens["docs"]["train"],
            "tokens_kept": tokens["tokens"]["train"],
            "seconds": {stage: round(stats.get("seconds", 0.0), 1) for stage, stats in result["data"].items()}
            | {"train": round(sum(train_seconds(run["train"]) for run in result["runs"]), 1)},
            "checkpoints": [run["train"]["checkpoint"] for run in result["runs"]],
        }
    return {"uri": ab.uri, "heldout": heldout, "metric": ".".join(METRIC), "seeds": ab.spec.seeds,
            "reference": ab.reference, "variants": variants, "verdict": verdict(ab.reference, variants)}  # fmt: skip


def train_seconds(stats: dict) -> float:
    """A proxy run's training time: this run's, or for one finished earlier (skipped now), its time stepping."""
    if not stats.get("skipped"):
        return stats["seconds"]
    return stats["tokens_seen"] / stats["tokens_per_s"] if stats.get("tokens_per_s") else 0.0


def verdict(reference: str, variants: dict[str, dict]) -> str:
    """For each variant against the reference: the difference of the means, and whether it exceeds the seed spread
    (the larger of the two variants' ranges between seeds)."""
    ref = variants[reference][METRIC[1]]
    lines = []
    for name, v in variants.items():
        if name == reference:
            continue
        m = v[METRIC[1]]
        diff = m["mean"] - ref["mean"]
        spread = max(m["max"] - m["min"], ref["max"] - ref["min"])
        better = "better" if diff < 0 else "worse"
        if abs(diff) > spread:
            lines.append(f"{name} is {better} than {reference} by {abs(diff):.4f} {METRIC[1]}, more than the seed "
                         f"spread ({spread:.4f})")  # fmt: skip
        else:
            lines.append(f"{name} vs {reference}: {diff:+.4f} {METRIC[1]}, within the seed spread ({spread:.4f}): "
                         "no difference these runs can tell")  # fmt: skip
    return "; ".join(lines) or "one variant: nothing to compare"


def table(summary: dict) -> list[dict]:
    """One row per variant, the artifact's table."""
    rows = []
    for name, v in summary["variants"].items():
        m = v[METRIC[1]]
        rows.append({
            "variant": name,
            "overrides": json.dumps(v["overrides"]) if v["overrides"] else "(base)",
            f"{METRIC[1]} mean": round(m["mean"], 4),
            "spread (min-max)": f"{m['min']:.4f}-{m['max']:.4f}",
            "std": round(m["std"], 4),
            "per seed": ", ".join(f"{seed}: {value:.4f}" for seed, value in v["per_seed"].items()),
            "heldout_mc acc": round(v["heldout_mc_acc"]["mean"], 3),
            "docs kept": v["docs_kept"],
            "tokens kept": v["tokens_kept"],
            "seconds per stage": ", ".join(f"{stage} {s}" for stage, s in v["seconds"].items()),
        })  # fmt: skip
    return rows


def plot_png(summary: dict) -> bytes:
    """The metric per variant: each seed a dot, the mean a bar, the spread a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 4), dpi=100)
    for i, name in enumerate(names):
        v = summary["variants"][name]
        m = v[METRIC[1]]
        ax.bar(i, m["mean"], color="#9ab", width=0.6)
        ax.vlines(i, m["min"], m["max"], color="black")
        ax.plot([i] * len(v["per_seed"]), list(v["per_seed"].values()), "o", color="#246", markersize=4)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"held-out {METRIC[1]} (lower is better)")
    low = min(v[METRIC[1]]["min"] for v in summary["variants"].values())
    high = max(v[METRIC[1]]["max"] for v in summary["variants"].values())
    ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
    ax.set_title(f"{len(summary['seeds'])} seeds per variant")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def save(ab: Ablation, summary: dict) -> bytes:
    """results.json (the summary with every run's lineage) and ablation.png, beside the held-out set; the PNG."""
    from stages.tools import lineage

    cfg = ab.configs[ab.reference]
    for v in summary["variants"].values():
        v["lineage"] = [lineage.lineage(ckpt, cfg.storage) for ckpt in v["checkpoints"]]
    png = plot_png(summary)
    with storage.atomic_write(storage.join(ab.uri, "ablation.png"), cfg.storage) as f:
        f.write(png)
    summary["plot_uri"] = storage.join(ab.uri, "ablation.png")
    storage.write_json(storage.join(ab.uri, "results.json"), summary, cfg.storage)
    return png


def run_plain(ab: Ablation, log: Callable[[str], None] = print) -> dict:
    """The ablation without Prefect: each stage here, in order (skipped when its output is current)."""
    registry = pipeline.PIPELINE

    def execute(cfg: PipelineConfig, stages: tuple) -> dict:
        return {stage.name: registry.run(stage.name, cfg, log=log) for stage in stages}

    return run(ab, execute, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="a JSON file: {preset, variants: {name: {key: value}}, seeds, overrides}")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        summary = run_plain(load(json.load(f)))
    print(json.dumps({k: summary[k] for k in ("uri", "verdict")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
