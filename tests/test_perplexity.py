"""The perplexity filter (stages/perplexity_model.py): a KenLM model over SentencePiece pieces per language,
trained by the filter stage on the sample's reference corpus, removes the documents above the percentile or
threshold of their language; the scores are in the stats, in the removed samples and in the kept documents."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from stages import filter, ingest, perplexity_model
from stages.config import ConfigError, load_config
from stages.documents import read_docs
from stages.preflight import preflight
from tests.conftest import docs_in, out_dir

REFERENCE = str(Path(__file__).resolve().parent.parent / "data" / "sample" / "reference.parquet")
HEURISTICS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "c4_badwords")


def settings(tmp_path, **perplexity) -> dict:
    return {
        "storage.root": str(tmp_path / "out"),
        "filter.perplexity.enabled": True,
        "filter.perplexity.reference": [REFERENCE],
        **{f"filter.perplexity.{k}": v for k, v in perplexity.items()},
        # the perplexity rule is what is tested: the heuristic rules (the slow part) are off
        **{f"filter.{rule}.enabled": False for rule in HEURISTICS},
    }


def removed_docs(cfg) -> list:
    folder = out_dir(filter, cfg) / "removed"
    return [d for path in sorted(folder.glob("*.parquet")) for d in read_docs(str(path))]


@pytest.fixture(scope="module")
def percentile_run(small_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perplexity")
    cfg = load_config(
        "tiny",
        {
            **settings(tmp, keep_percentile=70),
            "ingest.inputs": [str(small_corpus["jsonl"]), str(small_corpus["warc"])],
            "filter.removed_sample_per_rule": 1000,
        },
    )
    ingest.run(cfg, log=lambda _: None)
    return cfg, filter.run(cfg, log=lambda _: None)


def test_percentile_keeps_that_share_per_language_with_scores_in_stats_and_samples(percentile_run):
    cfg, s = percentile_run
    p = s["perplexity"]
    assert list(p["models"]) == ["en"]  # filter.languages: [en]
    model = p["models"]["en"]
    assert model["reference_docs"] >= 150 and model["pieces"] > 500  # (the sample: 235 English, some too short)
    out = out_dir(filter, cfg)
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
    scorer = perplexity_model.Scorer(*perplexity_model.local_copies(cfg, filter.output(cfg).uri, model))
    rng = random.Random(0)
    docs = [d.text for d in docs_in(out_dir(filter, cfg))[:20]]
    for text in docs:
        words = text.split()
        rng.shuffle(words)
        assert scorer.perplexity(" ".join(words)) > scorer.perplexity(text)


def test_fixed_threshold_and_bad_settings(percentile_run, tmp_path):
    cfg, s = percentile_run
    limit = round(s["perplexity"]["thresholds"]["en"] / 2)
    fixed = load_config(
        "tiny", {**settings(tmp_path, max_perplexity={"en": limit}), "ingest.inputs": cfg.ingest.inputs}
    )
    fixed.storage.root = cfg.storage.root  # the same ingest output; the filter's version differs
    r = filter.run(fixed, log=lambda _: None)
    assert r["perplexity"]["thresholds"] == {"en": limit} and r["perplexity"]["percentile_sample"] == {}
    assert r["removed"]["perplexity"] > s["removed"]["perplexity"]
    assert all(d.metadata["perplexity"] <= limit for d in docs_in(out_dir(filter, fixed)))

    with pytest.raises(ConfigError, match="enabled without a reference corpus"):
        load_config("tiny", {"filter.perplexity.enabled": True, "filter.perplexity.keep_percentile": 50})
    with pytest.raises(ConfigError, match="enabled without a threshold"):
        load_config("tiny", {"filter.perplexity.enabled": True, "filter.perplexity.reference": [REFERENCE]})
    with pytest.raises(ConfigError, match="keep_percentile"):
        load_config("tiny", settings(tmp_path, keep_percentile=100))
    missing = load_config(
        "tiny", {**settings(tmp_path, keep_percentile=50), "filter.perplexity.reference": ["nope.parquet"]}
    )
    with pytest.raises(ConfigError, match=r"filter.perplexity.reference\[0\]: .*nope.parquet does not exist"):
        preflight(missing)
