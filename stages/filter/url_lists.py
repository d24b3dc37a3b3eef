"""datatrove's URL rule with its domain blocklist memory-mapped: the same decisions, a fraction of the start-up and
memory.

datatrove's URLFilter parses the 4.5 million domains its wheel ships into a Python set at its first document:
2.2 s and about 400 MB in every worker process, so a node of 64 workers holds 64 copies of one set. Here the
domains are a sorted array of their 64-bit xxh3 hashes (36 MB), built once per machine beside datatrove's
extracted lists and memory-mapped by every process: the pages are the OS's, shared, and a process starts in
milliseconds. A domain that is not on the list is taken for one with probability about n / 2^64 per lookup
(2.5e-13). The other lists (20,000 URLs, the banned words) stay datatrove's sets.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import xxhash

HASHES = "domains.{stamp}.xxh3.npy"  # (the source's size and mtime in the name: a new list gets new hashes)


def _hash(item: str) -> int:
    return xxhash.xxh3_64_intdigest(item.encode("utf-8", "surrogatepass"))


class HashedStrings:
    """`item in` a big list of strings, by a sorted array of their hashes, plus a (small) set of extra ones."""

    def __init__(self, hashes: np.ndarray, extra: set[str]):
        self.hashes, self.extra = hashes, extra

    def __contains__(self, item) -> bool:
        if item in self.extra:
            return True
        if not isinstance(item, str):
            return False
        key = np.uint64(_hash(item))
        at = int(np.searchsorted(self.hashes, key))
        return at < len(self.hashes) and self.hashes[at] == key

    def __len__(self) -> int:
        return len(self.hashes) + len(self.extra)


def hashed_domains(folder: str) -> np.ndarray:
    """The domains file in `folder` as a sorted array of hashes, memory-mapped; built on first use, about 8 s
    (atomically: processes that race each build it and the last rename wins, with the same bytes)."""
    from datatrove.pipeline.filters.url_filter import parse_list

    source = Path(folder, "domains")
    info = source.stat()
    path = Path(folder, HASHES.format(stamp=f"{info.st_size}-{info.st_mtime_ns}"))
    if not path.is_file():
        with open(source) as f:
            domains = parse_list(f, do_normalize=False)  # (datatrove's own parsing: the same strings)
        hashes = np.unique(np.fromiter(map(_hash, domains), dtype=np.uint64, count=len(domains)))
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                np.save(f, hashes)
            partial.replace(path)
        except OSError:  # (a read-only cache: this process keeps its own copy)
            partial.unlink(missing_ok=True)
            return hashes
    return np.load(path, mmap_mode="r")


def url_rule(kwargs: dict):
    """datatrove's URLFilter built from `kwargs`, whose integrated domain list is read as hashes (see above)."""
    from datatrove.pipeline.filters import URLFilter
    from datatrove.pipeline.filters import url_filter as datatrove_url
    from tldextract import TLDExtract

    class MappedListsURLFilter(URLFilter):
        # datatrove's download_data, line for line, but for the domains (datatrove has no hook for it)
        def download_data(self):
            if self._downloaded or not self.use_integrated_lists:
                return
            folder = datatrove_url.cached_assets_path(library_name="datatrove", namespace="filters",
                                                      subfolder="url_filter")  # fmt: skip
            archive = os.path.join(datatrove_url.ASSETS_PATH, "url_filterblacklistsv0_3_0.tar.gz")

            def extract():
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(folder)

            datatrove_url.safely_create_file(os.path.join(folder, "url_filterblacklistsv0_3_0.tar.gz"), extract)
            self.block_listed_domains = HashedStrings(hashed_domains(folder), self.block_listed_domains)
            self.block_listed_url = datatrove_url.get_list(folder, "urls", self.block_listed_url, do_normalize=False)
            assets = datatrove_url.ASSETS_PATH
            self.banned_words = datatrove_url.get_list(assets, "banned_words.txt", self.banned_words)
            self.banned_subwords = datatrove_url.get_list(assets, "banned_subwords.txt", self.banned_subwords)
            self.soft_banned_words = datatrove_url.get_list(assets, "soft_banned_words.txt", self.soft_banned_words)
            for word in self.banned_subwords:
                self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
            self.banned_subwords_automaton.make_automaton()
            self._downloaded = True

    rule = MappedListsURLFilter(**kwargs)
    rule.tldextractor = TLDExtract(suffix_list_urls=())  # (the public-suffix snapshot in its wheel: no fetch)
    return rule
