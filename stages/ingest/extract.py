"""HTML pages to their main text: Resiliparse (the default) or trafilatura, in batches, each page under a deadline.

- `resiliparse`: ChatNoir's Resiliparse (`extract_plain_text(..., main_content=True)`, DCLM's extractor), C++ over
  the lexbor parser. On documentation pages with navigation boilerplate it extracts many times as many pages per
  second as trafilatura, with higher word-level precision (bench/extraction.py).
- `trafilatura`: FineWeb's extractor, through datatrove's `Trafilatura` block (favour_precision).
- `ingest.fallback_extractor`: a page whose main extractor gives fewer than `fallback_min_chars` characters is
  extracted again with the other one, and the longer text is kept. The stats count pages per extractor.

The deadline (`ingest.extract_timeout_s`) keeps a pathological page from hanging a worker. Extraction runs in a
child process (datatrove's sandbox) that a timeout can kill: a signal cannot stop C++ code, and Resiliparse's
time grows with the square of a page's nesting depth (200,000 nested elements take it many minutes). Pages go
to the child in batches (up to BATCH_PAGES and BATCH_BYTES), so the round trip is paid once per batch, not per
page. A batch that runs past the deadline (or kills the child) is redone a page at a time, each under the
deadline: only a page that is slow alone is quarantined, whatever else was in its batch.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

from datatrove.pipeline.extractors.base import ExtractorSandbox

from stages.core.config import IngestConfig
from stages.core.parallel import exit_when_gone

# A batch's round trip costs a fixed part (pickling, two wake-ups) and a part per byte: 256 pages halve the
# deadline's cost against 64 (bench/extraction.py: +5% of extraction time against +8.5%), and a batch still
# ends well inside any deadline (256 trafilatura pages take about 2 s). The byte cap bounds a batch of big
# pages, which goes through a pipe, pickled, and is held twice.
BATCH_PAGES = 256
BATCH_BYTES = 8 << 20


def batch_full(pages: int, size: int) -> bool:
    """Whether `pages` pages of `size` bytes in all make a batch."""
    return pages >= BATCH_PAGES or size >= BATCH_BYTES


class Resiliparse:
    """Resiliparse's main-content extraction with the configured options (picklable: the sandbox ships it)."""

    def __init__(self, options: dict):
        self.options = options

    def __call__(self, html: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        return extract_plain_text(HTMLTree.parse(html), **self.options)


class Trafilatura:
    """datatrove's Trafilatura block's extraction, without its own sandbox (the batches' replaces it)."""

    def __init__(self, options: dict):
        from datatrove.pipeline.extractors import Trafilatura as Block

        self.block = Block(**options)

    def __call__(self, html: str) -> str:
        return self.block.extract(html)


def extractor(name: str, ic: IngestConfig) -> Callable[[str], str]:
    if name == "resiliparse":
        return Resiliparse(ic.resiliparse.model_dump())
    return Trafilatura(ic.trafilatura.model_dump())


NOT_HTML = "warc_non_html_records"  # (the skipped-records count of a payload that is not a readable page)


def decoded(content: bytes) -> str | None:
    """A payload's text: UTF-8, else the charset cchardet detects (datatrove's process_record); None if neither."""
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        import cchardet

        charset = cchardet.detect(content)["encoding"]
        if not charset or charset.upper() == "UTF-8":
            return None
        try:
            return content.decode(charset)
        except (UnicodeDecodeError, LookupError):
            return None


class NotHtml:
    """A page whose bytes no charset decodes."""


class Batch:
    """What the child runs: each page (its bytes: decoding is part of the child's work) through the extractor
    (and the fallback when it finds too little). Per page (text, extractor used), (None, the error) or (None, None)
    for bytes that do not decode, so one page's failure never loses the batch."""

    def __init__(self, ic: IngestConfig):
        self.main, self.main_name = extractor(ic.extractor, ic), ic.extractor
        self.fallback = extractor(ic.fallback_extractor, ic) if ic.fallback_extractor else None
        self.fallback_name, self.min_chars = ic.fallback_extractor, ic.fallback_min_chars

    def __call__(self, pages: list[bytes]) -> list[tuple[str | None, str | None]]:
        return [self.one(page) for page in pages]

    def one(self, page: bytes | str) -> tuple[str | None, str | None]:
        html = decoded(page) if isinstance(page, bytes) else page
        if html is None:
            return None, None
        try:
            text, used = self.main(html) or "", self.main_name
            if self.fallback is not None and len(text.strip()) < self.min_chars:
                other = self.fallback(html) or ""
                if len(other.strip()) > len(text.strip()):
                    text, used = other, self.fallback_name
            return text, used
        except Exception as exc:  # (the extractor's, about this page)
            return None, f"{type(exc).__name__}: {exc}"


class RestartableSandbox(ExtractorSandbox):
    """datatrove's ExtractorSandbox (extraction in a child process that a timeout can kill), restartable under
    any start method.

    After a timeout the sandbox starts a new child, pickling itself as part of the child's target unless the
    start method is fork. Inside our worker processes the start method is forkserver, and the sandbox then holds
    the previous child's Process object, which cannot be pickled ('cannot pickle weakref'): the restart failed,
    and every later page of the file with it. The child needs only the sandbox's settings, so only those are
    pickled.
    """

    def __init__(self, timeout: float, warmup_text=""):
        super().__init__(timeout, warmup_text)
        self.owner = os.getpid()

    def __getstate__(self) -> dict:
        return {"timeout": self.timeout, "warmup_text": self.warmup_text, "owner": self.owner}

    def _worker(self, conn, extract_fn):
        exit_when_gone(self.owner)  # (the child: it must not outlive the process extracting through it)
        return super()._worker(conn, extract_fn)


class PageTimeout(TimeoutError):
    """A page's extraction ran past the deadline."""


class PageFailed(RuntimeError):
    """The extractor raised on a page, or the child died on it."""


_SANDBOX: dict[str, RestartableSandbox] = {}  # this process's, by its settings: see Extraction


class Extraction:
    """A slice's pages through the sandbox, batch by batch; `counts` says how many pages each extractor's text was
    kept from.

    A worker process keeps its sandbox (and its child) from one slice to the next: starting a child under
    forkserver costs about a second (it imports the extractors), as long as extracting a thousand pages. A sandbox
    of other settings replaces it; the child exits with the worker (exit_when_gone)."""

    def __init__(self, ic: IngestConfig):
        self.timeout = ic.extract_timeout_s
        self.batch = Batch(ic)
        self.counts: Counter = Counter()
        key = ic.model_dump_json(include={"extract_timeout_s", "extractor", "fallback_extractor",
                                          "fallback_min_chars", "resiliparse", "trafilatura"})  # fmt: skip
        if key not in _SANDBOX:
            for old in _SANDBOX.values():
                old.__exit__(None, None, None)
            _SANDBOX.clear()
            _SANDBOX[key] = RestartableSandbox(self.timeout, warmup_text=([],))  # (the warm-up: an empty batch)
        self.sandbox = _SANDBOX[key]

    def __enter__(self) -> Extraction:
        return self

    def __exit__(self, *exc) -> None:
        pass  # (the sandbox stays for the process's next slice)

    def texts(self, pages: list[bytes | str]) -> list:
        """Each page's main text ('' for none), a NotHtml, or the PageTimeout or PageFailed it ended with."""
        if not pages:
            return []
        try:
            results = self.sandbox.process_document((pages,), self.batch)
        except (TimeoutError, EOFError) as exc:
            if len(pages) == 1:
                return [PageTimeout("extraction timed out") if isinstance(exc, TimeoutError) else PageFailed(str(exc))]
            return [self.texts([html])[0] for html in pages]  # (one at a time: only the slow page times out)
        out: list[str | Exception] = []
        for text, used in results:
            if text is None:
                out.append(PageFailed(used) if used is not None else NotHtml())
                continue
            if text.strip():
                self.counts[used] += 1
            out.append(text)
        return out
