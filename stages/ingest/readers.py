"""Raw input files to records, one file at a time: what ingest reads and how it tells a bad record from a bad file.

Formats, by extension: JSONL (.jsonl/.json, plain, .gz or .zst), Parquet, WARC with HTML pages (read with
FastWARC, text extracted by Resiliparse or trafilatura: stages/ingest/warc.py and extract.py), WET (.wet[.gz]:
text already extracted), and plain text files (.txt/.md, one document per file, as LitGPT's TextFiles).

Every raw record becomes a `Record`: a document, or why it is not one, with its position (line, row or WARC
record, and the byte offset where known), so the stage can account for each. JSONL and Parquet are read here
line by line and row by row rather than through datatrove's readers, which skip bad records without saying
where; WARC payloads are taken as datatrove's `process_record` takes them, and every page is extracted under a
deadline, so a pathological page times out instead of hanging the stage.

A damaged file (truncated gzip or zstd, a plain file named .gz, a Parquet file without its footer, a WARC cut
mid-member) is not a bad record: reading stops where the damage is. `read_records` keeps every record read before
it and ends the file with one `unreadable_tail` record naming the position and the error, so one corrupt file
never aborts the stage. Errors of the environment rather than the bytes (an endpoint gone, a permission refused,
an I/O error: an OSError with an errno) still fail the stage, which then resumes: quarantining a file because the
network blinked would lose it.

Memory per record is bounded whatever the input: a JSONL line longer than `line_limit` is skipped in pieces
(quarantined as too_large with its start), a text file is read only up to max_doc_bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import IO

from stages.core import storage
from stages.core.config import IngestConfig, PipelineConfig
from stages.core.documents import Doc
from stages.ingest.slices import WHOLE, Slice

FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".json": "jsonl",
    ".json.gz": "jsonl",
    ".json.zst": "jsonl",
    ".parquet": "parquet",
    ".warc": "warc",
    ".warc.gz": "warc",
    ".wet": "warc",
    ".wet.gz": "warc",
    ".txt": "text",
    ".md": "text",
}
QUARANTINE_RAW_CHARS = 2000  # enough of a bad record to see what is wrong with it
BOM = b"\xef\xbb\xbf"
SKIP_CHUNK = 1 << 20  # an over-long line is skipped this many bytes at a time
# Exceptions that are the environment's, not the file's: they fail the stage (see the module docstring).
ENVIRONMENT_ERRORS = (PermissionError, FileNotFoundError, ConnectionError, TimeoutError, MemoryError)


def detect_format(uri: str) -> str:
    name = PurePosixPath(uri).name.lower()
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{uri}: unknown input format (expected one of {', '.join(sorted(FORMATS))})")


@dataclass
class Record:
    """One raw record: a document, or why it is not one."""

    where: str  # "line 12", "row 7", "record 3", "file"
    doc: Doc | None = None
    reason: str | None = None
    raw: str = ""
    offset: int | None = None  # byte offset of the record (in the decompressed stream), where known


@dataclass
class Cursor:
    """Where a reader is about to read: what an unreadable tail is reported from."""

    where: str = "the start"
    offset: int | None = 0
    next_record: int | None = None  # a WARC slice's: where the record after its end starts (None: the file's end)

    def at(self, where: str, offset: int | None) -> None:
        self.where, self.offset = where, offset


@dataclass
class Tally:
    """What a reader counts beside its records: records skipped as not documents (by kind), and pages kept from
    each HTML extractor."""

    skipped: Counter = field(default_factory=Counter)
    extracted: Counter = field(default_factory=Counter)


def _bad(where: str, reason: str, raw, offset: int | None = None) -> Record:
    if isinstance(raw, bytes):
        raw = raw[: QUARANTINE_RAW_CHARS * 4].decode("utf-8", errors="replace")
    return Record(where, reason=reason, raw=str(raw)[:QUARANTINE_RAW_CHARS], offset=offset)


def _check_text(text, where: str, ic: IngestConfig, raw, offset: int | None) -> Record | None:
    if not isinstance(text, str):
        return _bad(where, "missing_text", raw, offset)
    if len(text.strip()) < ic.min_text_chars:
        return _bad(where, "empty_text", raw, offset)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape: not representable as UTF-8
        return _bad(where, "not_utf8", raw, offset)
    if size > ic.max_doc_bytes:
        return _bad(where, "too_large", f"{size} bytes: {text[:200]}", offset)
    if "\x00" in text:  # NUL never occurs in text: a binary file, or bytes that happen to decode
        return _bad(where, "binary", raw, offset)
    return None


def default_id(uri: str, where: str) -> str:
    """A record's id when it has none: its input's full URI and position, unique across all inputs of a run."""
    return f"{uri}#{where.replace(' ', '-')}"


def _from_object(obj: dict, uri: str, where: str, ic: IngestConfig, raw, offset: int | None = None) -> Record:
    text = obj.get("text")
    bad = _check_text(text, where, ic, raw, offset)
    if bad:
        return bad
    metadata = obj.get("metadata") or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except (ValueError, RecursionError):
            metadata = {"metadata": metadata}
    if not isinstance(metadata, dict):
        metadata = {"metadata": metadata}
    extra = {k: v for k, v in obj.items() if k not in ("id", "text", "url", "metadata") and v is not None}
    doc_id = obj.get("id")
    doc_id = str(doc_id) if doc_id is not None else default_id(uri, where)
    url = obj.get("url")
    doc = Doc(doc_id, text.strip(), uri, str(url) if url else None, {**metadata, **extra})
    return Record(where, doc, offset=offset)


def line_limit(ic: IngestConfig) -> int:
    """The longest JSONL line read whole: a document of max_doc_bytes, JSON-escaped (at most 6 bytes a character:
    \\uXXXX), plus room for its other fields. Longer lines are too_large without being held in memory."""
    return 6 * ic.max_doc_bytes + (1 << 20)


@contextlib.contextmanager
def open_lines(uri: str, cfg: PipelineConfig, start: int = 0) -> Iterator[IO[bytes]]:
    """A binary file object whose readline takes a size, decompressing .gz and .zst on the fly; a plain file's
    from byte `start` (a compressed one is never sliced).

    fsspec's own zstd wrapper cannot iterate lines, and its remote files' readline takes no size, so every case is
    wrapped here in a standard buffered reader.
    """
    with storage.open_uri(uri, "rb", cfg.storage) as raw:
        name = uri.lower()
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif name.endswith(".zst"):
            yield io.BufferedReader(ZstdFrames(raw), SKIP_CHUNK)
        else:
            raw.seek(start)
            yield io.BufferedReader(raw, SKIP_CHUNK)


class ZstdFrames(io.RawIOBase):
    """A zstd stream of one or more frames, read through. One that ends inside a frame raises EOFError, as gzip does:
    zstandard's own stream_reader just ends there, which passes a truncated file off as a shorter one."""

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self.raw, self.context = raw, zstandard.ZstdDecompressor()
        self.frame = self.context.decompressobj()
        self.started = False
        self.pending, self.position = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.position >= len(self.pending):
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise EOFError("zstd stream ended inside a frame (the file is truncated)")
                return 0
            self.pending, self.position = self._decompress(chunk), 0
        n = min(len(buffer), len(self.pending) - self.position)
        buffer[:n] = self.pending[self.position : self.position + n]
        self.position += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.frame.eof:  # the next frame begins in what the last one left over
                self.frame = self.context.decompressobj()
            self.started = True
            out.append(self.frame.decompress(data))
            data = self.frame.unused_data if self.frame.eof else b""
        return b"".join(out)


