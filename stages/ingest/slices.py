"""Big input files into bounded slices, so that one 1 GB file is many units of work, not one core's.

A slice is `Slice(start, end, first)`: the bytes [start, end) of the file (row groups, for Parquet), and the number
of its first line or row. Reading a slice gives the same records, positions and ids as reading the whole file
would, so the output does not depend on where the cuts fall. How each format is cut (`ingest.slice_bytes` apart):

- JSONL, uncompressed: at line ends. The first line number of each slice comes from one pass that counts
  newlines (bytes.count, gigabytes a second: far below the cost of parsing the lines).
- Parquet: runs of whole row groups of about slice_bytes (compressed sizes and row counts from the footer).
- WARC and WET, plain or .gz: at record boundaries near each cut, found without reading the file up to them. In a
  .gz file every record is its own gzip member (the WARC standard's recommendation, and Common Crawl's files), so a
  boundary is a gzip header whose member inflates to a WARC header; in a plain file it is "WARC/1." after the blank
  line that ends a record. A WARC position is its byte offset ("record at byte N"), known in any slice.
- Compressed JSONL (one gzip or zstd stream) and plain text files: one slice (a stream cannot be entered in the
  middle; a text file is one document).

A WARC boundary found this way is a good guess, not proof: an archived .warc.gz served as a page is stored
uncompressed by deflate, so its members' bytes appear in the outer file. Each slice therefore reports where the
record after its end starts (`Cursor.next_record`); if that is not where the next slice began, the cut was false
and the stage reads the file again as one slice (stages/ingest/stage.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from stages.core import storage
from stages.core.config import PipelineConfig

READ_CHUNK = 8 << 20  # bytes read at a time by the newline count
SEARCH_WINDOW = 1 << 20  # bytes searched at a time for a WARC record's start
OVERLAP = 64 << 10
GZIP_MAGIC = b"\x1f\x8b\x08"
WARC_START = b"WARC/1."
RECORD_END = b"\r\n\r\n"
PLAIN_START = RECORD_END + WARC_START  # (a record's blank last line, then the next one's version line)


@dataclass(frozen=True)
class Slice:
    start: int = 0  # byte offset (Parquet: first row group)
    end: int | None = None  # None: to the end of the file
    first: int = 1  # number of the slice's first line or row

    def to_list(self) -> list:
        return [self.start, self.end, self.first]


WHOLE = Slice()


def splittable(uri: str, fmt: str) -> bool:
    """Whether a file of this name can be cut at all (known from the name, without reading it)."""
    name = uri.lower()
    if fmt == "jsonl":
        return not name.endswith((".gz", ".zst"))
    return fmt in ("parquet", "warc")


def plan(uri: str, fmt: str, size: int, cfg: PipelineConfig) -> list[Slice]:
    """The slices of a file of `size` bytes, in order; one WHOLE slice for a file that is no bigger than a slice,
    cannot be cut, or whose structure cannot be read here (the reader then finds and reports the damage)."""
    target = cfg.ingest.slice_bytes
    if not splittable(uri, fmt) or size <= target:
        return [WHOLE]
    if fmt == "parquet":
        return parquet_slices(uri, cfg, target)
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        if fmt == "jsonl":
            return line_slices(f, target)
        starts = [0]
        for cut in range(target, size, target):
            found = record_start(f, max(cut, starts[-1] + 1), uri.lower().endswith(".gz"))
            if found is None:
                break
            if found > starts[-1]:
                starts.append(found)
    return [Slice(a, b) for a, b in zip(starts, starts[1:] + [None])]


def line_slices(f, target: int) -> list[Slice]:
    """Cuts after the first newline at or past every `target` bytes, each slice's first line counted."""
    slices, start, first, lines, position, cut = [], 0, 1, 0, 0, target
    while chunk := f.read(READ_CHUNK):
        searched = 0
        while cut <= position + len(chunk):
            newline = chunk.find(b"\n", max(cut - 1 - position, searched))
            if newline < 0:
                break
            lines += chunk.count(b"\n", searched, newline + 1)
            searched = newline + 1
            slices.append(Slice(start, position + searched, first))
            start, first = position + searched, lines + 1
            cut = start + target
        lines += chunk.count(b"\n", searched)
        position += len(chunk)
    if slices and start == position:  # (the last cut fell at the file's end: the last slice runs to it)
        last = slices.pop()
        start, first = last.start, last.first
    return slices + [Slice(start, None, first)]


def record_start(f, at: int, compressed: bool) -> int | None:
    """The byte offset of the first WARC record that seems to start at or after `at`, or None before the end."""
    marker = GZIP_MAGIC if compressed else PLAIN_START
    position = at
    while True:
        f.seek(position)
        window = f.read(SEARCH_WINDOW + OVERLAP)  # (the overlap: a start across the window's edge)
        k = window.find(marker)
        while 0 <= k < SEARCH_WINDOW:
            if not compressed:
                return position + k + len(RECORD_END)
            if member_at(memoryview(window)[k:]):
                return position + k
            k = window.find(marker, k + 1)
        if len(window) <= SEARCH_WINDOW:
            return None
        position += SEARCH_WINDOW


def member_at(data: memoryview) -> bool:
    """Whether the gzip member at the start of `data` inflates to the start of a WARC record."""
    try:
        return zlib.decompressobj(31).decompress(data, len(WARC_START)) == WARC_START
    except zlib.error:
        return False


def parquet_slices(uri: str, cfg: PipelineConfig, target: int) -> list[Slice]:
    """Runs of row groups of about `target` compressed bytes; a file whose footer cannot be read is one slice."""
    import pyarrow.parquet as pq

    try:
        with storage.open_uri(uri, "rb", cfg.storage) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception:  # (no footer, not Parquet: the reader quarantines the file's tail with the error)
        return [WHOLE]
    slices, start, first, rows, held = [], 0, 1, 0, 0
    for group in range(meta.num_row_groups):
        info = meta.row_group(group)
        if held and held + info.total_byte_size > target:
            slices.append(Slice(start, group, first))
            start, first, held = group, rows + 1, 0
        held += info.total_byte_size
        rows += info.num_rows
    return slices + [Slice(start, None, first)]
