"""HTML extraction: each extractor's quality and speed on pages whose main text is known, and WARC -> documents
against datatrove's WarcReader + Trafilatura. Nothing is downloaded.

    .venv/bin/python bench/extraction.py [--pages 4000] [--files 4] [--workers 2] [--repeats 3] [--write]

Pages: real text (English documents of the bundled sample, and the plain-text documentation Debian installs under
/usr/share/doc when there is any) as an article's title and paragraphs (some as a list, a table or a code block, as
in documentation), wrapped in the boilerplate of real sites,
drawn at random per page: a navigation menu, a cookie banner, a sidebar of related links, a comment thread made of
other documents' sentences, a tag cloud (a link farm) and a footer, in the markup of a modern, an older or an
anonymous site. The known main text is the title and the article's text. Side by side, in one run:
1. quality, one process: each extractor's text (as the ingest stage configures it) scored by word-level precision,
   recall and F1 against the known text (bags of lower-cased words, counts included, pooled over the pages), and
   the F1 below which the worst tenth of pages fall; and its pages per second (median of `--repeats` passes);
2. the deadline's cost: the stage's extraction (pages to a sandbox process in batches, each under the deadline)
   against calling the extractor in this process, on the same pages;
3. WARC -> documents: the pages as `--files` WARC files; the ingest stage (default extractor, `--workers`
   processes) against datatrove's LocalPipelineExecutor([WarcReader, Trafilatura(favour_precision)]) with the
   same files and workers; each side's run timed in its own process (interpreter start-up excluded), alternated,
   medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.stage_times import machine, write_section
from stages.core.config import load_config
from stages.ingest.extract import BATCH_BYTES, BATCH_PAGES, Extraction, batch_full, extractor

SECTION = "## HTML extraction: quality, speed and WARC -> documents"
SAMPLE = REPO / "data" / "sample"
WORD = re.compile(r"\w+", re.UNICODE)
SENTENCE = re.compile(r"(?<=[.!?])\s+")
EXTRACTORS = ("resiliparse", "trafilatura")

OURS = """
import sys, time
from stages.core.config import load_config
from stages.pipeline import PIPELINE
if __name__ == "__main__":
    cfg = load_config("tiny", {"storage.root": sys.argv[1], "ingest.inputs": [sys.argv[2] + "/*.warc.gz"],
                               "ingest.workers": int(sys.argv[3])})
    started = time.perf_counter()
    stats = PIPELINE.run("ingest", cfg, log=lambda _: None)
    print("RESULT", time.perf_counter() - started, stats["docs_out"])
"""

DATATROVE = """
import sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import WarcReader
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":
    root, folder, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    executor = LocalPipelineExecutor(
        [WarcReader(folder, glob_pattern="*.warc.gz"), Trafilatura(favour_precision=True, timeout=30.0),
         JsonlWriter(f"{root}/output")],
        tasks=files, workers=workers, logging_dir=f"{root}/logs", start_method="forkserver")
    started = time.perf_counter()
    executor.run()
    import glob, gzip
    docs = sum(1 for f in glob.glob(f"{root}/output/*.jsonl.gz") for _ in gzip.open(f))
    print("RESULT", time.perf_counter() - started, docs)
