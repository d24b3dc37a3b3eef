"""The perplexity filter (stages/filter/perplexity_model.py): a KenLM model over SentencePiece pieces per language,
trained by the filter stage on the sample's reference corpus, removes the documents above the percentile or
threshold of their language; the scores are in the stats, in the removed samples and in the kept documents."""

from __future__ import annotations

import random
import statistics
from functools import partial

import pytest
from datatrove.data import Document

from stages.core.config import ConfigError, load_config
from stages.core.documents import read_docs
from stages.filter import perplexity_model
from stages.filter import stage as filter
from stages.pipeline import PIPELINE
from stages.tools.preflight import preflight
from tests.conftest import docs_in, out_dir

HEURISTICS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")


def settings(tmp_path, reference: str, **perplexity) -> dict:
    return {
        "storage.root": str(tmp_path / "out"),
        "filter.perplexity.enabled": True,
        "filter.perplexity.reference": [reference],
        **{f"filter.perplexity.{k}": v for k, v in perplexity.items()},
        # the perplexity rule is what is tested: the heuristic rules (the slow part) are off
        **{f"filter.{rule}.enabled": False for rule in HEURISTICS},
    }


def removed_docs(cfg) -> list:
    folder = out_dir("filter", cfg) / "removed"
    return [d for path in sorted(folder.glob("*.parquet")) for d in read_docs(str(path))]


@pytest.fixture(scope="module")
def percentile_run(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perplexity")
    cfg = load_config(
        "tiny",
        {
            # the reference: the sample's reference corpus (its first 150 documents, 83 of them English)
            **settings(tmp, str(small_corpus["parquet"]), keep_percentile=70),
            "ingest.inputs": [str(small_corpus["jsonl"]), str(small_corpus["warc"])],
            "ingest.workers": 1,
            "filter.workers": 1,
            "filter.removed_sample_per_rule": 1000,
        },
    )
    PIPELINE.run("ingest", cfg, log=lambda _: None)
    return cfg, PIPELINE.run("filter", cfg, log=lambda _: None)


def test_percentile_keeps_that_share_per_language_with_scores_in_stats_and_samples(percentile_run):
    cfg, s = percentile_run
    p = s["perplexity"]
    assert list(p["models"]) == ["en"]  # filter.languages: [en]
    model = p["models"]["en"]
    assert model["reference_docs"] >= 60 and model["pieces"] > 500
    out = out_dir("filter", cfg)
    assert (out / model["sp"]).is_file() and (out / model["lm"]).is_file()

    en = p["languages"]["en"]
    threshold = p["thresholds"]["en"]
    assert en["threshold"] == threshold and p["percentile_sample"]["en"] == en["scored"]  # the whole small pool
    assert en["removed"] == s["removed"]["perplexity"] > 0
    assert en["removed"] / en["scored"] == pytest.approx(0.3, abs=0.03)
    assert en["p10"] <= en["p50"] <= en["p90"] and en["p50"] <= threshold * 1.13  # (quantiles: a bin's upper edge)

    removed = [d for d in removed_docs(cfg) if d.metadata["removed_by"].startswith("perplexity")]
    assert len(removed) == en["removed"]
    assert all(d.metadata["removed_by"] == f"perplexity:en_above_{threshold:g}" for d in removed)
    assert all(d.metadata["perplexity"] > threshold for d in removed)
    kept = docs_in(out)
    assert kept and all(d.metadata["perplexity"] <= threshold for d in kept)


def test_the_model_prefers_real_text_to_its_words_shuffled(percentile_run):
    cfg, s = percentile_run
    model = s["perplexity"]["models"]["en"]
    scorer = perplexity_model.Scorer(*perplexity_model.local_copies(cfg, PIPELINE.output("filter", cfg).uri, model))
    rng = random.Random(0)
    docs = [d.text for d in docs_in(out_dir("filter", cfg))[:20]]
    for text in docs:
        words = text.split()
        rng.shuffle(words)
        assert scorer.perplexity(" ".join(words)) > scorer.perplexity(text)


def test_fixed_threshold_per_language_and_bad_settings(percentile_run, small_corpus, tmp_path):
    cfg, s = percentile_run
    scored = docs_in(out_dir("filter", cfg)) + removed_docs(cfg)
    limit = round(statistics.median(d.metadata["perplexity"] for d in scored if "perplexity" in d.metadata))
    # max_perplexity: the language's threshold is that number, and no pool sample is scored for it
    fixed = load_config("tiny", settings(tmp_path, str(small_corpus["parquet"]), max_perplexity={"en": limit}))
    trained = perplexity_model.train(fixed, [], str(tmp_path / "models"), partial(filter.language_of, fixed))
    assert trained["thresholds"] == {"en": limit} and trained["percentile_sample"] == {}

    # the block removes above its language's threshold, naming it, and leaves another language unscored
    model = s["perplexity"]["models"]["en"]
    block = perplexity_model.PerplexityFilter(
        {"en": perplexity_model.local_copies(cfg, PIPELINE.output("filter", cfg).uri, model)}, {"en": limit}
    )
    for doc in scored[:40]:
        doc = Document(text=doc.text, id=doc.id, metadata={"language": "en"})
        verdict = block.filter(doc)
        if doc.metadata["perplexity"] > limit:
            assert verdict == (False, f"en_above_{limit:g}")
        else:
            assert verdict is True
    other = Document(text=scored[0].text, id="x", metadata={"language": "fr"})
    assert block.filter(other) is True and "perplexity" not in other.metadata

    reference = str(small_corpus["parquet"])
    with pytest.raises(ConfigError, match="enabled without a reference corpus"):
        load_config("tiny", {"filter.perplexity.enabled": True, "filter.perplexity.keep_percentile": 50})
    with pytest.raises(ConfigError, match="enabled without a threshold"):
        load_config("tiny", {"filter.perplexity.enabled": True, "filter.perplexity.reference": [reference]})
    with pytest.raises(ConfigError, match="keep_percentile"):
        load_config("tiny", settings(tmp_path, reference, keep_percentile=100))
    missing = load_config("tiny", settings(tmp_path, str(tmp_path / "nope.parquet"), keep_percentile=50))
    with pytest.raises(ConfigError, match=r"filter.perplexity.reference\[0\]: .*nope.parquet does not exist"):
        preflight(missing)
