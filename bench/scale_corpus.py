"""A WARC corpus of a gigabyte or more, made of real text, for benchmarking the pipeline at scale. Nothing is
downloaded at build time: the text is the documentation and manual pages Debian installs.

    .venv/bin/python bench/scale_corpus.py OUT_DIR [--gb 1.0] [--file-mb 128] [--seed 0]

Sources (install them first; the builder uses whatever subset is there, and stops with a message when it finds
almost no text). About 230 MB of distinct text in 30 languages (Debian bookworm):

    apt-get update && apt-get install -y --no-install-recommends \\
      manpages-de manpages-fr manpages-es manpages-it manpages-pl manpages-pt-br manpages-ja manpages-ru \\
      manpages-nl manpages-zh manpages-uk manpages-cs manpages-ro manpages-da manpages-fi manpages-sv \\
      manpages-tr manpages-hu debian-handbook python3.11-doc linux-doc-6.1 glibc-doc \\
      developers-reference developers-reference-de developers-reference-fr developers-reference-it \\
      developers-reference-ja developers-reference-ru maint-guide maint-guide-es maint-guide-fr maint-guide-it \\
      maint-guide-ja maint-guide-ru debian-reference-en debian-reference-de debian-reference-fr \\
      debian-reference-es debian-reference-it debian-reference-ja debian-reference-pt debian-reference-zh-cn \\
      debian-faq debian-faq-de debian-faq-fr debian-faq-it debian-faq-ru debian-policy perl-doc \\
      postgresql-doc-15 git-doc bash-doc debian-history gnu-standards

Texts, from /usr/share/doc, /usr/share/man, /usr/share/debian-reference and /usr/share/developers-reference:
- HTML documentation -> its visible text (Resiliparse's html2text, whole page: the docs' own menus included);
- plain text (README, NEWS, *.txt, *.md, *.rst, gzipped or not) as is, except in a package that has HTML
  documentation, where the text files are mostly the same book again (Sphinx _sources, a book's .txt export);
- manual pages (roff, mostly gzipped) -> text by a small regex converter (bench/man_text.py: requests dropped,
  the text of font and heading macros kept, escapes mapped to characters);
- the Google Cloud CLI's 16,000 manual pages (where it is installed) are left out: the alpha, beta and GA pages
  of a command are near duplicates of one another, as are its commands' pages;
- copyright files and changelogs are left out: licences and "New upstream release" recur across packages and
  would be near duplicates nobody planted.
A text needs 100 words (a CJK character counts as a word); identical texts (up to whitespace) count once. Each
keeps its path and a language guessed from it (/usr/share/man/de/, html/fr-FR/, index.ja.html, else "en").

Pages: texts over 20,000 words are cut at paragraph boundaries into parts of about 4,000 words; each part is a
page made by bench/extraction.py's `make_page` (the text as an article inside a navigation menu, a cookie banner,
a sidebar, comments from other texts of the same language, a tag cloud and a footer, in one of three site
markups). The texts are visited in a shuffled order, and again in a new order with fresh boilerplate and new URLs
until the byte target is reached: there are only so many distinct texts, and the stats say how many pages repeat
an earlier cycle's text (a dedup stage sees those as duplicates too).

Planted, among the records, at random positions (the manifest is `planted` in the stats):
- exact_duplicate (~10%): the text of a page already written, with a new URL and a new draw of boilerplate;
- near_duplicate (~10%): such a text with 2-6% of its words deleted, replaced or inserted, or with some of its
  paragraphs moved;
- junk (~5%): link farms (hundreds of links, no prose), one line repeated, random tokens, tiny or empty pages and
  404s, and non-HTML responses (image/png with a binary payload, application/json).

Output: OUT_DIR/part-00000.warc.gz, ... of about --file-mb MiB of WARC each before compression, every record
its own gzip member as in Common Crawl; each file opens with a warcinfo record, then response records with HTTP
headers (Content-Type text/html; charset=utf-8, or the payload's type), WARC-Target-URI
https://site-N.example/SECTION/M, WARC-Date, WARC-Identified-Payload-Type and SHA-1 digests. Records are written
by hand (warcio gzips at level 9 and draws random record ids), so the output is the same for the same seed and
installed packages. Pages are made and written one at a time: memory holds the text pool, not the output.
OUT_DIR/.text_pool.jsonl.gz keeps the extracted texts for the next build (used while this script and the
installed files are unchanged).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import random
import re
import sys
import time
import uuid
import zlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.extraction import escape, make_page
from bench.man_text import man_to_text, tidy

ROOTS = ("/usr/share/doc", "/usr/share/man", "/usr/share/debian-reference", "/usr/share/developers-reference")
APT_HINT = "install Debian documentation first: see the apt-get command in bench/scale_corpus.py's docstring"
MIN_WORDS = 100
LONG_WORDS = 20_000  # texts longer than this become several pages
PART_WORDS = 4_000  # of about this many words each
MIN_TEXTS, MIN_POOL_BYTES = 200, 2_000_000  # below this the sources are not installed: stop
GZIP_LEVEL = 6
SNIPPET = 400
CACHE = ".text_pool.jsonl.gz"  # the extracted texts, kept in the output folder for the next build
SECTIONS = ("docs", "blog", "wiki", "articles", "news", "forum", "help", "manual")
SITES = 5_000
EPOCH = datetime(2024, 3, 1, tzinfo=timezone.utc)

# the share of records of each kind; the rest are pages of the pool's texts
EXACT, NEAR, JUNK = 0.10, 0.10, 0.05
JUNK_KINDS = {"link_farm": 0.25, "repeated_line": 0.2, "random_tokens": 0.2, "tiny": 0.2,
              "image_png": 0.075, "application_json": 0.075}  # fmt: skip

CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
PARAGRAPH = re.compile(r"\n\s*\n")


def word_count(text: str) -> int:
    """Words between spaces, and a word for each CJK character (Chinese and Japanese put no spaces between words)."""
    return len(text.split()) + len(CJK.findall(text))


# ---------------------------------------------------------------------------------------------------- languages

LANGS = {"ar", "ca", "cs", "da", "de", "el", "es", "fa", "fi", "fr", "hr", "hu", "id", "it", "ja", "ko", "nb",
         "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sr", "sv", "tr", "uk", "vi", "zh"}  # fmt: skip
ALIASES = {"sp": "es"}  # (the kernel's Documentation/translations/sp_SP)
LANG_DIR = re.compile(r"^([a-z]{2})(?:[_-][A-Za-z]{2,4})?(?:[.@][\w-]+)?$")  # de, pt_BR, fr-FR, de.UTF-8
LANG_INFIX = re.compile(r"\.([a-z]{2})(?:[_-][A-Za-z]{2})?\.(?:html?|txt|md|rst)\b")  # index.fr.html, x.ja.txt.gz


def language(path: str) -> str:
    """The language a path names: a directory (man/de/, html/fr-FR/), an infix (index.ja.html), else "en"."""
    parts = path.split("/")
    for part in parts[:-1]:
        m = LANG_DIR.match(part)
        if m and ALIASES.get(m.group(1), m.group(1)) in LANGS:
            return ALIASES.get(m.group(1), m.group(1))
    m = LANG_INFIX.search(parts[-1])
    if m and m.group(1) in LANGS:
        return m.group(1)
    if len(parts) > 4 and parts[3] == "doc" and parts[4].rsplit("-", 1)[-1] in LANGS:  # /usr/share/doc/pkg-fr
        return parts[4].rsplit("-", 1)[-1]
    return "en"


# ---------------------------------------------------------------------------------------------------- sources

HTML_NAME = re.compile(r"\.x?html?(?:\.gz)?$", re.I)
TEXT_NAME = re.compile(r"(?:\.(?:txt|md|rst|text)(?:\.gz)?$)|^(?:README|NEWS|FAQ|TODO|HACKING|THANKS)", re.I)
MAN_NAME = re.compile(r"\.\d[\w:+-]*(?:\.gz)?$")
GENERATED = ("gcloud",)  # the Google Cloud CLI's 16,000 pages: each command's alpha, beta and GA pages are alike
SPHINX_INDEX = re.compile(r"^(?:genindex|py-modindex|modindex|search|objects)\b")


def kind_of(path: str) -> str | None:
    """'html', 'text' or 'man' for a file worth reading, else None."""
    name = path.rsplit("/", 1)[-1]
    if name == "copyright" or name.lower().startswith("changelog") or "/_sources/" in path:
        return None
    if path.startswith("/usr/share/man/"):
        return "man" if MAN_NAME.search(name) and not name.startswith(GENERATED) else None
    if HTML_NAME.search(name):
        return None if SPHINX_INDEX.match(name) else "html"
    return "text" if TEXT_NAME.search(name) else None


def package_files(root: str) -> list[tuple[str, str]]:
    """(path, kind) of the files under `root` to read; text files go where there is HTML (the same book again)."""
    found = []
    for folder, dirs, files in os.walk(root):  # (symlinked folders are not followed: they repeat other packages)
        dirs.sort()
        for name in sorted(files):
            path = f"{folder}/{name}"
            kind = kind_of(path)
            if kind is not None and os.path.isfile(path):
                found.append((path, kind))
    if any(kind == "html" for _, kind in found):
        found = [(path, kind) for path, kind in found if kind != "text"]
    return found


def source_files() -> list[tuple[str, str]]:
    """Every source file, in a fixed order; a package is a folder right under /usr/share/doc, or a whole root."""
    files = []
    for root in ROOTS:
        if not os.path.isdir(root):
            continue
        if root == "/usr/share/doc":
            for pkg in sorted(os.listdir(root)):
                if os.path.isdir(f"{root}/{pkg}") and not os.path.islink(f"{root}/{pkg}"):
                    files += package_files(f"{root}/{pkg}")
        else:
            files += package_files(root)
    return files


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # (old manual pages)


def read_text(path: str, kind: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    if kind == "html":
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        return tidy(extract_plain_text(HTMLTree.parse(raw.decode("utf-8", errors="replace"))))
    if b"\0" in raw[:4096]:  # (a binary file with a text-like name)
        return ""
    text = decode(raw)
    return man_to_text(text) if kind == "man" else tidy(text)


def extract_all(files: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """The distinct texts of these files: {text, lang, source}; and counts by source kind."""
    texts, seen, kinds = [], set(), Counter()
    for path, kind in files:
        try:
            text = read_text(path, kind)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError):
            kinds["unreadable"] += 1
            continue
        if word_count(text) < MIN_WORDS:
            continue
        key = hashlib.sha1(" ".join(text.split()).encode()).digest()
        if key in seen:
            kinds["identical"] += 1
            continue
        seen.add(key)
        kinds[kind] += 1
        texts.append({"text": text, "lang": language(path), "source": path})
    return texts, dict(kinds)


def fingerprint(files: list[tuple[str, str]]) -> str:
    """What a cached pool was made from: this script and the man page converter (the extraction), and every source
    file's size and time."""
    h = hashlib.sha1(Path(__file__).read_bytes() + (Path(__file__).parent / "man_text.py").read_bytes())
    for path, _ in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def gather(cache: Path | None = None) -> tuple[list[dict], dict]:
    """The distinct texts of the installed documentation, and counts by source kind; read from `cache` when it
    was made from the same files by the same script (extracting takes half a minute or more), else written there."""
    files = source_files()
    key = fingerprint(files)
    if cache is not None and cache.exists():
        try:
            with gzip.open(cache, "rt", encoding="utf-8") as f:
                head = json.loads(f.readline())
                if head.get("fingerprint") == key:
                    return [json.loads(line) for line in f], head["kinds"]
        except (OSError, EOFError, ValueError, KeyError):
            pass  # (a cache cut short or from elsewhere: extract again)
    texts, kinds = extract_all(files)
    size = sum(len(t["text"].encode()) for t in texts)
    if len(texts) < MIN_TEXTS or size < MIN_POOL_BYTES:
        raise SystemExit(f"scale_corpus: only {len(texts)} texts ({size / 1e6:.1f} MB) found under "
                         f"{', '.join(ROOTS)}; {APT_HINT}")  # fmt: skip
    if cache is not None:
        partial = cache.with_name(cache.name + ".partial")
        with gzip.open(partial, "wt", encoding="utf-8", compresslevel=1) as f:
            f.write(json.dumps({"fingerprint": key, "kinds": kinds}) + "\n")
            for t in texts:
                f.write(json.dumps(t, ensure_ascii=False) + "\n")
        os.replace(partial, cache)
    return texts, kinds


