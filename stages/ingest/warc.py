"""WARC and WET files to records, read with FastWARC (ChatNoir's C++ WARC reader; about 3x warcio's speed).

Response records with an HTML payload become documents through `Extraction` (stages/ingest/extract.py), a batch
of pages at a time (records are handed on in file order all the same); WET conversion records are text already.
Which payloads count as pages, and how their bytes are decoded, follows datatrove's `process_record`
(WARC-Identified-Payload-Type, libmagic when it is absent; UTF-8, then cchardet), so the documents are datatrove's
WarcReader's; one difference: a response whose HTTP Content-Type says HTML is taken as HTML without asking
libmagic, which costs as much as extracting the page.

Damage: a record whose payload is shorter than its Content-Length is quarantined as truncated_record in an
uncompressed file; in a .gz file it means the gzip stream ended inside the record, so nothing after it can be
read and reading stops there (the stage records an unreadable tail). Headers cut short (FastWARC then reports a
record without a Content-Length, and stops) or that FastWARC cannot parse stop reading likewise.

A record's position is its byte offset ("record at byte N", in the file as stored: a .gz file's member), which a
slice of a big file knows as well as a reader of the whole file. `records` reads the records that start in
[start, end) (stages/ingest/slices.py) and leaves in `cursor.next_record` where the record after them starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from stages.core import storage
from stages.core.config import IngestConfig, PipelineConfig
from stages.ingest.extract import NOT_HTML, Extraction, NotHtml, batch_full, decoded

HTML = ("text/html", "application/xhtml+xml")


def declared_html(record) -> str | None:
    """text/html when the HTTP response says so (its Content-Type), else None: not known."""
    declared = (record.http_content_type or "").split(";")[0].strip().lower() if record.is_http else ""
    return declared if declared in HTML else None


def page(record, conversion: bool) -> tuple[dict | str, int]:
    """The record's id, url and date with its HTML (bytes: the extraction child decodes them) or WET text, or the
    kind of record skipped; and the payload bytes read (all of them: a payload shorter than its Content-Length is a
    cut file)."""
    content = record.reader.read()
    mime = record.headers.get("WARC-Identified-Payload-Type") or declared_html(record)
    if mime is None:  # (libmagic takes about 0.3 ms a page: as long as extracting it)
        import magic

        mime = magic.from_buffer(content, mime=True)
    if mime not in HTML and not (conversion and mime == "text/plain"):
        return NOT_HTML, len(content)
    headers = record.headers
    data = {"id": headers["WARC-Record-ID"], "url": headers.get("WARC-Target-URI"), "date": headers.get("WARC-Date")}
    if not conversion:
        return {**data, "html": content}, len(content)
    text = decoded(content)
    return ({**data, "text": text} if text is not None else NOT_HTML), len(content)


class Pending:
    """Records read but not yet handed on, in file order: pages wait for their batch's extraction."""

    def __init__(self, uri: str, ic: IngestConfig, extraction: Extraction, skipped: Counter):
        self.uri, self.ic, self.extraction, self.skipped = uri, ic, extraction, skipped
        self.items: list = []  # Record, or (where, offset, page) awaiting extraction
        self.pages = self.bytes = 0

    def add(self, item) -> bool:
        """Keep `item`; whether a batch is full."""
        self.items.append(item)
        if isinstance(item, tuple):
            self.pages += 1
            self.bytes += len(item[2]["html"])
        return batch_full(self.pages, self.bytes)

    def flush(self) -> Iterator:
        from stages.ingest.readers import Record

        texts = iter(self.extraction.texts([item[2]["html"] for item in self.items if isinstance(item, tuple)]))
        items, self.items, self.pages, self.bytes = self.items, [], 0, 0
        for item in items:
            if isinstance(item, Record):
                yield item
                continue
            text = next(texts)
            if isinstance(text, NotHtml):  # (bytes no charset decodes: as datatrove's process_record, not a page)
                self.skipped[NOT_HTML] += 1
            else:
                yield document(self.uri, self.ic, *item, text)


def document(uri: str, ic: IngestConfig, where: str, offset: int, data: dict, text, extracted: bool = True):
    """The page's document, or why it is not one: `text` is what extraction gave (or a WET record's own)."""
    from stages.ingest.readers import _bad, _from_object

    if isinstance(text, TimeoutError):
        found = _bad(where, "extraction_timeout", data["url"])
    elif isinstance(text, Exception):  # the extractor raised, or the child died: this page, not the stage
        found = _bad(where, "extraction_failed", f"{data['url']}: {text}")
    elif extracted and not text.strip():
        found = _bad(where, "extraction_empty", data["url"])
    else:
        obj = {"id": data["id"], "text": text, "url": data["url"], "metadata": {"date": data["date"]}}
        found = _from_object(obj, uri, where, ic, data["url"])
    found.offset = offset
    return found


def records(
    uri: str,
    cfg: PipelineConfig,
    cursor,
    skipped: Counter,
    extraction: Extraction,
    start: int = 0,
    end: int | None = None,
) -> Iterator:
    """Every record that starts in [start, end), in file order; pages are extracted a batch at a time."""
    pending = Pending(uri, cfg.ingest, extraction, skipped)
    try:
        for item in read_items(uri, cfg, cursor, skipped, start, end):
            if pending.add(item):
                yield from pending.flush()
    except Exception:
        yield from pending.flush()  # (what was read before the damage, before the stage records it)
        raise
    yield from pending.flush()


def read_items(uri: str, cfg: PipelineConfig, cursor, skipped: Counter, start: int, end: int | None):
    """Each document record as a `Record` (quarantined) or (where, offset, page) to extract; skipped ones counted."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    from stages.ingest.readers import _bad, is_environmental

    compressed = uri.lower().endswith(".gz")
    with storage.open_uri(uri, "rb", cfg.storage) as f:
        f.seek(start)
        cursor.at(f"record at byte {start}", start)
        for record in ArchiveIterator(f, parse_http=True):
            if end is not None and record.stream_pos >= end:
                cursor.next_record = record.stream_pos
                return
            where, offset = f"record at byte {record.stream_pos}", record.stream_pos
            cursor.at(where, offset)
            if record.headers.get("Content-Length") is None:  # (FastWARC's reading of headers cut short)
                raise EOFError(f"{where} ends inside its headers (no Content-Length): the file is cut")
            if record.record_type not in (WarcRecordType.response, WarcRecordType.conversion):
                skipped["warc_non_document_records"] += 1  # warcinfo, request, metadata
                continue
            conversion = record.record_type == WarcRecordType.conversion
            try:
                data, read = page(record, conversion)
            except Exception as exc:
                if is_environmental(exc, cfg):
                    raise
                data, read = _bad(where, "invalid_record", f"{type(exc).__name__}: {exc}"), record.content_length
            short = record.content_length - read
            if short > 0 and compressed:
                raise EOFError(f"the gzip stream ends inside the {where}, {short} bytes short of its end")
            cursor.at(f"the record after byte {offset}", None)
            if short > 0:
                yield _bad(where, "truncated_record", f"payload {short} bytes short of its Content-Length", offset)
            elif isinstance(data, str):
                skipped[data] += 1
            elif not isinstance(data, dict):
                data.offset = offset
                yield data
            elif conversion:  # (WET: the text is there already)
                yield document(uri, cfg.ingest, where, offset, data, data["text"], extracted=False)
            else:
                yield where, offset, data