"""


def texts() -> list[str]:
    """Real English prose: the sample's documents and reference texts, and Debian's plain-text documentation."""
    import pyarrow.parquet as pq

    found = [json.loads(line)["text"] for line in gzip.open(SAMPLE / "docs.jsonl.gz", "rt")]
    found += [row["text"] for row in pq.read_table(SAMPLE / "reference.parquet").to_pylist()]
    for path in sorted(Path("/usr/share/doc").glob("*/README*"))[:400]:
        try:
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            found.append(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    english = [t for t in found if len(t.split()) >= 120 and sum(c.isascii() for c in t) > 0.97 * len(t)]
    return sorted(set(english))


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sentences_of(text: str) -> list[str]:
    return [s for s in SENTENCE.split(" ".join(text.split())) if len(s.split()) >= 4]


def make_page(text: str, others: list[str], rng: random.Random) -> tuple[str, str]:
    """(HTML, the known main text): the text as an article inside a site's boilerplate."""
    sentences = sentences_of(text)
    title = " ".join(sentences[0].split()[:10]) if sentences else "Untitled"
    paragraphs, k = [], 0
    while k < len(sentences):
        size = rng.randint(2, 5)
        paragraphs.append(" ".join(sentences[k : k + size]))
        k += size
    links = [" ".join(rng.choice(others).split()[: rng.randint(1, 3)]) for _ in range(rng.randint(8, 25))]
    related = [" ".join(rng.choice(others).split()[: rng.randint(5, 10)]) for _ in range(rng.randint(4, 10))]
    comments = [rng.choice(sentences_of(rng.choice(others)) or ["Great post!"]) for _ in range(rng.randint(0, 6))]
    tags = [rng.choice(others).split()[0] for _ in range(rng.randint(15, 40))]
    nav = "".join(f'<li><a href="/{n}">{escape(w)}</a></li>' for n, w in enumerate(links))
    side = "".join(f'<li><a href="/post/{n}">{escape(w)}</a></li>' for n, w in enumerate(related))
    thread = "".join(f'<div class="comment"><span class="author">user{n}</span><p>{escape(c)}</p></div>'
                     for n, c in enumerate(comments))  # fmt: skip
    cloud = " ".join(f'<a href="/tag/{escape(t)}" class="tag">{escape(t)}</a>' for t in tags)
    body, known = [], [title]
    for paragraph in paragraphs:  # documentation's main content: paragraphs, and lists, tables and code among them
        shape, words = rng.random(), paragraph.split()
        if shape < 0.15 and len(words) >= 12:
            items = [" ".join(words[k : k + 6]) for k in range(0, len(words), 6)]
            body.append("<ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>")
            known += items
        elif shape < 0.25 and len(words) >= 8:
            rows = [words[k : k + 2] for k in range(0, len(words) - 1, 2)]
            body.append("<table>" + "".join(f"<tr><td>{escape(a)}</td><td>{escape(b)}</td></tr>" for a, b in rows)
                        + "</table>")  # fmt: skip
            known += [f"{a} {b}" for a, b in rows]
        elif shape < 0.33:
            lines = [" ".join(words[k : k + 7]) for k in range(0, len(words), 7)]
            body.append("<pre>" + escape("\n".join(lines)) + "</pre>")
            known += lines
        else:
            body.append(f"<p>{escape(paragraph)}</p>")
            known.append(paragraph)
    body = "".join(body)
    # the markup of a modern site (nav, article, aside, footer), of an older one (divs named by class), or of one
    # that names nothing (a third each)
    tags = rng.choice([SEMANTIC, CLASSED, ANONYMOUS])
    html = (
        f"<!DOCTYPE html><html><head><title>{escape(title)} | Example Site</title></head><body>"
        f'<div class="cookie-banner">We use cookies to improve your experience. <a href="/privacy">Learn more</a> '
        f"<button>Accept all</button></div>"
        f'{tags["nav"][0]}<a href="/" class="logo">Example Site</a><ul>{nav}</ul>{tags["nav"][1]}'
        f'<div class="layout">{tags["main"][0]}<h1>{escape(title)}</h1>{body}{tags["main"][1]}'
        f'{tags["comments"][0]}<h3>{len(comments)} comments</h3>{thread}{tags["comments"][1]}'
        f'{tags["side"][0]}<h3>Related posts</h3><ul>{side}</ul>{tags["side"][1]}</div>'
        f'<div class="tags">{cloud}</div>'
        f'{tags["footer"][0]}<p>Copyright 2026 Example Site. All rights reserved.</p><a href="/terms">Terms</a> '
        f'<a href="/privacy">Privacy</a> <a href="/contact">Contact</a>{tags["footer"][1]}</body></html>'
    )
    return html, "\n".join(known)


SEMANTIC = {"nav": ("<header><nav>", "</nav></header>"), "main": ("<main><article>", "</article>"),
            "comments": ('<section id="comments">', "</section></main>"), "side": ("<aside>", "</aside>"),
            "footer": ("<footer>", "</footer>")}  # fmt: skip
