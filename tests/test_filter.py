"""The filter stage (stages/filter/): removals counted per rule with a sample kept, datatrove's blocks with the
configured thresholds, the quality classifier trained and applied, and datatrove's word tokens."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq

from stages.core.config import REPO_ROOT as REPO
from stages.core.config import load_config
from stages.core.documents import read_docs
from stages.filter import quality_model
from stages.ingest import readers
from stages.pipeline import PIPELINE
from tests.conftest import docs_in, out_dir


def test_filter_counts_removals_per_rule_and_keeps_removed_docs(data_pipeline):
    cfg, root, stats = data_pipeline
    s = stats["filter"]
    assert s["docs_in"] == stats["ingest"]["docs_out"]
    assert s["docs_in"] == s["docs_out"] + sum(s["removed"].values())
    rules = ["url", "language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords"]
    assert list(s["removed"]) == rules
    assert s["removed"]["language"] > 0 and s["removed"]["gopher_quality"] > 0
    assert s["bytes_out"] + sum(s["removed_bytes"].values()) <= s["bytes_in"]
    assert all(s["removed_bytes"][r] > 0 for r in rules if s["removed"][r])
    kept = docs_in(out_dir("filter", cfg))
    assert kept and all(d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65 for d in kept)
    removed = [d for f in (out_dir("filter", cfg) / "removed").glob("*.parquet") for d in read_docs(str(f))]
    sampled = Counter(d.metadata["removed_by"].split(":")[0] for d in removed)
    # a bounded sample per rule and shard, and every rule that removed something has examples
    assert all(
        0 < sampled[r] <= min(s["removed"][r], cfg.filter.removed_sample_per_rule * 10)
        for r in rules
        if s["removed"][r]
    )
    assert any(d.metadata["language"] in ("de", "fr", "es") for d in removed)


def test_rule_browser_measures_what_each_rule_decided(data_pipeline):
    """The per-rule artifacts (stages/filter/browse.py): removed documents with their reason and the measured value
    on the wrong side of its threshold, kept ones nearest a threshold on the right side; bounded in size."""
    from stages.filter import browse

    cfg, _, stats = data_pipeline
    out = stats["filter"]["output"]
    shown = {a.key: a for a in browse.artifacts(cfg, stats["filter"])}
    removing = [rule for rule, n in stats["filter"]["removed"].items() if n]
    assert set(shown) == {"filter-rule-" + rule.replace("_", "-") for rule in removing}
    bound = 8 * browse.SHOWN * (browse.OPENING + 300)
    assert all(a.kind == "markdown" and len(a.content) < bound for a in shown.values())
    for rule, docs in browse.removed_by_rule(out, cfg).items():
        for doc in docs if rule in browse.MEASURES else []:
            failed = browse.failed_check(rule, doc, cfg)  # measured here: on the removing side of its threshold
            if failed is None:  # (only a document in another language than those kept has no measure)
                assert rule == "language" and doc.metadata["language"] not in cfg.filter.languages
                continue
            assert browse.margin(failed[1]) < 0, (rule, doc.metadata["removed_by"], failed)
    for rule in browse.MEASURES:
        kept = browse.nearest_kept(out, cfg, rule)
        assert kept and all(margin >= 0 for margin, *_ in kept), rule  # kept: inside every threshold of the rule
        assert [m for m, *_ in kept] == sorted(m for m, *_ in kept)
    gopher = shown["filter-rule-gopher-quality"].content
    assert "removed by this rule" in gopher and "(kept when at least" in gopher and "nearest a threshold" in gopher


def test_url_rule_with_mapped_domain_list_decides_as_datatrove():
    import itertools
    import random

    from datatrove.data import Document
    from datatrove.pipeline.filters import URLFilter

    from stages.filter import url_lists

    ours = url_lists.url_rule({"extra_domains": ["extra-blocked.example"]})
    theirs = URLFilter(extra_domains=["extra-blocked.example"])
    ours.tldextractor = theirs.tldextractor = ours.tldextractor  # (the offline public-suffix snapshot, both)
    ours.download_data()
    folder = url_lists.Path(ours.block_listed_domains.hashes.filename).parent
    with open(folder / "domains") as f:
        listed = [line.strip() for line in itertools.islice(f, 0, 4_000_000, 20_000) if not line.startswith("#")]
    with open(folder / "urls") as f:
        urls = [line.strip() for line in itertools.islice(f, 0, 20_000, 500)]
    rng = random.Random(0)
    candidates = [f"https://{d}/page" for d in listed] + [f"http://www.{d}/" for d in listed[:50]] + urls
    candidates += [f"https://{d.replace('.', 'x', 1)}.org/a" for d in listed[:100]]  # near misses: not listed
    candidates += [f"https://site{rng.randrange(10**9)}.example/{w}" for w in ("news", "porn", "xxx", "casino")]
    candidates += ["https://extra-blocked.example/x", "https://sub.extra-blocked.example/x", "https://192.0.2.1/"]
    documents = [Document("", str(i), metadata={"url": url}) for i, url in enumerate(candidates)]
    verdicts = [(ours.filter(doc), theirs.filter(doc)) for doc in documents]
    assert all(a == b for a, b in verdicts), [(u, v) for u, v in zip(candidates, verdicts) if v[0] != v[1]][:5]
    reasons = Counter(v[0][1] if isinstance(v[0], tuple) else "kept" for v in verdicts)
    assert reasons["domain"] + reasons["subdomain"] > 150 and reasons["url"] > 20 and reasons["kept"] > 100
    assert len(ours.block_listed_domains) == len(theirs.block_listed_domains) > 4_000_000


def test_url_badwords_pii_rules_and_configured_thresholds(tmp_path):
    badword = next(
        w for w in (REPO / "models" / "badwords" / "en").read_text().split("\n") if w.isalpha() and len(w) > 4
    )
    sentence = "The committee met on Tuesday to discuss the budget for the new library and the repairs to the bridge."
    body = " ".join([sentence] * 6)
    docs = [
        {"id": "blocked", "text": body, "url": "https://news.blocked-site.com/today"},
        {"id": "rude", "text": f"{body} Then someone said {badword} loudly.", "url": "https://ok.example/1"},
        {
            "id": "pii",
            "text": f"{body} Write to jane.doe@mail.example.com or ping 8.8.8.8 or 192.168.1.7.",
            "url": None,
        },
        {
            "id": "short",
            "text": "The library opened on time and the bridge was repaired at last by the city.",
            "url": None,
        },
    ]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    overrides = {
        "storage.root": str(tmp_path / "out"),
        "ingest.inputs": [str(src)],
        "filter.url.extra_domains": ["blocked-site.com"],
        "filter.gopher_repetition.enabled": False,  # the test text repeats itself on purpose
        "filter.fineweb_quality.enabled": False,
        "filter.c4_quality.enabled": False,
    }
    cfg = load_config("tiny", overrides)
    PIPELINE.run("ingest", cfg, log=lambda _: None)
    s = PIPELINE.run("filter", cfg, log=lambda _: None)
    assert "gopher_repetition" not in s["removed"]
    assert (s["removed"]["url"], s["removed"]["c4_badwords"], s["removed"]["gopher_quality"]) == (1, 1, 1)
    kept = {d.id: d.text for d in docs_in(out_dir("filter", cfg))}
    assert list(kept) == ["pii"] and s["pii_redacted_docs"] == 1
    assert "jane.doe@mail.example.com" not in kept["pii"] and "8.8.8.8" not in kept["pii"]
    assert "192.168.1.7" in kept["pii"]  # private addresses are not personal data
    lenient = load_config("tiny", {**overrides, "filter.gopher_quality.min_doc_words": 10})
    assert PIPELINE.run("filter", lenient, log=lambda _: None)["removed"]["gopher_quality"] == 0


def test_quality_classifier_is_trained_evaluated_and_applied(small_corpus, tmp_path):
    rows = pq.read_table(REPO / "data" / "sample" / "reference.parquet").to_pylist()
    reference = [r for r in rows if json.loads(r["metadata"]).get("kind") == "rest-source"]
    positive = tmp_path / "reference.jsonl"
    positive.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in reference))
    overrides = {
        "storage.root": str(tmp_path / "out"),
        "ingest.inputs": [str(small_corpus["jsonl"]), str(small_corpus["warc"])],
        "filter.quality.enabled": True,
        "filter.quality.positive": [str(positive)],
        "filter.quality.max_examples": 300,
        # the classifier is what is tested: the heuristic rules (the slow part) are off
        **{
            f"filter.{rule}.enabled": False
            for rule in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")
        },  # fmt: skip
    }
    cfg = load_config("tiny", overrides)
    PIPELINE.run("ingest", cfg, log=lambda _: None)
    s = PIPELINE.run("filter", cfg, log=lambda _: None)
    q = s["quality_classifier"]
    assert q["examples"]["positive"] == len(reference) and q["examples"]["negative"] == 300  # capped: max_examples
    assert q["held_out_precision"] >= 0.9 and q["held_out_recall"] >= 0.9
    assert list(s["removed"])[-1] == "quality" and s["removed"]["quality"] > 0
    assert (out_dir("filter", cfg) / q["model"]).is_file()

    # Python's documentation (pages and reST sources, like the reference corpus) survives the classifier
    def python_share(docs) -> float:
        python = ["docs.python.org" in (d.url or "") or d.metadata.get("kind") == "rest-source" for d in docs]
        return sum(python) / len(docs)

    pool, kept = docs_in(out_dir("ingest", cfg)), docs_in(out_dir("filter", cfg))
    assert python_share(kept) >= 0.75 and python_share(kept) >= 3 * python_share(pool)

    # keep_top_fraction: the threshold is the score keeping that share of the raw pool (the model alone, trained
    # again: the filter's shard pass is the same code as above)
    top = load_config("tiny", {**overrides, "filter.quality.keep_top_fraction": 0.2})
    shards = [str(p) for p in sorted(out_dir("ingest", cfg).glob("part-*.parquet"))]
    trained = quality_model.train(top, shards, str(tmp_path / "top"))
    assert trained["threshold"] != q["threshold"]


def test_reusing_word_tokenizer_gives_datatrove_tokens(small_corpus):
    from datatrove.utils import word_tokenizers
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    from stages.filter import word_tokens

    records = readers.read_records(str(small_corpus["jsonl"]), load_config("tiny"), readers.Tally())
    texts = [r.doc.text for r in records if r.doc][:150]
    texts += ["", "  \n ", "IS_ALPHA breaks spaCy", "Dr. Smith's e-mail: a@b.co! Next line.\n東京 🚀 ok."]
    word_tokens.install()
    word_tokens.install()  # idempotent
    ours = word_tokenizers.load_word_tokenizer("en")
    reference = SpaCyTokenizer("en")
    assert type(ours) is not SpaCyTokenizer and word_tokenizers.load_word_tokenizer("en") is ours
    for method in ("word_tokenize", "sent_tokenize", "span_tokenize"):
        for text in texts + texts[:5]:  # the repeats come from the remembered results
            assert getattr(ours, method)(text) == getattr(reference, method)(text), (method, text[:80])


def test_gopher_repetition_counts_are_datatrove_s(small_corpus):
    import importlib.util
    import random

    from datatrove.pipeline.filters import gopher_repetition_filter

    from stages.filter import repetition

    spec = importlib.util.spec_from_file_location("datatrove_gopher", gopher_repetition_filter.__file__)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)  # (datatrove's own helpers, whatever this process has installed)
    records = readers.read_records(str(small_corpus["jsonl"]), load_config("tiny"), readers.Tally())
    word_lists = [r.doc.text.split() for r in records if r.doc][:100]
    rng = random.Random(0)
    for _ in range(300):  # repeats, overlaps, and n-grams equal only once joined ("ab" "c" / "a" "bc")
        vocab = rng.choice([["a", "b"], ["ab", "c", "a", "bc"], ["x", "y", "z", "xy", "yz"]])
        word_lists.append([rng.choice(vocab) for _ in range(rng.randint(0, 60))])
    word_lists += [[], ["one"], ["a"] * 25]
    for words in word_lists:
        for n in range(1, 11):
            assert repetition.find_all_duplicate(words, n) == original.find_all_duplicate(words, n), (words, n)
            grams = original.get_n_grams(words, n)
            if grams:
                assert repetition.find_top_duplicate(grams) == original.find_top_duplicate(grams), (words, n)
    repetition.install()
    assert gopher_repetition_filter.find_all_duplicate is repetition.find_all_duplicate
