"""Decontamination: training documents that share a 13-gram with an evaluation text are dropped.

GPT-3's and Llama's rule: lower-cased word 13-grams, any overlap removes the training document. The
evaluation texts are those of the tasks the evaluate stage runs: the held-out split itself for `heldout_ppl`
(so a near-copy of a validation document that dedup missed cannot leak into training), plus any files named
in `evaluate.decontaminate_with` (JSONL with a `text` field, or plain text), e.g. a benchmark's questions.

Trade-off: the 13-grams are kept as a set of 64-bit hashes in memory, which grows with the evaluation texts
(about 80 bytes per n-gram in a Python set), not with the training corpus; a collision only costs a document.
"""

from __future__ import annotations

import json
import re

import xxhash

from stages.core import storage
from stages.core.config import StorageConfig

NGRAM = 13
WORD = re.compile(r"\w+", re.UNICODE)


def ngram_hashes(text: str, n: int = NGRAM) -> set[int]:
    words = WORD.findall(text.lower())
    return {xxhash.xxh3_64_intdigest(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def is_contaminated(text: str, banned: frozenset[int] | set[int], n: int = NGRAM) -> bool:
    if not banned:
        return False
    words = WORD.findall(text.lower())
    return any(xxhash.xxh3_64_intdigest(" ".join(words[i : i + n])) in banned for i in range(len(words) - n + 1))


def texts_from_files(uris: list[str], cfg: StorageConfig | None = None):
    """Evaluation texts from JSONL files (their `text` field) or plain text files (one text per file)."""
    for uri in uris:
        with storage.open_uri(uri, "rb", cfg, compression="infer") as f:
            data = f.read().decode("utf-8")
        if uri.endswith((".jsonl", ".jsonl.gz", ".json")):
            for line in data.splitlines():
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            yield data