CLASSED = {"nav": ('<div class="menu">', "</div>"), "main": ('<div class="post-content">', "</div>"),
           "comments": ('<div class="comments">', "</div>"), "side": ('<div class="sidebar widget">', "</div>"),
           "footer": ('<div class="footer">', "</div>")}  # fmt: skip
ANONYMOUS = {part: ('<div class="c{0}">'.format(n), "</div>") for n, part in enumerate(SEMANTIC)}


def pages(n: int, seed: int = 0) -> list[tuple[str, str]]:
    pool = texts()
    rng = random.Random(seed)
    return [make_page(pool[i % len(pool)], pool, rng) for i in range(n)]


def overlap(extracted: str, truth: str) -> tuple[int, int, int]:
    """(words in common, words extracted, words known), over bags of lower-cased words."""
    got, want = Counter(WORD.findall(extracted.lower())), Counter(WORD.findall(truth.lower()))
    return sum((got & want).values()), sum(got.values()), sum(want.values())


def scores(counts: list[tuple[int, int, int]]) -> tuple[float, float, float]:
    """Precision, recall and F1 over all pages' words together (micro-averaged)."""
    common, got, want = (sum(c[i] for c in counts) for i in range(3))
    precision, recall = common / max(got, 1), common / max(want, 1)
    return precision, recall, (2 * precision * recall / (precision + recall) if precision + recall else 0.0)


def quality(corpus: list[tuple[str, str]], repeats: int) -> dict[str, dict]:
    ic = load_config("tiny").ingest
    found = {}
    for name in EXTRACTORS:
        extract = extractor(name, ic)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = [extract(html) or "" for html, _ in corpus]
            seconds.append(time.perf_counter() - started)
        per_page = [overlap(text, truth) for text, (_, truth) in zip(outputs, corpus)]
        precision, recall, f1 = scores(per_page)
        f1s = sorted(scores([c])[2] for c in per_page)
        by_markup = {kind: scores([c for c, (html, _) in zip(per_page, corpus) if markup(html) == kind])
                     for kind in MARKUPS}  # fmt: skip
        found[name] = {"precision": precision, "recall": recall, "f1": f1, "f1_p10": f1s[len(f1s) // 10],
                       "pages_per_s": len(corpus) / statistics.median(seconds), "by_markup": by_markup}  # fmt: skip
    return found


MARKUPS = ("modern (nav, article, aside)", "older (divs named by class)", "anonymous (nothing named)")


def markup(html: str) -> str:
    """Which of make_page's three site markups a page has."""
    return MARKUPS[0] if "<article>" in html else MARKUPS[1] if "post-content" in html else MARKUPS[2]


def deadline_cost(corpus: list[tuple[str, str]], repeats: int) -> dict:
    """The stage's batched, deadline-guarded extraction against the extractor called in this process."""
    ic = load_config("tiny").ingest
    html = [h.encode() for h, _ in corpus]  # (the stage hands the child a page's bytes; decoding is its work)
    extract = extractor(ic.extractor, ic)
    inline, guarded = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        [extract(h.decode("utf-8")) for h in html]
        inline.append(time.perf_counter() - started)
        with Extraction(ic) as extraction:
            extraction.texts(html[:1])  # (the child's start-up: once per worker process, not per page)
            started = time.perf_counter()
            batch, size = [], 0
            for page in html:  # (batched as the stage batches: stages/ingest/warc.py's Pending)
                batch.append(page)
                size += len(page)
                if batch_full(len(batch), size):
                    extraction.texts(batch)
                    batch, size = [], 0
            extraction.texts(batch)
            guarded.append(time.perf_counter() - started)
    a, b = statistics.median(inline), statistics.median(guarded)
    return {"inline_s": a, "guarded_s": b, "overhead": b / a - 1}


def write_warcs(corpus: list[tuple[str, str]], folder: Path, files: int) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"part-{f:03d}.warc.gz", "wb") as out:
            writer = WARCWriter(out, gzip=True)
            for n in range(f, len(corpus), files):
                headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                           protocol="HTTP/1.1")  # fmt: skip
                record = writer.create_warc_record(f"https://example.org/{n}", "response",
                                                   payload=io.BytesIO(corpus[n][0].encode()), http_headers=headers)
                writer.write_record(record)