def split_long(text: str) -> list[str]:
    """A text of over LONG_WORDS words as parts of about PART_WORDS, cut between paragraphs (between lines when a
    paragraph alone is too long); shorter texts whole."""
    if word_count(text) <= LONG_WORDS:
        return [text]
    units = []
    for paragraph in PARAGRAPH.split(text):
        if word_count(paragraph) <= PART_WORDS:
            units.append(paragraph)
        else:
            units += paragraph.split("\n")
    parts, current, words = [], [], 0
    for unit in units:
        n = word_count(unit)
        if current and words + n > PART_WORDS:
            parts.append("\n\n".join(current))
            current, words = [], 0
        current.append(unit)
        words += n
    if current:
        parts.append("\n\n".join(current))
    return [p for p in parts if word_count(p) >= MIN_WORDS]


# ---------------------------------------------------------------------------------------------------- pages


def near_duplicate(text: str, words: list[str], rng: random.Random) -> str:
    """The text with a few of its paragraphs moved, or 2-6% of its words deleted, replaced or inserted."""
    paragraphs = PARAGRAPH.split(text)
    if len(paragraphs) >= 4 and rng.random() < 0.3:
        for _ in range(rng.randint(1, max(1, len(paragraphs) // 5))):
            paragraphs.insert(rng.randrange(len(paragraphs)), paragraphs.pop(rng.randrange(len(paragraphs))))
        return "\n\n".join(paragraphs)
    rate, edited = rng.uniform(0.02, 0.06), []
    for paragraph in paragraphs:
        out = []
        for word in paragraph.split(" "):
            if rng.random() >= rate:
                out.append(word)
                continue
            op = rng.randrange(3)
            if op == 1:
                out.append(rng.choice(words))
            elif op == 2:
                out += [word, rng.choice(words)]
        edited.append(" ".join(out))
    return "\n\n".join(edited)


def random_token(rng: random.Random) -> str:
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=rng.randint(2, 12)))


def junk(kind: str, words: list[str], sentences: list[str], rng: random.Random) -> tuple[str, bytes, int]:
    """(content type, payload, HTTP status) of a junk record of this kind."""
    if kind == "link_farm":
        links = "".join(f'<li><a href="https://site-{rng.randrange(SITES)}.example/{random_token(rng)}">'
                        f'{escape(" ".join(rng.choices(words, k=rng.randint(1, 3))))}</a></li>'
                        for _ in range(rng.randint(200, 800)))  # fmt: skip
        html = f"<html><head><title>Best links</title></head><body><ul>{links}</ul></body></html>"
    elif kind == "repeated_line":
        line = escape(rng.choice(sentences))
        html = "<html><body>" + f"<p>{line}</p>" * rng.randint(50, 500) + "</body></html>"
    elif kind == "random_tokens":
        tokens = " ".join(random_token(rng) for _ in range(rng.randint(300, 3000)))
        html = f"<html><head><title>{random_token(rng)}</title></head><body><p>{tokens}</p></body></html>"
    elif kind == "tiny":
        choice = rng.randrange(4)
        if choice == 0:
            return "text/html; charset=utf-8", b"", 200
        if choice == 1:
            body = b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
            return "text/html; charset=utf-8", body, 404
        html = ("<html><head></head><body></body></html>" if choice == 2
                else f"<html><body><p>{escape(' '.join(rng.choices(words, k=rng.randint(1, 8))))}</p></body></html>")
    elif kind == "image_png":
        header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.randbytes(13) + rng.randbytes(4)
        return "image/png", header + rng.randbytes(rng.randint(1_000, 60_000)), 200
    else:  # application_json
        items = [{"id": rng.randrange(10**9), "name": rng.choice(words), "score": round(rng.random(), 4),
                  "tags": rng.choices(words, k=rng.randint(0, 5))} for _ in range(rng.randint(1, 200))]  # fmt: skip
        return "application/json", json.dumps({"items": items}, ensure_ascii=False).encode(), 200
    return "text/html; charset=utf-8", html.encode(), 200


# ---------------------------------------------------------------------------------------------------- WARC


def digest(data: bytes) -> str:
    return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def warc_record(headers: dict[str, str], block: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(block))}.items())
    return b"WARC/1.0\r\n" + head.encode() + b"\r\n" + block + b"\r\n\r\n"


