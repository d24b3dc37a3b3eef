"""The flow of the `pretrain/data-refresh` deployment: add the raw files that arrived since the dataset's last
version as a new part, then (optionally) continue pretraining on it; on the cron schedule `refresh.schedule`.

Thin like the `pretrain` flow: it finds what is new and builds the part's config (stages/tools/ledger.py), runs the
same stage tasks as `pretrain` on it (every stage training depends on: stages/pipeline.py) and records the
version. The whole refresh holds the ledger's lock, so two refreshes of one dataset never build the same part
twice or write the same version number: the second waits, then finds nothing new.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.credentials import resolve_credentials
from flows.locks import output_lock
from flows.pretrain import run_stages
from stages import pipeline
from stages.core.config import load_config
from stages.tools import ledger
from stages.tools.preflight import preflight


# Named `pretrain` as the full pipeline's flow is: Prefect addresses a deployment as <flow name>/<deployment>,
# and the refresh belongs beside `pretrain/full` as `pretrain/data-refresh` (each deployment keeps its entrypoint).
@flow(name="pretrain")
def data_refresh(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> dict:
    """Ingest only raw files new since the last dataset version, dedup them against everything kept, tokenize
    them with the dataset's tokenizer and record a new version; then, with `refresh.continue_training`,
    continue pretraining on the new part and evaluate."""
    registry = pipeline.PIPELINE
    cfg = resolve_credentials(load_config(preset, overrides))
    preflight(cfg)
    logger = get_run_logger()
    stats: dict[str, Any] = {}
    with output_lock("dataset", ledger.ledger_uri(cfg), logger.info):
        previous = ledger.latest(cfg)
        part_cfg = None
        if previous is None:
            logger.info("no dataset version yet: the first is this config's own pipeline output")
            part_cfg = cfg
        else:
            new, changed = ledger.new_raw_files(cfg, previous)
            for uri in changed:
                logger.warning("%s changed since version %d consumed it; left out, not ingested twice", uri,
                               previous["version"])  # fmt: skip
            if new:
                logger.info("%d new raw files since version %d: %s", len(new), previous["version"], ", ".join(new))
                part_cfg = ledger.increment_config(cfg, previous, new)
            else:
                logger.info("nothing new under ingest.inputs since version %d", previous["version"])
            stats.update(new_files=new, changed_files=changed)
        if part_cfg is not None:
            stats.update(run_stages(part_cfg, registry.part_of_a_refresh))
            version = ledger.record(cfg, previous, part_cfg)
            logger.info("recorded dataset version %d", version["version"])
        else:
            version = previous
    stats["version"] = version["version"]
    create_markdown_artifact(
        key="dataset-version",
        markdown="# Dataset version\n\n" + ledger.markdown(version),
        description="recorded by this run" if part_cfg is not None else "unchanged: no new raw files",
    )
    # (also when nothing is new: a retry of a refresh killed after recording its version still trains on it)
    if cfg.refresh.continue_training and version["version"] > 1 and not ledger.trained(cfg, version):
        train_cfg = ledger.continued_training_config(cfg, version)
        start = train_cfg.train.initial_checkpoint
        logger.info("continued pretraining on part %d from %s", len(version["parts"]), start)
        stats.update(run_stages(train_cfg, registry.training_and_after))
        stats["trained"] = ledger.record_trained(cfg, version, train_cfg)
    return stats