def bounded_lines(f: IO[bytes], limit: int, cursor: Cursor, piece: Slice) -> Iterator[tuple[int, int, bytes, bool]]:
    """(line number, byte offset, line, whole) for every line of the slice; a line over `limit` bytes comes as its
    first QUARANTINE_RAW_CHARS bytes with whole=False, the rest skipped without being held."""
    number, offset = piece.first - 1, piece.start
    while piece.end is None or offset < piece.end:
        cursor.at(f"line {number + 1}", offset)
        line = f.readline(limit)
        if not line:
            return
        number, start = number + 1, offset
        offset += len(line)
        if line.endswith(b"\n") or len(line) < limit:
            yield number, start, line, True
            continue
        while (rest := f.readline(SKIP_CHUNK)) and not rest.endswith(b"\n"):
            offset += len(rest)
        offset += len(rest)
        yield number, start, line[:QUARANTINE_RAW_CHARS], False


def read_jsonl(uri: str, cfg: PipelineConfig, cursor: Cursor, tally: Tally, piece: Slice) -> Iterator[Record]:
    with open_lines(uri, cfg, piece.start) as f:
        for number, offset, line, whole in bounded_lines(f, line_limit(cfg.ingest), cursor, piece):
            where = f"line {number}"
            if not whole:
                yield _bad(where, "too_large", line, offset)
                continue
            if number == 1:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue  # a blank line is not a record
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield _bad(where, "not_utf8", line, offset)
                continue
            # (ValueError: malformed JSON, or an integer past Python's 4300 digits; RecursionError: nesting too deep)
            except (ValueError, RecursionError):
                yield _bad(where, "invalid_json", line, offset)
                continue
            if not isinstance(obj, dict):
                yield _bad(where, "not_an_object", line, offset)
                continue
            yield _from_object(obj, uri, where, cfg.ingest, line, offset)