def response(uri: str, date: datetime, record_id: str, warcinfo_id: str, content_type: str, payload: bytes,
             status: int = 200) -> bytes:  # fmt: skip
    reason = {200: "OK", 404: "Not Found"}[status]
    http = (f"HTTP/1.1 {status} {reason}\r\nDate: {date:%a, %d %b %Y %H:%M:%S GMT}\r\nServer: nginx\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n\r\n").encode()  # fmt: skip
    return warc_record({
        "WARC-Type": "response", "WARC-Date": f"{date:%Y-%m-%dT%H:%M:%SZ}", "WARC-Record-ID": record_id,
        "WARC-Target-URI": uri, "WARC-Warcinfo-ID": warcinfo_id, "WARC-Block-Digest": digest(http + payload),
        "WARC-Payload-Digest": digest(payload), "WARC-Identified-Payload-Type": content_type.split(";")[0],
        "Content-Type": "application/http; msgtype=response"}, http + payload)  # fmt: skip


def warcinfo(name: str, date: datetime, record_id: str) -> bytes:
    fields = ("software: bench/scale_corpus.py\r\nformat: WARC File Format 1.0\r\n"
              "description: real Debian documentation in synthetic pages, with planted duplicates and junk\r\n")
    block = fields.encode()
    return warc_record({"WARC-Type": "warcinfo", "WARC-Date": f"{date:%Y-%m-%dT%H:%M:%SZ}",
                        "WARC-Record-ID": record_id, "WARC-Filename": name, "WARC-Block-Digest": digest(block),
                        "Content-Type": "application/warc-fields"}, block)  # fmt: skip


