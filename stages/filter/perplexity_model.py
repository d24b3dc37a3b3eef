"""CCNet's perplexity filter: per language, a KenLM n-gram model over SentencePiece pieces, trained by the pipeline
on a reference corpus, scores every document; documents above their language's threshold are removed.

- Reference: the files of `filter.perplexity.reference` (any format ingest reads: Wikipedia dumps, books, ...),
  split by language with the language-ID model the filter already uses; every language of `filter.languages` with
  at least `min_reference_docs` documents gets a model. Documents of other languages are kept unscored.
- Model, as CCNet's: text normalized as CCNet does it (datatrove's `KenlmModel.normalize`: lower case, digits to
  0, accents and unicode punctuation folded), a SentencePiece unigram model of `vocab_size` pieces, then KenLM's
  `lmplz` (modified Kneser-Ney, `order`-gram) and `build_binary`. KenLM because nothing else trains and queries
  n-gram models at this speed; it is built into the venv by infra/build_kenlm.py (PyPI has no wheel).
- Score: perplexity of the document, 10^(-sum of line log10-probabilities / (pieces + one end of line per line)),
  the per-document score CCNet and datatrove's CCNetPerplexityStats compute.
- Threshold, per language: `max_perplexity[lang]` when given, else the `keep_percentile` percentile of the scores of
  a seeded sample of the ingested documents in that language (`sample_docs` in all), so that every shard, worker and
  rerun applies the same number; a language with neither is scored (the score is in each document's metadata and
  in the stats) but nothing is removed for it.
- Everything is computed once per filter build, before the shards, and saved in the filter's output under names
  that carry a content digest (a retrained model never reuses a name a worker may have cached).

Datatrove's own KenlmModel downloads models from the Hugging Face hub at run time, which this pipeline never
does; `PerplexityFilter` is a datatrove filter block over models trained here instead.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.filter.quality_model import examples, local_copy, pool_sample

# log10(perplexity) histogram per language in the stats: 0.05-wide bins (12% apart) from 1 to 10^6, mergeable
# across shards in bounded memory whatever the corpus size; quantiles read off it are within a bin.
HIST_BIN = 0.05
HIST_BINS = 120


def _normalizer():
    from datatrove.utils.perplexity import KenlmModel

    return KenlmModel("local", "xx")  # (nothing is loaded or downloaded until .model or .tokenizer is used)


def normalized_lines(text: str, normalizer) -> list[str]:
    """The non-blank lines of `text`, each normalized. Line by line, as CCNet does: the normalization removes
    control characters, newlines among them, so a whole text at once would glue its lines' words together."""
    return [norm for line in text.split("\n") if (norm := normalizer.normalize(line)).strip()]


class Scorer:
    """One language's model: SentencePiece pieces, KenLM log-probabilities, a document's perplexity."""

    def __init__(self, sp_path: str, lm_path: str):
        import kenlm
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=sp_path)
        self.lm = kenlm.Model(lm_path)
        self.normalizer = _normalizer()

    def perplexity(self, text: str) -> float | None:
        log10, length = 0.0, 0
        for line in normalized_lines(text, self.normalizer):
            pieces = " ".join(self.sp.encode(line, out_type=str))
            log10 += self.lm.score(pieces)  # with <s> and </s>
            length += len(pieces.split()) + 1
        return round(10.0 ** (-log10 / length), 1) if length else None


class PerplexityFilter(BaseFilter):
    """Removes a document whose perplexity under its language's model is above that language's threshold; the
    score goes into `metadata["perplexity"]` (kept and removed documents alike). Reads `metadata["language"]`,
    which the language-ID rule sets, so it runs after it."""

    name = "🤯 KenLM perplexity"
    _requires_dependencies = ["kenlm", "sentencepiece"]

    def __init__(self, models: dict[str, tuple[str, str]], thresholds: dict[str, float]):
        super().__init__()
        self.scorers = {lang: Scorer(sp, lm) for lang, (sp, lm) in models.items()}
        self.thresholds = thresholds

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang = doc.metadata.get("language")
        scorer = self.scorers.get(lang)
        if scorer is None:
            return True
        score = scorer.perplexity(doc.text)
        doc.metadata["perplexity"] = score
        limit = self.thresholds.get(lang)
        if score is not None and limit is not None and score > limit:
            return False, f"{lang}_above_{limit:g}"
        return True


def histogram_bin(score: float) -> int:
    return min(HIST_BINS - 1, max(0, int(math.log10(max(score, 1.0)) / HIST_BIN)))


def summarize(histograms: dict[str, Counter], thresholds: dict[str, float], removed: Counter) -> dict:
    """Per language: documents scored and removed, the threshold, and quantiles of the scores (from the merged
    histogram: each the upper edge of its bin)."""
    out = {}
    for lang, hist in sorted(histograms.items()):
        total = sum(hist.values())
        quantiles = {}
        for q in (0.1, 0.5, 0.9):
            seen = 0
            for b in sorted(hist):
                seen += hist[b]
                if seen >= q * total:
                    quantiles[f"p{round(q * 100)}"] = round(10 ** ((b + 1) * HIST_BIN), 1)
                    break
        out[lang] = {"scored": total, "removed": removed.get(lang, 0), "threshold": thresholds.get(lang), **quantiles}
    return out


