"""datatrove's spaCy word tokenizer, giving the same tokens faster, for the filter stage's rules.

Gopher repetition, Gopher quality and FineWeb quality each split the whole document into words with
datatrove's `SpaCyTokenizer`, and C4 splits every line into sentences with it; on the sample this is most of
the filter stage's time. Two costs are avoidable without changing a single token:
- the same text is tokenized again by each rule that asks: the last few results are kept and reused;
- datatrove tokenizes inside spaCy's `memory_zone`, which frees every lexeme the text created, so the next
  document re-creates them (`Vocab._new_lexeme`). Here the vocabulary is kept between texts and the spaCy
  pipeline is renewed after `RENEW_AFTER` texts, so memory stays bounded.
Tokens depend only on spaCy's tokenizer rules, never on what its vocabulary already holds, so the output is
the same; tests/test_data_stages.py checks it against datatrove's tokenizer.

`install()` makes datatrove's `load_word_tokenizer` (which its filters call at every document) return these
for the languages it assigns to spaCy; other languages keep their own tokenizer.
"""

from __future__ import annotations

from collections import OrderedDict

RENEW_AFTER = 20_000  # texts per spaCy pipeline before it is rebuilt with an empty vocabulary
REMEMBERED = 8  # recent texts whose tokens are kept for the next rule


def _tokenizer_class():
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, strip_strings
    from spacy.attrs import IDX, LENGTH

    class ReusingSpaCyTokenizer(SpaCyTokenizer):
        def __init__(self, language: str, config=None):
            super().__init__(language, config)
            self._recent: OrderedDict = OrderedDict()
            self._texts = 0

        def _remember(self, key: tuple, compute):
            if "IS_ALPHA" in key[1]:  # a spaCy symbol name that datatrove special-cases: take its path
                return getattr(super(), f"{key[0]}_tokenize")(key[1])
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
            self._texts += 1
            if self._texts > RENEW_AFTER:
                self._tokenizer, self._texts = None, 1  # the `tokenizer` property builds a fresh pipeline
            value = compute()
            self._recent[key] = value
            if len(self._recent) > REMEMBERED:
                self._recent.popitem(last=False)
            return value

        def _docs(self, text: str):
            self.tokenizer.max_length = len(text) + 10
            return self._do_tokenize(text)

        def word_tokenize(self, text: str) -> list[str]:
            def words():
                if self.language == "ja":  # chunked by bytes in datatrove: keep its path
                    return strip_strings([t.text for doc in self._docs(text) for t in doc])
                # Words need only the tokenizer, not the sentencizer; and reading offsets as an array spares
                # building a Python Token object per word just to ask its text.
                self.tokenizer.max_length = len(text) + 10
                doc = self.tokenizer.make_doc(text)
                return strip_strings([text[start : start + size] for start, size in doc.to_array([IDX, LENGTH])])

            return list(self._remember(("word", text), words))

        def sent_tokenize(self, text: str) -> list[str]:
            sents = self._remember(
                ("sent", text), lambda: strip_strings([s.text for doc in self._docs(text) for s in doc.sents])
            )
            return list(sents)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            def spans():
                found: list[tuple[int, int]] = []
                for doc in self._docs(text):
                    start = found[-1][1] if found else 0
                    found += [(start + s.start_char, start + s.end_char) for s in doc.sents]
                return found

            return list(self._remember(("span", text), spans))

    return ReusingSpaCyTokenizer


_tokenizers: dict[tuple[str, str], object] = {}


def install() -> None:
    """Route datatrove's tokenizer lookup through the reusing tokenizer (idempotent, per process)."""
    from datatrove.utils import word_tokenizers
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    original = word_tokenizers.load_word_tokenizer
    if getattr(original, "reuses_tokens", False):
        return
    cls = _tokenizer_class()

    def load_word_tokenizer(language_or_tok):
        found = original(language_or_tok)
        if type(found) is not SpaCyTokenizer:
            return found
        key = (found.language, repr(found.config))
        if key not in _tokenizers:
            _tokenizers[key] = cls(found.language, found.config)
        return _tokenizers[key]

    load_word_tokenizer.reuses_tokens = True
    word_tokenizers.load_word_tokenizer = load_word_tokenizer