class Writer:
    """part-NNNNN.warc.gz files of about `file_bytes` before compression, a gzip member per record."""

    def __init__(self, out_dir: Path, file_bytes: int, new_id):
        self.out_dir, self.file_bytes, self.new_id = out_dir, file_bytes, new_id
        self.files, self.raw, self.packed, self.f, self.in_file = [], 0, 0, None, 0
        self.warcinfo_id = ""

    def warcinfo_for_next(self) -> str:
        """The id of the warcinfo record of the file the next record goes to (opening that file if need be)."""
        if self.f is None:
            self.open()
        return self.warcinfo_id

    def write(self, record: bytes) -> None:
        if self.f is None:
            self.open()
        self._put(record)
        if self.in_file >= self.file_bytes:
            self.close()

    def open(self) -> None:
        name = f"part-{len(self.files):05d}.warc.gz"
        self.files.append(name)
        self.f, self.in_file, self.warcinfo_id = open(self.out_dir / name, "wb"), 0, self.new_id()
        self._put(warcinfo(name, EPOCH, self.warcinfo_id))

    def _put(self, record: bytes) -> None:
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # (31: a gzip member, its mtime 0)
        packed = packer.compress(record) + packer.flush()
        self.f.write(packed)
        self.raw += len(record)
        self.in_file += len(record)
        self.packed += len(packed)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# ---------------------------------------------------------------------------------------------------- build


