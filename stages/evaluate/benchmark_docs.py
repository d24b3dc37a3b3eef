"""The `process_docs` functions of the benchmark tasks whose local copy is laid out unlike lm-eval's source
(stages/evaluate/benchmarks.py): each maps the local rows to the fields lm-eval's own definition reads."""

from __future__ import annotations


def lambada_docs(dataset):
    """OLMo's LAMBADA requests to lambada_openai's rows: the passage is the context plus its last word."""
    return dataset.map(
        lambda row: {"text": row["request"]["context"] + row["request"]["continuation"]},
        remove_columns=dataset.column_names,
    )


def boolq_docs(dataset):
    """google/boolq's `answer` (a bool) to SuperGLUE's `label` (0 no, 1 yes), which lm-eval's boolq reads."""
    return dataset.map(lambda row: {"label": int(row["answer"])}, remove_columns=["answer"])
