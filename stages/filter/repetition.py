"""datatrove's Gopher repetition counts, the same numbers in less time, for the filter stage's rules.

GopherRepetitionFilter asks two helpers for every n of its n-gram rules (2-4 for the top n-gram, 5-10 for the
duplicated ones): `find_top_duplicate`, a Counter filled one element at a time in Python, and `find_all_duplicate`,
which joins n words anew at every position it visits. On bench/extraction.py's pages they took a quarter of the
filter's time. Here the Counter is filled by its C loop, and an n-gram is a slice of the document's words joined
once (words[i:i+n] joined without separator is the same string as that slice of the whole join), and a text
without any repeated n-gram (most prose) is known to have none from one set of them, without the scan. Where it
runs, the greedy scan is datatrove's, and with it every count and every decision: tests/test_filter.py compares
both on texts made to trip them.

`install()` puts these in the module datatrove's filter calls them from (idempotent, per process).
"""

from __future__ import annotations

from collections import Counter
from itertools import accumulate


def find_top_duplicate(x: list[str]) -> int:
    """The characters covered by the most frequent element (ties: the first seen, as Counter.most_common)."""
    element, count = Counter(x).most_common(1)[0]
    return len(element) * count


def find_all_duplicate(words: list[str], n: int) -> int:
    """The characters of n-grams (words joined without separator) that repeat an earlier one, skipping past each."""
    last = len(words) - n + 1
    if last <= 0:
        return 0
    joined = "".join(words)
    ends = [0, *accumulate(map(len, words))]
    grams = [joined[ends[i] : ends[i + n]] for i in range(last)]
    seen = set(grams)
    if len(seen) == last:  # (most prose: no n-gram repeats, so the scan would add each and find none)
        return 0
    seen.clear()
    repeated, i = 0, 0
    while i < last:
        gram = grams[i]
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def install() -> None:
    from datatrove.pipeline.filters import gopher_repetition_filter as module

    module.find_top_duplicate = find_top_duplicate
    module.find_all_duplicate = find_all_duplicate