def _find(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _program(name: str) -> str:
    found = _find(name)
    if not found:
        raise FileNotFoundError(f"filter.perplexity: KenLM's {name} is not installed (run `make install`)")
    return found


def kenlm_installed() -> str | None:
    """What of KenLM is missing (None: nothing): its `lmplz` and `build_binary` programs and `kenlm` module."""
    import importlib.util

    missing = [p for p in ("lmplz", "build_binary") if _find(p) is None]
    missing += [] if importlib.util.find_spec("kenlm") else ["the kenlm module"]
    return f"KenLM is not installed ({', '.join(missing)}; run `make install`)" if missing else None


def _save(cfg: PipelineConfig, out_uri: str, kind: str, lang: str, data: bytes) -> str:
    name = f"perplexity-{lang}-{hashlib.sha256(data).hexdigest()[:16]}.{kind}"
    with storage.atomic_write(storage.join(out_uri, name), cfg.storage) as f:
        f.write(data)
    return name


def _train_language(cfg: PipelineConfig, lang: str, texts: list[str], out_uri: str) -> dict:
    import sentencepiece

    pc = cfg.filter.perplexity
    normalizer = _normalizer()
    lines = [line for text in texts for line in normalized_lines(text, normalizer)]
    sp_model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=sp_model, vocab_size=pc.vocab_size, model_type="unigram",
        character_coverage=0.9995, hard_vocab_limit=False,  # a small reference may not fill vocab_size
        num_threads=1, input_sentence_size=1_000_000, shuffle_input_sentence=True, minloglevel=2,
    )  # fmt: skip
    sp = sentencepiece.SentencePieceProcessor(model_proto=sp_model.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        arpa, binary = Path(tmp) / "lm.arpa", Path(tmp) / "lm.bin"
        pieces = "".join(" ".join(sp.encode(line, out_type=str)) + "\n" for line in lines)
        # --discount_fallback: a small reference lacks the counts of counts Kneser-Ney's discounts are estimated from
        lmplz = [_program("lmplz"), "-o", str(pc.order), "-S", "10%", "-T", tmp, "--discount_fallback"]
        with arpa.open("wb") as out:
            done = subprocess.run(lmplz, input=pieces.encode(), stdout=out, stderr=subprocess.PIPE)
        if done.returncode:
            raise RuntimeError(f"filter.perplexity: lmplz failed for {lang}: {done.stderr.decode()[-2000:]}")
        done = subprocess.run([_program("build_binary"), str(arpa), str(binary)], capture_output=True)
        if done.returncode:
            raise RuntimeError(f"filter.perplexity: build_binary failed for {lang}: {done.stderr.decode()[-2000:]}")
        lm_bytes = binary.read_bytes()
    return {
        "sp": _save(cfg, out_uri, "sp.model", lang, sp_model.getvalue()),
        "lm": _save(cfg, out_uri, "kenlm.bin", lang, lm_bytes),
        "reference_docs": len(texts),
        "reference_lines": len(lines),
        "pieces": sp.get_piece_size(),
    }


def train(cfg: PipelineConfig, pool_shards: list[str], out_uri: str, language_of: Callable[[str], str | None]) -> dict:
    """Models per language from the reference, and each language's threshold; `language_of(text)` is the filter's
    language rule (the language it finds, None when the rule would remove the text). Returns what the filter
    stage needs and reports (file names relative to out_uri)."""
    pc = cfg.filter.perplexity
    rng = random.Random(pc.seed)
    by_lang: dict[str, list[str]] = {}
    for text in examples(pc.reference, cfg, pc.max_reference_docs, rng):
        lang = language_of(text)
        if lang is not None:
            by_lang.setdefault(lang, []).append(text)
    models, skipped = {}, {}
    for lang, texts in sorted(by_lang.items()):
        if len(texts) < pc.min_reference_docs:
            skipped[lang] = len(texts)
            continue
        models[lang] = _train_language(cfg, lang, texts, out_uri)
    if not models:
        raise ValueError(
            f"filter.perplexity.reference: no language has {pc.min_reference_docs} reference documents "
            f"(found {dict((lang, len(t)) for lang, t in by_lang.items())})"
        )
    thresholds: dict[str, float] = {lang: pc.max_perplexity[lang] for lang in models if lang in pc.max_perplexity}
    percentile_langs = [lang for lang in models if lang not in thresholds] if pc.keep_percentile is not None else []
    sampled: dict[str, int] = {}
    if percentile_langs:
        import numpy as np

        scorers = {lang: Scorer(*local_copies(cfg, out_uri, models[lang])) for lang in percentile_langs}
        scores: dict[str, list[float]] = {lang: [] for lang in percentile_langs}
        for text in pool_sample(cfg, pool_shards, pc.sample_docs, rng):
            lang = language_of(text)
            if lang in scorers:
                value = scorers[lang].perplexity(text)
                if value is not None:
                    scores[lang].append(value)
        for lang, values in scores.items():
            sampled[lang] = len(values)
            if values:
                thresholds[lang] = round(float(np.percentile(values, pc.keep_percentile)), 1)
    return {
        "models": models,
        "thresholds": thresholds,
        "keep_percentile": pc.keep_percentile,
        "percentile_sample": sampled,
        "too_few_reference_docs": skipped,
    }


def local_copies(cfg: PipelineConfig, out_uri: str, model: dict) -> tuple[str, str]:
    """(SentencePiece model, KenLM binary) as local files: a worker on another machine fetches them once."""
    return local_copy(cfg, storage.join(out_uri, model["sp"])), local_copy(cfg, storage.join(out_uri, model["lm"]))