def pool_of(texts: list[dict]) -> list[dict]:
    """The texts as pages' texts: long ones in parts."""
    pool = []
    for t in texts:
        parts = split_long(t["text"])
        pool += [{"text": p, "lang": t["lang"], "source": t["source"], "part": k} for k, p in enumerate(parts)]
    return pool


def snippets(text: str, rng: random.Random) -> list[str]:
    """A text's opening and a passage from further on (from a sentence's start), about 400 characters each, for
    other pages' boilerplate: make_page splits a whole text of `others` for each link and tag it makes, which for
    documentation-sized texts costs more than the page itself."""
    found = [text[:SNIPPET].rsplit(" ", 1)[0]]
    if len(text) > 3 * SNIPPET:
        start = text.find(". ", rng.randrange(SNIPPET, len(text) - 2 * SNIPPET)) + 2
        found.append(text[start : start + SNIPPET].rsplit(" ", 1)[0])
    return [s for s in found if s.split()]


def draw_kind(rng: random.Random, duplicates_possible: bool) -> str:
    """What the next record is: "original" (the cycle's next text), a duplicate kind, or a junk kind."""
    draw = rng.random()
    if draw < JUNK:
        return rng.choices(list(JUNK_KINDS), weights=list(JUNK_KINDS.values()))[0]
    if draw < JUNK + EXACT + NEAR and duplicates_possible:
        return "exact_duplicate" if draw < JUNK + EXACT else "near_duplicate"
    return "original"