def run(script: str, *args: str) -> tuple[float, int]:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    _, seconds, docs = line.split()
    return float(seconds), int(docs)


def warc_to_documents(corpus, files: int, workers: int, repeats: int) -> dict:
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "warc"
        write_warcs(corpus, folder, files)
        for k in range(repeats):  # (alternated: the machine's noise hits both alike)
            ours.append(run(OURS, f"{tmp}/ours-{k}", str(folder), str(workers)))
            theirs.append(run(DATATROVE, f"{tmp}/datatrove-{k}", str(folder), str(workers), str(files)))
    ours_s, theirs_s = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in theirs)
    return {"ours_s": ours_s, "datatrove_s": theirs_s, "ours_docs": ours[0][1], "datatrove_docs": theirs[0][1],
            "speedup": theirs_s / ours_s}  # fmt: skip


def table(r: dict, args, command: str) -> str:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        f"{machine()} {args.pages:,} pages ({r['texts']:,} distinct texts); medians of {args.repeats}.",
        "",
        "| extractor | precision | recall | F1 | F1, worst 10% of pages from | pages/s (one process) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, q in r["quality"].items():
        lines.append(f"| {name} | {q['precision']:.3f} | {q['recall']:.3f} | {q['f1']:.3f} | {q['f1_p10']:.3f} | "
                     f"{q['pages_per_s']:,.0f} |")  # fmt: skip
    lines += [
        "",
        "By the site's markup (precision / recall):",
        "",
        "| extractor | " + " | ".join(MARKUPS) + " |",
        "|---|" + "---:|" * len(MARKUPS),
    ]
    for name, q in r["quality"].items():
        cells = " | ".join(f"{q['by_markup'][kind][0]:.3f} / {q['by_markup'][kind][1]:.3f}" for kind in MARKUPS)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Resiliparse's main-content rules take a `ul` fewer than four elements below `body` for navigation "
              "and drop it (`_is_main_content_node` in its html2text.pyx; an `ol` is kept): that is the recall it "
              "loses on the older markup, whose article sits shallow. On the anonymous markup it also keeps the "
              "comment thread, the related posts and the footer, which trafilatura drops."]  # fmt: skip
    d, w = r["deadline"], r["warc"]
    lines += [
        "",
        f"The deadline's cost (default extractor, pages to the sandbox in batches of up to {BATCH_PAGES} pages or "
        f"{BATCH_BYTES >> 20} MiB): "
        f"{d['guarded_s']:.2f} s against {d['inline_s']:.2f} s in-process, {d['overhead']:+.1%}.",
        "",
        f"WARC -> documents, {args.files} files, {args.workers} worker processes each side:",
        "",
        "| pipeline | seconds | pages/s | documents |",
        "|---|---:|---:|---:|",
        f"| ingest stage (resiliparse, FastWARC) | {w['ours_s']:.1f} | {args.pages / w['ours_s']:,.0f} | "
        f"{w['ours_docs']:,} |",
        f"| datatrove WarcReader + Trafilatura | {w['datatrove_s']:.1f} | {args.pages / w['datatrove_s']:,.0f} | "
        f"{w['datatrove_docs']:,} |",
        "",
        f"Speed-up: {w['speedup']:.1f}x.",
        "",
    ]
    return "\n".join(lines)


def page_arguments() -> argparse.ArgumentParser:
    """The options of a bench over these pages as WARC files (this one and bench/filter_vs_datatrove.py)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=4000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    return parser


def main() -> None:
    args = page_arguments().parse_args()
    corpus = pages(args.pages)
    result = {
        "texts": len({truth for _, truth in corpus}),
        "quality": quality(corpus[: min(len(corpus), 1000)], args.repeats),
        "deadline": deadline_cost(corpus[: min(len(corpus), 1000)], args.repeats),
        "warc": warc_to_documents(corpus, args.files, args.workers, args.repeats),
    }
    print(json.dumps(result, indent=2))
    command = (f"python bench/extraction.py --pages {args.pages} --files {args.files} --workers {args.workers} "
               f"--repeats {args.repeats} --write")  # fmt: skip
    text = table(result, args, command)
    print(text)
    if args.write:
        write_section(text, SECTION)


if __name__ == "__main__":
    main()
