"""The compute and cost plan on the command line, without Prefect (the formulas: stages/train/budget.py).

    python -m stages.tools.budget [PRESET] [--set section.field=value ...] [--json]

Exit status 1 when the plan rejects the config (each reason on stderr), 2 for a config that does not load.
"""

from __future__ import annotations

import argparse
import json
import sys

from stages import pipeline
from stages.core.config import ConfigError, PipelineConfig, load_config
from stages.train import budget


def dataset_tokens(cfg: PipelineConfig) -> int | None:
    """Tokens of the tokenized dataset (train and val) the run would read, when it exists."""
    try:
        manifest = pipeline.PIPELINE.output(pipeline.PIPELINE.training_data, cfg).manifest()
    except RuntimeError:  # (an upstream stage has not run: its version is not known yet)
        return None
    return sum(manifest["counts"]["tokens"].values()) if manifest else None


def estimate(cfg: PipelineConfig) -> dict:
    """The plan, the shards sized from the dataset when it exists."""
    return budget.estimate(cfg, dataset_tokens(cfg))


def plan_markdown(cfg: PipelineConfig) -> str:
    """The plan as the pretrain flow's compute-plan artifact shows it."""
    return budget.markdown(estimate(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", nargs="?", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.set)
        est = estimate(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=2) if args.json else budget.markdown(est))
    found = budget.problems(cfg, est)
    for problem in found:
        print(f"rejected: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
