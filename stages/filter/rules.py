"""The filter's rules: datatrove blocks built from `FilterConfig`, in FineWeb's order, and the first rule that
removes a document.

Blocks that hold no state between documents and are costly to build (the URL rule's lists, the fastText models
to load) are built once per process and reused for every shard; the
others are built per shard, so that a shard's output never depends on which shards a process ran before
(C4BadWordsFilter draws from a seeded generator).
"""

from __future__ import annotations

from pathlib import Path

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.filter import perplexity_model, quality_model, url_lists


def _local_badwords(lists_dir: str) -> None:
    from datatrove.pipeline.filters import c4_filters

    # datatrove builds `_BADWORDS_URL + lang` (and a separate URL for English) and copies local paths.
    c4_filters._BADWORDS_URL = lists_dir.rstrip("/") + "/"
    c4_filters._EN_BADWORDS_URL = str(Path(lists_dir) / "en")
    available = {p.name for p in Path(lists_dir).iterdir()} if Path(lists_dir).is_dir() else set()
    # a language without a list file is kept (and counted by datatrove), never a download attempt
    c4_filters._BADWORDS_LANGS = [lang for lang in c4_filters._BADWORDS_LANGS if lang in available]


# (see the docstring: built once per process)
_REUSED: dict[str, object] = {}


def _reused(key: str, make):
    if key not in _REUSED:
        _REUSED[key] = make()
    return _REUSED[key]


def language_rule(cfg: PipelineConfig):
    """datatrove's LanguageFilter with the configured fastText model (lid.176), built once per process."""
    from datatrove.pipeline.filters import LanguageFilter

    fc = cfg.filter
    model_path = Path(fc.lid_model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"filter.lid_model_path: {model_path} does not exist (run `make install`)")

    def make_language():
        language = LanguageFilter(languages=fc.languages or None, language_threshold=fc.language_threshold)
        language.model.MODEL_URL = str(model_path)
        return language

    return _reused(f"language {fc.languages} {fc.language_threshold} {model_path}", make_language)


def language_of(cfg: PipelineConfig, text: str) -> str | None:
    """The language the language rule finds in `text`, or None when it would remove it."""
    from datatrove.data import Document

    doc = Document(text=text, id="")
    return doc.metadata["language"] if language_rule(cfg).filter(doc) else None


def build_rules(
    cfg: PipelineConfig, quality: dict | None = None, perplexity: dict | None = None
) -> list[tuple[str, object]]:
    """The rules in order; `quality` is the trained classifier (stages/filter/quality_model.py) and `perplexity` the
    trained language models (stages/filter/perplexity_model.py), when enabled."""
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        FastTextClassifierFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    fc = cfg.filter
    rules: list[tuple[str, object]] = []
    if fc.url.enabled:

        kwargs = fc.url.block_kwargs()
        rules.append(("url", _reused(f"url {storage.digest_of(kwargs)}", lambda: url_lists.url_rule(kwargs))))

    rules.append(("language", language_rule(cfg)))
    blocks = [
        ("gopher_repetition", fc.gopher_repetition, GopherRepetitionFilter),
        ("gopher_quality", fc.gopher_quality, GopherQualityFilter),
        ("c4_quality", fc.c4_quality, C4QualityFilter),
        ("fineweb_quality", fc.fineweb_quality, FineWebQualityFilter),
        ("c4_badwords", fc.c4_badwords, C4BadWordsFilter),
    ]
    if fc.c4_badwords.enabled:
        _local_badwords(fc.c4_badwords.lists_dir)
    rules += [(name, block(**rule.block_kwargs())) for name, rule, block in blocks if rule.enabled]
    if perplexity is not None:
        models = {
            lang: perplexity_model.local_copies(cfg, perplexity["out_uri"], model)
            for lang, model in perplexity["models"].items()
        }
        thresholds = perplexity["thresholds"]
        rules.append(
            (
                "perplexity",
                _reused(
                    f"perplexity {sorted(models.items())} {sorted(thresholds.items())}",
                    lambda: perplexity_model.PerplexityFilter(models, thresholds),
                ),
            )
        )
    if quality is not None:
        model = quality_model.local_copy(cfg, quality["model_uri"])
        keep = [(quality_model.LABEL, quality["threshold"])]
        classifier = _reused(
            f"quality {model} {quality['threshold']}",
            lambda: FastTextClassifierFilter(model, keep_labels=keep, save_labels_in_metadata=False),
        )
        rules.append(("quality", classifier))
    return rules


def first_rejection(rules, document) -> str | None:
    """Name (and datatrove's reason) of the first rule that removes the document, or None to keep it."""
    for name, rule in rules:
        if name == "url" and not document.metadata.get("url"):
            continue  # a document without a URL (a book, a man page) has nothing for this rule to check
        verdict = rule.filter(document)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
        if not keep:
            return f"{name}:{reason}" if reason else name
    return None
