"""The normalized document table every data stage reads and writes: Parquet shards of (id, text, source, url,
metadata).

Stages stream: they read one shard at a time in record batches and write through `ShardWriter`, which rolls
over to a new file every `docs_per_shard` documents, so memory is bounded by one batch whatever the corpus
size. Each shard is committed with `storage.atomic_write`, so a killed stage never leaves a half-written file
under its final name. `metadata` is a JSON string rather than a struct column because sources disagree on its
keys; a struct would force one schema on every source.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import storage
from stages.core.config import StorageConfig

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("metadata", pa.string()),
    ]
)
BATCH_ROWS = 1024


@dataclass
class Doc:
    id: str
    text: str
    source: str
    url: str | None = None
    metadata: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {
            "id": self.id,
            "text": self.text,
            "source": self.source,
            "url": self.url,
            "metadata": json.dumps(self.metadata, sort_keys=True, ensure_ascii=False, default=str),
        }


def read_docs(uri: str, cfg: StorageConfig | None = None) -> Iterator[Doc]:
    """Stream the documents of one shard, a record batch at a time."""
    with storage.open_uri(uri, "rb", cfg) as f:
        parquet = pq.ParquetFile(f)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield Doc(row["id"], row["text"], row["source"], row["url"], json.loads(row["metadata"] or "{}"))


def read_batches(uri: str, cfg: StorageConfig | None = None, columns=("id", "text")) -> Iterator[pa.RecordBatch]:
    """Stream one shard's columns as Arrow record batches (for work that need not make Python objects of all)."""
    with storage.open_uri(uri, "rb", cfg) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=list(columns))


def read_texts(uri: str, cfg: StorageConfig | None = None, start: int = 0,
               end: int | None = None) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Stream (id, text) of one shard's documents [start, end): the two columns only, for stages that need nothing
    else (rows outside the range never become Python objects)."""
    first = 0  # the batch's first row
    for batch in read_batches(uri, cfg):
        rows = batch.num_rows
        if end is not None and first >= end:
            return
        if first + rows > start:
            part = batch.slice(max(0, start - first), (end if end is not None else first + rows) - max(first, start))
            yield from zip(part.column(0).to_pylist(), part.column(1).to_pylist())
        first += rows


def count_docs(uri: str, cfg: StorageConfig | None = None) -> int:
    with storage.open_uri(uri, "rb", cfg) as f:
        return pq.ParquetFile(f).metadata.num_rows


class ShardWriter:
    """Writes documents to `<prefix>-00000.parquet`, `<prefix>-00001.parquet`, ... under a folder URI."""

    def __init__(self, folder: str, prefix: str, docs_per_shard: int, cfg: StorageConfig | None = None):
        self.folder, self.prefix, self.docs_per_shard, self.cfg = folder, prefix, docs_per_shard, cfg
        self.files: list[str] = []
        self._rows: list[dict] = []
        self.docs = 0
        self.text_bytes = 0

    def write(self, doc: Doc) -> None:
        self._rows.append(doc.row())
        self.docs += 1
        self.text_bytes += len(doc.text.encode("utf-8"))
        if len(self._rows) >= self.docs_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"{self.prefix}-{len(self.files):05d}.parquet"
        # Build the file in memory (one shard, bounded by docs_per_shard) and commit it in one atomic write.
        buffer = io.BytesIO()
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        pq.write_table(table, buffer, compression="zstd", row_group_size=BATCH_ROWS)
        with storage.atomic_write(storage.join(self.folder, name), self.cfg) as f:
            f.write(buffer.getvalue())
        self.files.append(name)
        self._rows = []

    def close(self) -> list[str]:
        self._flush()
        return self.files

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
