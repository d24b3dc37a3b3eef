"""The work itself, plain Python, importable and testable without Prefect.

- `pipeline.py`: the DAG, declared once: every stage in order and which stage feeds each of its inputs.
- `core/`: the plumbing every stage shares (the stage contract and skeleton, config, storage, documents,
  parallelism, failpoints); it imports no stage.
- one package per stage, named for it (`ingest/`, `filter/`, `dedup/`, `tokenizer/`, `tokenize/`, `train/`,
  `evaluate/`), each with its `stage.py` (the stage's `STAGE` and build) and the helpers only it needs. A stage may
  import `core/` and another stage's library modules, never another stage's `stage.py`.
- `tools/`: the command-line tools (plan, preflight, budget, lineage, export, the refresh ledger).
"""
