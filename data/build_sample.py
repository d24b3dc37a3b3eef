#!/usr/bin/env python3
"""Build the small bundled sample corpus in data/sample/ from Debian packages.

All text is real text shipped by Debian 12 (bookworm) packages; nothing is
generated except the planted near-duplicates, which are copies of real
documents with a few small edits (words taken from the same document).

Needed apt packages (Debian 12)::

    apt-get update
    apt-get install -y --no-install-recommends \
        python3-doc fortunes fortunes-de fortunes-es fortunes-it \
        manpages manpages-de manpages-fr manpages-es manpages-it \
        man-db groff-base bsdextrautils mandoc

(python3-doc pulls in python3.11-doc; man-db + groff-base render man pages
to text, bsdextrautils provides col(1), mandoc renders man pages to HTML.
There is no fortunes-fr package in bookworm: French text comes from
manpages-fr only.)

Needed Python packages: warcio, pyarrow, e.g.::

    python3 -m venv /tmp/corpus-venv
    /tmp/corpus-venv/bin/pip install warcio pyarrow

Run from the repository root::

    /tmp/corpus-venv/bin/python data/build_sample.py        # writes data/sample/

Outputs (data/sample/):
  web.warc.gz               WARC/1.0: one warcinfo record + HTTP `response`
                            records holding python3.11-doc HTML pages and
                            mandoc-rendered HTML of (mostly translated) man pages
  docs.jsonl.gz             {"id","text","url","metadata"} per line: man pages
                            (en/de/fr/es/it) rendered to text, fortune sections
                            and single fortunes
  reference.parquet         columns id, text, url, metadata (JSON string), zstd:
                            python3.11-doc reST sources and man pages
  planted_duplicates.json   ground truth of planted exact/near duplicates
  natural_near_duplicates.json  all near-duplicate pairs among the non-planted
                            documents (Jaccard of word 5-gram shingles >= 0.8)
  manifest.json             package versions, counts, sizes, sha256 of outputs

The build is deterministic (fixed SEED, fixed WARC dates and record ids,
gzip mtime 0): running it twice gives byte-identical outputs on the same
package versions.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

SEED = 20240517
DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(DATA_DIR, "sample")

APT_PACKAGES = [
    "python3-doc", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it",
    "manpages", "manpages-de", "manpages-fr", "manpages-es", "manpages-it",
    "man-db", "groff-base", "bsdextrautils", "mandoc",
]
# packages whose files the corpus text comes from (python3-doc is a
# dependency-only package; the files belong to python3.11-doc)
SOURCE_PACKAGES = [
    "python3.11-doc", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it",
    "manpages", "manpages-de", "manpages-fr", "manpages-es", "manpages-it",
]
TOOL_PACKAGES = ["python3-doc", "man-db", "groff-base", "bsdextrautils", "mandoc"]

LICENSES = {
    "python3.11-doc": "PSF-2.0 (examples/recipes additionally 0BSD)",
    "fortunes": "BSD (fortune-mod, per debian/copyright); no separate licence stated for the quotations",
    "fortunes-de": "GPL-2+",
    "fortunes-es": "public domain (presumed, per debian/copyright); scripts GPL-2+",
    "fortunes-it": "public domain / freeware (per debian/copyright)",
    "manpages": "no SPDX line in page; debian/copyright: Files: * GPL-2+",
    "manpages-de": "GPL-3+ (translations)",
    "manpages-fr": "GPL-3+ (translations)",
    "manpages-es": "GPL-3+ (translations)",
    "manpages-it": "GPL-3+ (translations)",
}
MAN_LANG = {"manpages": "en", "manpages-de": "de", "manpages-fr": "fr",
            "manpages-es": "es", "manpages-it": "it"}
FORTUNE_LANG = {"fortunes": "en", "fortunes-de": "de", "fortunes-es": "es",
                "fortunes-it": "it"}

PY_HTML_ROOT = "/usr/share/doc/python3.11/html"
PY_URL_BASE = "https://docs.python.org/3.11/"
MAN_URL_BASE = "https://manpages.debian.org/bookworm/"

# --- how much of each source goes where -----------------------------------
N_PY_HTML_SMALL = 200        # python doc pages <= 60 kB
N_PY_HTML_LARGE = 8          # python doc pages 60-150 kB
N_GENINDEX = 8               # genindex-X.html letter pages <= 60 kB
N_REST = 170                 # reST sources (<= 30 kB) in reference.parquet
MAN_HTML = {"en": 6, "de": 12, "fr": 12, "es": 12, "it": 6}     # -> WARC
MAN_DOCS = {"en": 50, "de": 125, "fr": 140, "es": 125, "it": 30}  # -> jsonl
MAN_REF = {"en": 40, "de": 35, "fr": 40, "es": 35, "it": 15}       # -> parquet
MAN_MAX_WORDS = 2000         # skip huge man pages (bash.1, ...) to keep size
FORTUNE_SECTIONS = {"en": 640, "de": 220, "es": 210, "it": 110}
FORTUNE_SINGLES = {"en": 300, "de": 100, "es": 80, "it": 50}
# natural duplicates kept on purpose: every occurrence of this many fortunes that
# Debian ships more than once (in different files) becomes a single-fortune doc
REPEATED_FORTUNE_GROUPS = {"en": 12, "de": 6, "es": 6, "it": 2}
NEAR_DUP_RATE = 0.05
N_EXACT_TEXT = 10
N_EXACT_WARC = 3
SHINGLE = 5
NATURAL_THRESHOLD = 0.8

BASE_DATE = datetime(2026, 11, 2, 8, 0, 0, tzinfo=timezone.utc)   # fixed crawl date


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def sha(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def make_id(*parts):
    return "d" + sha("\x1f".join([str(SEED)] + [str(p) for p in parts]))[:15]


def make_record_id(*parts):
    digest = hashlib.sha256("\x1f".join([str(SEED), "warc"] + [str(p) for p in parts]).encode()).digest()
    return "<urn:uuid:%s>" % uuid.UUID(bytes=digest[:16], version=4)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, **kw).stdout


def dpkg_versions(pkgs):
    out = {}
    for p in pkgs:
        r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}\t${db:Status-Status}", p],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ver, _, status = r.stdout.partition("\t")
        out[p] = ver if (r.returncode == 0 and status == "installed") else None
    return out


def dpkg_files(pkg):
    return sorted(run(["dpkg-query", "-L", pkg], text=True).splitlines())


_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean_text(s):
    s = _ANSI.sub("", s)
    while "\b" in s:
        s2 = re.sub(r"[^\b]\x08", "", s)
        if s2 == s:
            break
        s = s2
    return _CTRL.sub("", s)


def words(s):
    return re.findall(r"\w+", s.lower())


def shingles(text, k=SHINGLE):
    toks = words(text)
    if len(toks) < k:
        grams = [" ".join(toks)] if toks else []
    else:
        grams = [" ".join(toks[i:i + k]) for i in range(len(toks) - k + 1)]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") for g in grams}


def jaccard(a, b):
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html_str):
    p = _TextExtractor()
    p.feed(html_str)
    p.close()
    return " ".join(" ".join(p.parts).split())


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------

def is_so_stub(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            s = line.strip()
            if not s or s.startswith(('.\\"', "'\\\"", '.\\\\"')):
                continue
            return s.startswith(".so ")
    return True


def spdx_of(path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.search(r"SPDX-License-Identifier:\s*(\S.*?)\s*$", line)
            if m:
                return m.group(1)
    return None


def list_man_pages():
    pages = []
    for pkg, lang in MAN_LANG.items():
        for path in dpkg_files(pkg):
            if not re.match(r"^/usr/share/man/(?:[^/]+/)?man\d\w*/[^/]+\.\d\w*\.gz$", path):
                continue
            if os.path.islink(path) or not os.path.isfile(path) or is_so_stub(path):
                continue
            m = re.match(r"^/usr/share/man/(?:[a-z_A-Z]+/)?(man\d\w*)/([^/]+)\.gz$", path)
            section_dir, name = m.group(1), m.group(2)
            pages.append({"pkg": pkg, "lang": lang, "path": path,
                          "license": spdx_of(path) if pkg == "manpages" else None,
                          "origin": "%s/%s/%s" % (pkg, section_dir, name),
                          "url": "%s%s/%s.%s.html" % (MAN_URL_BASE, pkg, name, lang)})
    return pages


MAN_ENV = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8", MANWIDTH="80",
               MANPAGER="cat", PAGER="cat", MANROFFSEQ="", GROFF_NO_SGR="1")
for _v in ("MANOPT", "MANPATH", "MAN_KEEP_FORMATTING", "LANGUAGE"):
    MAN_ENV.pop(_v, None)


def render_man_text(path):
    """`MANWIDTH=80 man --nh --nj -l FILE | col -bx`, lines right-stripped."""
    man = subprocess.run(["man", "--nh", "--nj", "-l", path], env=MAN_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    col = subprocess.run(["col", "-bx"], input=man.stdout, env=MAN_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    text = clean_text(col.stdout.decode("utf-8", errors="replace"))
    lines = [l.rstrip() for l in text.split("\n")]
    return "\n".join(lines).strip("\n")


def render_man_html(path):
    r = subprocess.run(["mandoc", "-Thtml", path], env=MAN_ENV,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return r.stdout.decode("utf-8", errors="replace")


def list_fortune_files():
    files = []
    for pkg, lang in FORTUNE_LANG.items():
        for path in dpkg_files(pkg):
            if not path.startswith("/usr/share/games/fortunes/"):
                continue
            if path.endswith((".dat", ".u8")) or "/off/" in path:
                continue
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            files.append((pkg, lang, path))
    return files


def read_fortunes(path):
    raw = open(path, "rb").read()
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        s = raw.decode("latin-1")
    s = clean_text(s.replace("\r\n", "\n"))
    items = re.split(r"^%[ \t]*$\n?", s, flags=re.M)
    return [it.strip("\n").rstrip() for it in items if it.strip()]


# --------------------------------------------------------------------------
# planted edits
# --------------------------------------------------------------------------

_WORD = re.compile(r"(?<![^\s(\"])[^\W\d_]{3,}(?=[\s.,;:!?)\"]|$)")


def _word_edit(line, donor_words, rng, op):
    spans = [m.span() for m in _WORD.finditer(line)]
    if not spans:
        return None, None
    a, b = spans[rng.randrange(len(spans))]
    old = line[a:b]
    if op == "replace":
        new = rng.choice(donor_words)
        if new == old:
            return None, None
        return line[:a] + new + line[b:], "replace %r -> %r" % (old, new)
    if op == "insert":
        new = rng.choice(donor_words)
        return line[:a] + new + " " + line[a:], "insert %r before %r" % (new, old)
    # delete
    rest = line[b:]
    if rest.startswith(" "):
        rest = rest[1:]
    return line[:a] + rest, "delete %r" % old


def perturb_text(text, rng, min_words=2, max_words=6):
    """Return (new_text, edits). A few word edits + maybe header/whitespace."""
    lines = text.split("\n")
    donors = sorted(set(_WORD.findall(text)))
    n_words = len(words(text))
    k = max(min_words, min(max_words, n_words // 250 + rng.randint(0, 2)))
    edits = []
    cand = [i for i, l in enumerate(lines) if len(_WORD.findall(l)) >= 3]
    if not cand or not donors:
        return None, None
    for _ in range(k):
        op = rng.choice(["replace", "replace", "insert", "delete"])
        i = rng.choice(cand)
        new, desc = _word_edit(lines[i], donors, rng, op)
        if new is not None:
            lines[i] = new
            edits.append("line %d: %s" % (i + 1, desc))
    first = next((i for i, l in enumerate(lines) if l.strip()), None)
    if first is not None and rng.random() < 0.5:
        old = lines[first]
        toks = old.split()
        if len(toks) >= 2:
            lines[first] = " ".join(toks[:-1])       # reflowed, last field dropped
        else:
            lines[first] = old.strip().upper() if old.strip() != old.strip().upper() else old.strip().title()
        if lines[first] != old:
            edits.append("header line %d changed: %r -> %r" % (first + 1, old, lines[first]))
    if rng.random() < 0.5:
        n = 0
        for i in range(len(lines)):
            if lines[i] and rng.random() < 0.3:
                lines[i] += rng.choice([" ", "  ", "\t", "   "])
                n += 1
        if n:
            edits.append("trailing whitespace added to %d lines" % n)
    if not any(e.startswith("line ") for e in edits):
        return None, None
    return "\n".join(lines), edits


_TEXTNODE = re.compile(r">([^<>]{40,})<")


def perturb_html(page, rng):
    """Edit a few words inside text nodes of the main content; change <title>."""
    start = page.find('role="main"')
    end = page.find('class="sphinxsidebar"', start)
    if start < 0:
        start = page.find("<body")
        end = page.find("</body>", start)
    if start < 0 or end < 0:
        return None, None
    region = page[start:end]
    nodes = [m for m in _TEXTNODE.finditer(region) if len(_WORD.findall(m.group(1))) >= 6]
    if not nodes:
        return None, None
    donors = sorted({w for m in nodes for w in _WORD.findall(m.group(1))})
    k = rng.randint(2, 4)
    chosen = sorted(rng.sample(range(len(nodes)), min(k, len(nodes))), reverse=True)
    edits = []
    for ni in chosen:
        m = nodes[ni]
        op = rng.choice(["replace", "replace", "insert", "delete"])
        new, desc = _word_edit(m.group(1), donors, rng, op)
        if new is None:
            continue
        region = region[:m.start(1)] + new + region[m.end(1):]
        edits.append("text node: " + desc)
    if not edits:
        return None, None
    page = page[:start] + region + page[end:]
    if "Python 3.11.2 documentation</title>" in page and rng.random() < 0.6:
        page = page.replace("Python 3.11.2 documentation</title>", "Python 3.11 documentation</title>", 1)
        edits.append("title: 'Python 3.11.2 documentation' -> 'Python 3.11 documentation'")
    if rng.random() < 0.4:
        page = "\n".join(l + " " if l.strip() and rng.random() < 0.2 else l for l in page.split("\n"))
        edits.append("trailing whitespace added to some lines")
    return page, edits


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (default data/sample)")
    ap.add_argument("--jobs", type=int, default=max(2, os.cpu_count() or 2))
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    rng = random.Random(SEED)

    versions = dpkg_versions(SOURCE_PACKAGES + TOOL_PACKAGES)
    missing = [p for p, v in versions.items() if v is None]
    if missing:
        sys.exit("missing Debian packages: %s\ninstall with: apt-get install -y --no-install-recommends %s"
                 % (" ".join(missing), " ".join(APT_PACKAGES)))
    log = lambda *a: print(*a, file=sys.stderr, flush=True)

    # ---------------- python docs: HTML pages and reST sources -------------
    py_files = [p for p in dpkg_files("python3.11-doc") if p.startswith(PY_HTML_ROOT + "/")]
    html_pages = sorted(p[len(PY_HTML_ROOT) + 1:] for p in py_files
                        if p.endswith(".html") and "/_" not in p[len(PY_HTML_ROOT):] and os.path.isfile(p))
    rest_sources = sorted(p[len(PY_HTML_ROOT) + 1:] for p in py_files
                          if p.startswith(PY_HTML_ROOT + "/_sources/") and p.endswith(".txt"))
    size = {rel: os.path.getsize(os.path.join(PY_HTML_ROOT, rel)) for rel in html_pages}
    special = {"genindex.html", "py-modindex.html", "search.html", "genindex-all.html", "contents.html"}
    normal = [r for r in html_pages if r not in special and not r.startswith("genindex-")]
    small = [r for r in normal if size[r] <= 60000]
    large = [r for r in normal if 60000 < size[r] <= 150000]
    letters = [r for r in html_pages if re.match(r"genindex-[A-Z_]\w*\.html$", r) and size[r] <= 60000]
    sel_html = sorted(rng.sample(small, min(N_PY_HTML_SMALL, len(small)))
                      + rng.sample(large, min(N_PY_HTML_LARGE, len(large)))
                      + rng.sample(letters, min(N_GENINDEX, len(letters)))
                      + ["genindex.html", "py-modindex.html", "search.html"])
    in_warc = {r[:-5] for r in sel_html}
    rest_pool = [r for r in rest_sources
                 if re.sub(r"^_sources/", "", r).rsplit(".rst.txt", 1)[0] not in in_warc
                 and os.path.getsize(os.path.join(PY_HTML_ROOT, r)) <= 30000]
    sel_rest = sorted(rng.sample(rest_pool, min(N_REST, len(rest_pool))))
    log("python html pages: %d, reST sources: %d" % (len(sel_html), len(sel_rest)))

    # ---------------- man pages ---------------------------------------------
    pages = list_man_pages()
    log("rendering %d man pages to text ..." % len(pages))
    with ThreadPoolExecutor(args.jobs) as ex:
        texts = list(ex.map(render_man_text, [p["path"] for p in pages]))
    for p, t in zip(pages, texts):
        p["text"] = t
        p["nwords"] = len(t.split())
    usable = [p for p in pages if 20 <= p["nwords"] <= MAN_MAX_WORDS]
    log("usable man pages: %d" % len(usable))
    # natural near-duplicate families among the man pages (dir/ls/vdir, sha*sum, ...):
    # keep all their members, in the two plain-text files
    fam_pairs = find_near_duplicates([(i, "", p["origin"], p["text"]) for i, p in enumerate(usable)])
    family = sorted({r[x] for r in fam_pairs for x in ("a", "b")})
    log("man pages in natural near-duplicate families: %d" % len(family))
    man_html, man_docs, man_ref = [], [], []
    for i in family:
        (man_docs if rng.random() < 0.7 else man_ref).append(usable[i])
    family = set(family)
    by_lang = defaultdict(list)
    for i, p in enumerate(usable):
        if i not in family:
            by_lang[p["lang"]].append(p)
    for lang in ["en", "de", "fr", "es", "it"]:
        pool = sorted(by_lang[lang], key=lambda p: p["path"])
        rng.shuffle(pool)
        a, b, c = MAN_HTML[lang], MAN_DOCS[lang], MAN_REF[lang]
        man_html += pool[:a]
        man_docs += pool[a:a + b]
        man_ref += pool[a + b:a + b + c]
    with ThreadPoolExecutor(args.jobs) as ex:
        htmls = list(ex.map(render_man_html, [p["path"] for p in man_html]))
    for p, h in zip(man_html, htmls):
        p["html"] = h

    # ---------------- fortunes ----------------------------------------------
    sections_by_lang, singles_pool = defaultdict(list), defaultdict(list)
    for pkg, lang, path in list_fortune_files():
        items = read_fortunes(path)
        rel = path[len("/usr/share/games/fortunes/"):]
        i = 0
        while i < len(items):
            n = rng.randint(5, 20)
            chunk = items[i:i + n]
            if len(chunk) >= 5:
                sections_by_lang[lang].append((pkg, rel, i, chunk))
            else:
                for j, it in enumerate(chunk):
                    singles_pool[lang].append((pkg, rel, i + j, it))
            i += n
    fortune_docs = []
    for lang in ["en", "de", "es", "it"]:
        secs = sections_by_lang[lang]
        chosen_idx = set(rng.sample(range(len(secs)), min(FORTUNE_SECTIONS[lang], len(secs))))
        covered = {(secs[x][1], secs[x][2] + j) for x in chosen_idx for j in range(len(secs[x][3]))}
        # fortunes that occur more than once (same words) in the package files
        occ = defaultdict(list)
        for pkg, rel, i, it in singles_pool[lang] + [(s_[0], s_[1], s_[2] + j, it) for s_ in secs
                                                      for j, it in enumerate(s_[3])]:
            occ[" ".join(words(it))].append((pkg, rel, i, it))
        groups = [sorted(v, key=lambda x: (x[1], x[2])) for k_, v in sorted(occ.items())
                  if len(v) > 1 and 5 <= len(k_.split()) <= 40 and len({x[1] for x in v}) > 1
                  and not any((x[1], x[2]) in covered for x in v)]
        repeated = set()
        for g in rng.sample(groups, min(REPEATED_FORTUNE_GROUPS[lang], len(groups))):
            for pkg, rel, i, it in g:
                repeated.add((rel, i))
                fortune_docs.append({"text": it, "url": None, "lang": lang, "pkg": pkg,
                                     "kind": "fortune", "origin": "%s/%s#%d" % (pkg, rel, i + 1)})
        for idx in sorted(chosen_idx):
            pkg, rel, i, chunk = secs[idx]
            fortune_docs.append({
                "text": "\n%\n".join(chunk), "url": None, "lang": lang, "pkg": pkg,
                "kind": "fortune-section",
                "origin": "%s/%s#%d-%d" % (pkg, rel, i + 1, i + len(chunk))})
        # single short fortunes from sections that were not chosen
        pool = list(singles_pool[lang])
        for idx in range(len(secs)):
            if idx not in chosen_idx:
                pkg, rel, i, chunk = secs[idx]
                pool += [(pkg, rel, i + j, it) for j, it in enumerate(chunk)]
        pool = [x for x in pool if len(x[3].split()) <= 40 and (x[1], x[2]) not in repeated]
        for pkg, rel, i, it in sorted(rng.sample(pool, min(FORTUNE_SINGLES[lang], len(pool))),
                                      key=lambda x: (x[1], x[2])):
            fortune_docs.append({"text": it, "url": None, "lang": lang, "pkg": pkg,
                                 "kind": "fortune", "origin": "%s/%s#%d" % (pkg, rel, i + 1)})

    # ---------------- assemble documents --------------------------------------
    def meta(lang, pkg, kind, origin, license=None):
        return {"lang": lang, "origin": origin, "source_package": pkg,
                "package_version": versions[pkg], "kind": kind, "license": license or LICENSES[pkg]}

    text_docs = {"docs.jsonl.gz": [], "reference.parquet": []}
    for p in man_docs:
        text_docs["docs.jsonl.gz"].append({
            "id": make_id("docs", p["origin"]), "text": p["text"], "url": p["url"],
            "metadata": meta(p["lang"], p["pkg"], "manpage", p["origin"], p["license"])})
    for f in fortune_docs:
        text_docs["docs.jsonl.gz"].append({
            "id": make_id("docs", f["origin"]), "text": f["text"], "url": None,
            "metadata": meta(f["lang"], f["pkg"], f["kind"], f["origin"])})
    for rel in sel_rest:
        with open(os.path.join(PY_HTML_ROOT, rel), encoding="utf-8") as fh:
            t = fh.read()
        origin = "python3.11-doc/html/" + rel
        text_docs["reference.parquet"].append({
            "id": make_id("ref", origin), "text": t, "url": PY_URL_BASE + rel,
            "metadata": meta("en", "python3.11-doc", "rest-source", origin)})
    for p in man_ref:
        text_docs["reference.parquet"].append({
            "id": make_id("ref", p["origin"]), "text": p["text"], "url": p["url"],
            "metadata": meta(p["lang"], p["pkg"], "manpage", p["origin"], p["license"])})

    warc_docs = []
    for rel in sel_html:
        with open(os.path.join(PY_HTML_ROOT, rel), encoding="utf-8") as fh:
            page = fh.read()
        page = page.replace("file://" + PY_HTML_ROOT + "/", PY_URL_BASE)
        warc_docs.append({"uri": PY_URL_BASE + rel, "html": page,
                          "mtime": int(os.path.getmtime(os.path.join(PY_HTML_ROOT, rel))),
                          "metadata": meta("en", "python3.11-doc", "html", "python3.11-doc/html/" + rel)})
    for p in man_html:
        warc_docs.append({"uri": p["url"], "html": p["html"], "mtime": int(os.path.getmtime(p["path"])),
                          "metadata": meta(p["lang"], p["pkg"], "manpage-html", p["origin"], p["license"])})
    for w in warc_docs:
        w["id"] = make_record_id(w["uri"])

    # ---------------- planted duplicates --------------------------------------
    planted = []
    n_total = sum(len(v) for v in text_docs.values()) + len(warc_docs)
    n_near = round(NEAR_DUP_RATE * n_total)
    n_near_warc = round(NEAR_DUP_RATE * len(warc_docs))
    n_near_text = n_near - n_near_warc
    log("documents before planting: %d; planting %d near (%d warc) + %d exact"
        % (n_total, n_near, n_near_warc, N_EXACT_TEXT + N_EXACT_WARC))

    text_pool = [(fname, d) for fname in sorted(text_docs) for d in text_docs[fname]
                 if len(words(d["text"])) >= 150]
    rng.shuffle(text_pool)
    used = set()
    new_docs = {k: [] for k in text_docs}
    other = {"docs.jsonl.gz": "reference.parquet", "reference.parquet": "docs.jsonl.gz"}
    made = 0
    for fname, d in text_pool:
        if made >= n_near_text:
            break
        new_text, edits = perturb_text(d["text"], rng)
        if new_text is None:
            continue
        j = jaccard(shingles(d["text"]), shingles(new_text))
        if j < 0.8:
            continue
        dest = fname if rng.random() < 0.5 else other[fname]
        cid = make_id("near", d["id"])
        new_docs[dest].append({"id": cid, "text": new_text, "url": d["url"], "metadata": dict(d["metadata"])})
        planted.append({"original": d["id"], "copy": cid, "kind": "near", "file": dest,
                        "original_file": fname, "jaccard_word5": round(j, 4), "edits": edits})
        used.add(d["id"])
        made += 1
    made = 0
    for fname, d in text_pool:
        if made >= N_EXACT_TEXT:
            break
        if d["id"] in used:
            continue
        dest = fname if made % 2 else other[fname]
        cid = make_id("exact", d["id"])
        new_docs[dest].append({"id": cid, "text": d["text"], "url": d["url"], "metadata": dict(d["metadata"])})
        planted.append({"original": d["id"], "copy": cid, "kind": "exact", "file": dest,
                        "original_file": fname, "jaccard_word5": 1.0, "edits": []})
        used.add(d["id"])
        made += 1
    for k in text_docs:
        text_docs[k] += new_docs[k]

    warc_pool = [w for w in warc_docs if w["metadata"]["kind"] == "html"
                 and not w["uri"].rsplit("/", 1)[-1].startswith(("genindex", "py-modindex", "search"))]
    warc_pool += [w for w in warc_docs if w["metadata"]["kind"] == "manpage-html"]
    rng.shuffle(warc_pool)
    new_warc, made, made_exact = [], 0, 0

    def alias_uri(uri, n):
        if uri.startswith(PY_URL_BASE):
            return ["https://docs.python.org/3/", "http://docs.python.org/3.11/",
                    "https://docs.python.org/3.11/"][n % 3] + uri[len(PY_URL_BASE):] + ("?highlight=python" if n % 3 == 2 else "")
        return uri.replace("https://manpages.debian.org/bookworm/", "https://manpages.debian.org/" if n % 2 else "http://manpages.debian.org/bookworm/")

    for w in warc_pool:
        if made >= n_near_warc and made_exact >= N_EXACT_WARC:
            break
        if made < n_near_warc:
            page, edits = perturb_html(w["html"], rng)
            if page is None:
                continue
            j = jaccard(shingles(html_to_text(w["html"])), shingles(html_to_text(page)))
            if j < 0.8:
                continue
            kind = "near"
            made += 1
        else:
            page, edits, j, kind = w["html"], [], 1.0, "exact"
            made_exact += 1
        uri = alias_uri(w["uri"], made + made_exact)
        c = {"uri": uri, "html": page, "metadata": dict(w["metadata"]), "mtime": w["mtime"],
             "id": make_record_id(kind, uri, w["id"])}
        new_warc.append(c)
        planted.append({"original": w["id"], "copy": c["id"], "kind": kind, "file": "web.warc.gz",
                        "original_file": "web.warc.gz", "jaccard_word5": round(j, 4), "edits": edits})
    warc_docs += new_warc

    # ---------------- order and write -----------------------------------------
    for k in text_docs:
        text_docs[k].sort(key=lambda d: d["id"])
    warc_docs.sort(key=lambda w: w["id"])
    all_ids = [d["id"] for v in text_docs.values() for d in v] + [w["id"] for w in warc_docs]
    assert len(all_ids) == len(set(all_ids)), "duplicate ids"

    # docs.jsonl.gz
    path = os.path.join(out, "docs.jsonl.gz")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for d in text_docs["docs.jsonl.gz"]:
            rec = {"id": d["id"], "text": d["text"], "url": d["url"], "metadata": d["metadata"]}
            gz.write((json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))

    # reference.parquet
    ref = text_docs["reference.parquet"]
    table = pa.table({
        "id": pa.array([d["id"] for d in ref], pa.string()),
        "text": pa.array([d["text"] for d in ref], pa.string()),
        "url": pa.array([d["url"] for d in ref], pa.string()),
        "metadata": pa.array([json.dumps(d["metadata"], ensure_ascii=False, sort_keys=True) for d in ref], pa.string()),
    })
    pq.write_table(table, os.path.join(out, "reference.parquet"), compression="zstd",
                   compression_level=19, row_group_size=512)

    # web.warc.gz
    path = os.path.join(out, "web.warc.gz")
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=True, warc_version="WARC/1.0")
        info = writer.create_warcinfo_record("web.warc.gz", {
            "software": "data/build_sample.py (warcio)",
            "format": "WARC File Format 1.0",
            "description": "Sample corpus: python3.11-doc HTML and mandoc-rendered man pages "
                           "from Debian 12 packages, served under plausible URLs. Not a real crawl.",
            "isPartOf": "pretrain-pipeline sample corpus",
        })
        info.rec_headers.replace_header("WARC-Record-ID", make_record_id("warcinfo"))
        info.rec_headers.replace_header("WARC-Date", BASE_DATE.strftime("%Y-%m-%dT%H:%M:%SZ"))
        writer.write_record(info)
        for i, w in enumerate(warc_docs):
            date = BASE_DATE + timedelta(seconds=37 * (i + 1))
            body = w["html"].encode("utf-8")
            http = StatusAndHeaders("200 OK", [
                ("Server", "nginx"),
                ("Date", date.strftime("%a, %d %b %Y %H:%M:%S GMT")),
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Last-Modified", formatdate(w["mtime"], usegmt=True)),
                ("ETag", '"%s"' % hashlib.md5(body).hexdigest()[:16]),
                ("Connection", "close"),
            ], protocol="HTTP/1.1")
            rec = writer.create_warc_record(w["uri"], "response", payload=io.BytesIO(body),
                                            length=len(body), http_headers=http,
                                            warc_headers_dict={
                                                "WARC-Record-ID": w["id"],
                                                "WARC-Date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                            })
            writer.write_record(rec)

    # ---------------- ground truth ------------------------------------------------
    planted.sort(key=lambda r: (r["file"], r["copy"]))
    with open(os.path.join(out, "planted_duplicates.json"), "w", encoding="utf-8") as fh:
        json.dump(planted, fh, ensure_ascii=False, indent=1)
        fh.write("\n")

    # ---------------- natural near-duplicates ----------------------------------
    copies = {r["copy"] for r in planted}
    items = []
    for fname in sorted(text_docs):
        for d in text_docs[fname]:
            items.append((d["id"], fname, d["metadata"]["origin"], d["text"]))
    for w in warc_docs:
        items.append((w["id"], "web.warc.gz", w["metadata"]["origin"], html_to_text(w["html"])))
    natural = find_near_duplicates([x for x in items if x[0] not in copies])
    with open(os.path.join(out, "natural_near_duplicates.json"), "w", encoding="utf-8") as fh:
        json.dump(natural, fh, ensure_ascii=False, indent=1)
        fh.write("\n")

    # ---------------- manifest ------------------------------------------------------
    counts = {
        "web.warc.gz": Counter(w["metadata"]["lang"] for w in warc_docs),
        "docs.jsonl.gz": Counter(d["metadata"]["lang"] for d in text_docs["docs.jsonl.gz"]),
        "reference.parquet": Counter(d["metadata"]["lang"] for d in text_docs["reference.parquet"]),
    }
    long_docs = Counter()
    for fname, d_lang, text in ([("web", w["metadata"]["lang"], html_to_text(w["html"])) for w in warc_docs]
                                + [(f, d["metadata"]["lang"], d["text"]) for f in text_docs for d in text_docs[f]]):
        if len(text.split()) >= 100:
            long_docs[d_lang] += 1
    outputs = ["web.warc.gz", "docs.jsonl.gz", "reference.parquet", "planted_duplicates.json",
               "natural_near_duplicates.json"]
    manifest = {
        "seed": SEED,
        "source_packages": {p: versions[p] for p in SOURCE_PACKAGES},
        "tool_packages": {p: versions[p] for p in TOOL_PACKAGES},
        "documents": {f: {"total": sum(c.values()), "by_lang": dict(sorted(c.items()))} for f, c in counts.items()},
        "documents_by_lang": dict(sorted(sum(counts.values(), Counter()).items())),
        "documents_with_100_words_by_lang": dict(sorted(long_docs.items())),
        "kinds": {f: dict(sorted(Counter(d["metadata"]["kind"] for d in v).items())) for f, v in
                  list(text_docs.items()) + [("web.warc.gz", warc_docs)]},
        "planted": {f: dict(sorted(Counter(r["kind"] for r in planted if r["file"] == f).items()))
                    for f in ["web.warc.gz", "docs.jsonl.gz", "reference.parquet"]},
        "natural_near_duplicate_pairs": len(natural),
        "natural_same_words_pairs": sum(1 for r in natural if r["same_words"]),
        "natural_identical_text_pairs": sum(1 for r in natural if r["identical_text"]),
        "natural_method": "word 5-gram shingles (\\w+ tokens, lowercased; WARC: visible HTML text), "
                          "exact Jaccard >= %.1f, all pairs compared; planted copies excluded"
                          % NATURAL_THRESHOLD,
        "bytes": {f: os.path.getsize(os.path.join(out, f)) for f in outputs},
        "sha256": {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in outputs},
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    log(json.dumps({k: manifest[k] for k in ("documents", "documents_with_100_words_by_lang", "planted",
                                             "natural_near_duplicate_pairs", "bytes")}, indent=1))


def find_near_duplicates(items, threshold=NATURAL_THRESHOLD):
    """items: (id, file, origin, text). All pairs with Jaccard(word 5-gram shingles) >= threshold.

    Exhaustive: documents are sorted by shingle-set size and each is compared with
    every larger one whose size is within the ratio that the threshold allows.
    """
    sh = [shingles(t) for _, _, _, t in items]
    norm = [" ".join(words(t)) for _, _, _, t in items]
    order = sorted((i for i in range(len(items)) if sh[i]), key=lambda i: (len(sh[i]), i))
    pairs = []
    for x, a in enumerate(order):
        sa = sh[a]
        for b in order[x + 1:]:
            sb = sh[b]
            if len(sa) < threshold * len(sb):
                break
            inter = len(sa & sb)
            if inter >= threshold * (len(sa) + len(sb) - inter):
                i, j = min(a, b), max(a, b)
                pairs.append({"a": items[i][0], "b": items[j][0], "file_a": items[i][1], "file_b": items[j][1],
                              "origin_a": items[i][2], "origin_b": items[j][2],
                              "jaccard_word5": round(inter / (len(sa) + len(sb) - inter), 4),
                              "same_words": norm[i] == norm[j], "identical_text": items[i][3] == items[j][3]})
    pairs.sort(key=lambda r: (r["a"], r["b"]))
    return pairs


if __name__ == "__main__":
    main()