def build(out_dir: Path, target_bytes: int, file_mb: int = 128, seed: int = 0) -> dict:
    """Write part-*.warc.gz under `out_dir` until `target_bytes` of WARC (uncompressed) are written; the stats."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.warc.gz"):  # (a smaller build over a bigger one leaves no stale parts)
        old.unlink()
    texts, source_kinds = gather(out_dir / CACHE)
    pool = pool_of(texts)
    gathered = time.perf_counter() - started
    rng = random.Random(seed)
    by_lang: dict[str, list[str]] = {}  # menus, links and comments come from texts of the page's language
    for p in pool:
        by_lang.setdefault(p["lang"], []).extend(snippets(p["text"], rng))
    everything = [s for lang in sorted(by_lang) for s in by_lang[lang]]
    sample = rng.sample([p["text"] for p in pool], min(len(pool), 2000))
    words = sorted({w for t in sample for w in t.split() if w.isalpha()})
    sentences = [s for t in sample[:300] for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split())) if 4 <= len(s) < 200]
    ids = lambda: f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"  # noqa: E731 (seeded, unlike uuid4)
    writer = Writer(out_dir, file_mb * 2**20, ids)
    planted, languages, pages, cycles, repeats = Counter(), Counter(), 0, 0, 0
    try:
        while writer.raw < target_bytes:
            order = list(range(len(pool)))
            rng.shuffle(order)
            cycles += 1
            position = 0
            while position < len(order) and writer.raw < target_bytes:
                kind = draw_kind(rng, duplicates_possible=position > 0)
                date = EPOCH + timedelta(seconds=pages * 7)
                uri = f"https://site-{rng.randrange(SITES)}.example/{rng.choice(SECTIONS)}/{pages}"
                if kind in JUNK_KINDS:
                    content_type, payload, status = junk(kind, words, sentences, rng)
                else:
                    if kind == "original":
                        entry = pool[order[position]]
                        position += 1
                        repeats += cycles > 1
                    else:  # a text already written in this cycle
                        entry = pool[order[rng.randrange(position)]]
                    text = entry["text"] if kind != "near_duplicate" else near_duplicate(entry["text"], words, rng)
                    others = by_lang[entry["lang"]] if len(by_lang[entry["lang"]]) >= 50 else everything
                    html, _ = make_page(text, others, rng)
                    content_type, payload, status = "text/html; charset=utf-8", html.encode(), 200
                    languages[entry["lang"]] += 1
                if kind != "original":
                    planted[kind] += 1
                writer.write(response(uri, date, ids(), writer.warcinfo_for_next(), content_type, payload, status))
                pages += 1
    finally:
        writer.close()
    return {
        "out_dir": str(out_dir), "files": len(writer.files), "pages": pages, "distinct_texts": len(texts),
        "text_parts": len(pool), "text_mb": round(sum(len(p["text"].encode()) for p in pool) / 1e6, 1),
        "sources": source_kinds, "cycles": cycles, "repeat_pages": repeats,
        "languages": dict(languages.most_common()), "planted": dict(sorted(planted.items())),
        "uncompressed_bytes": writer.raw, "compressed_bytes": writer.packed,
        "gather_seconds": round(gathered, 1), "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--gb", type=float, default=1.0, help="uncompressed WARC bytes to write, in GiB")
    parser.add_argument("--file-mb", type=int, default=128, help="uncompressed size of each file, in MiB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stats = build(args.out_dir, int(args.gb * 2**30), args.file_mb, args.seed)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