def read_parquet(uri: str, cfg: PipelineConfig, cursor: Cursor, tally: Tally, piece: Slice) -> Iterator[Record]:
    """The slice's row groups (all of them for a whole file)."""
    import pyarrow.parquet as pq

    with storage.open_uri(uri, "rb", cfg.storage) as f:
        row = piece.first - 1
        cursor.at(f"row {row + 1}", None)
        parquet = pq.ParquetFile(f)
        groups = range(piece.start, parquet.metadata.num_row_groups if piece.end is None else piece.end)
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups):
            for obj in batch.to_pylist():
                row += 1
                yield _from_object(obj, uri, f"row {row}", cfg.ingest, json.dumps(obj, default=str))
            cursor.at(f"row {row + 1}", None)


def read_text_file(uri: str, cfg: PipelineConfig, cursor: Cursor, tally: Tally, piece: Slice) -> Iterator[Record]:
    limit = cfg.ingest.max_doc_bytes + len(BOM)
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        yield _bad("file", "too_large", f"over {cfg.ingest.max_doc_bytes} bytes: {data[:200]!r}", 0)
        return
    try:
        text = data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError:
        yield _bad("file", "not_utf8", data, 0)
        return
    text = text.replace("\r\n", "\n")
    yield _from_object({"id": uri, "text": text}, uri, "file", cfg.ingest, data, 0)


def read_warc(uri: str, cfg: PipelineConfig, cursor: Cursor, tally: Tally, piece: Slice) -> Iterator[Record]:
    """Response records with HTML (extracted) and WET conversion records (already text): stages/ingest/warc.py."""
    from stages.ingest.extract import Extraction
    from stages.ingest.warc import records

    with Extraction(cfg.ingest) as extraction:
        try:
            yield from records(uri, cfg, cursor, tally.skipped, extraction, piece.start, piece.end)
        finally:
            tally.extracted.update(extraction.counts)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text_file, "warc": read_warc}


def is_environmental(exc: BaseException, cfg: PipelineConfig) -> bool:
    """Whether `exc` is the environment's (fail the stage, resume later) rather than the file's (quarantine)."""
    if isinstance(exc, ENVIRONMENT_ERRORS) or storage.unreachable(exc, cfg.storage) is not None:
        return True
    return isinstance(exc, OSError) and exc.errno is not None  # (gzip's BadGzipFile is an OSError without one)


def read_records(
    uri: str, cfg: PipelineConfig, tally: Tally, piece: Slice = WHOLE, cursor: Cursor | None = None
) -> Iterator[Record]:
    """Every record of one file's slice (stages/ingest/slices.py); a slice that cannot be read to its end ends
    with one `unreadable_tail` record. `cursor` ends where reading stopped."""
    cursor = cursor or Cursor(offset=piece.start)
    try:
        yield from READERS[detect_format(uri)](uri, cfg, cursor, tally, piece)
    except Exception as exc:
        if is_environmental(exc, cfg):
            raise
        at = f", byte {cursor.offset}" if cursor.offset is not None else ""
        error = f"{type(exc).__name__}: {exc}"
        yield _bad(f"{cursor.where} to the end", "unreadable_tail", f"reading stopped at {cursor.where}{at}: {error}",
                   cursor.offset)  # fmt: skip
