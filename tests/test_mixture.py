"""Mixtures (stages/train/mixture.py): blocks drawn by weight from several token datasets, repetition of a source
counted and capped, a capped source dropped from the draws or ending the data, and a resumed mixture drawing exactly
the blocks the uninterrupted one would have. Every token id says which source and block it came from."""

from __future__ import annotations

import collections
import time

import pytest
import torch

from stages.core.config import ConfigError, load_config
from stages.tools.preflight import preflight
from stages.train import loader
from stages.train.mixture import DataExhausted, Mixture, Source

BLOCK = 17  # tokens per block: seq_len 16 + 1
TOKENS_PER_INPUT = 1000
BLOCKS_PER_INPUT = TOKENS_PER_INPUT // BLOCK  # litdata's blocks do not span chunks: one chunk per input here
SOURCES = {"web": (0, 8), "books": (1, 2), "code": (2, 4)}  # name: (id of the source, inputs)
SOURCE_ID = 1_000_000  # a block's first token // SOURCE_ID is its source's id


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{root}/{web,books,code}/train: 8, 2 and 4 chunks of consecutive token ids, offset per source."""
    from litdata import TokensLoader, optimize

    root = tmp_path_factory.mktemp("mixture")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(loader.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        for name, (sid, inputs) in SOURCES.items():
            optimize(
                fn=_tokens,
                inputs=[sid * SOURCE_ID + i * TOKENS_PER_INPUT for i in range(inputs)],
                output_dir=str(root / name / "train"),
                chunk_bytes="4KB",
                item_loader=TokensLoader(),
                num_workers=1,
                verbose=False,
            )
        cfg = load_config("tiny", {"storage.root": str(root), "train.data": str(root / "web"), "train.seq_len": 16})
        yield cfg, root


def _tokens(start: int):
    yield torch.arange(start, start + TOKENS_PER_INPUT, dtype=torch.int32)


def mixture(datasets, weights: dict[str, float], caps: dict[str, float] = {}, on_exhausted="renormalize", log=None):
    cfg, root = datasets
    sources = []
    for name, weight in weights.items():
        data = str(root / name)
        dl = loader.make_loader(cfg, "train", batch_size=1, shuffle=True, data=data)
        sources.append(Source(name, weight, dl, caps.get(name), loader.index_digest(cfg, "train", data)))
    return Mixture(sources, batch_size=8, seed=7, on_exhausted=on_exhausted, log=log or (lambda _: None))


def source_of(block: int) -> str:
    return {sid: name for name, (sid, _) in SOURCES.items()}[block // SOURCE_ID]


def firsts(batch: torch.Tensor) -> list[int]:
    return [int(block[0]) for block in batch]


def test_draws_follow_the_weights_and_are_counted(datasets):
    lines: list[str] = []
    mix = mixture(datasets, {"web": 3.0, "books": 1.0}, log=lines.append)
    drawn = [b for _ in range(100) for b in firsts(mix.read())]
    share = collections.Counter(source_of(b) for b in drawn)
    assert share["web"] + share["books"] == 800
    assert share["books"] / 800 == pytest.approx(0.25, abs=0.05)
    counts = mix.counts()
    assert {name: c["blocks"] for name, c in counts.items()} == dict(share)
    books_per_epoch = 2 * BLOCKS_PER_INPUT
    assert (
        counts["books"]["epochs"] == pytest.approx(share["books"] / books_per_epoch, abs=1e-4)
        and counts["books"]["epochs"] > 1
    )
    assert any("source books: epoch 2 starts" in line for line in lines)
    # an epoch of a source is every block of it once, reshuffled for the next
    books = [b for b in drawn if source_of(b) == "books"]
    assert len(set(books[:books_per_epoch])) == books_per_epoch
    assert books[books_per_epoch : 2 * books_per_epoch] != books[:books_per_epoch]

    again = mixture(datasets, {"web": 3.0, "books": 1.0})
    assert [b for _ in range(100) for b in firsts(again.read())] == drawn  # deterministic


def test_capped_source_renormalizes_the_others(datasets):
    lines: list[str] = []
    mix = mixture(datasets, {"web": 1.0, "books": 1.0, "code": 2.0}, {"books": 1.5}, log=lines.append)
    drawn = [b for _ in range(150) for b in firsts(mix.read())]
    cap = int(1.5 * 2 * BLOCKS_PER_INPUT)
    books_at = [i for i, b in enumerate(drawn) if source_of(b) == "books"]
    assert len(books_at) == cap  # exactly max_epochs x its blocks, then never again
    assert collections.Counter(collections.Counter(drawn[i] for i in books_at).values()) == {2: cap // 3, 1: cap // 3}
    after = drawn[books_at[-1] + 1 :]
    assert len(after) > 500
    assert sum(source_of(b) == "code" for b in after) / len(after) == pytest.approx(2 / 3, abs=0.06)
    counts = mix.counts()
    assert counts["books"] == {"blocks": cap, "epochs": 1.5, "exhausted": True}
    assert not counts["web"]["exhausted"] and not counts["code"]["exhausted"]
    assert any("source books exhausted after 1.50 epochs" in line and "go on over web, code" in line for line in lines)


def test_stop_policy_ends_the_data_after_the_batch_the_source_ran_out_in(datasets):
    mix = mixture(datasets, {"web": 1.0, "books": 1.0}, {"books": 1.0}, on_exhausted="stop")
    drawn = []
    with pytest.raises(DataExhausted, match=r"books \(1.00 epochs, max_epochs 1\).*on_exhausted: stop"):
        while True:
            drawn += firsts(mix.read())
    books = [b for b in drawn if source_of(b) == "books"]
    assert sorted(books) == sorted(set(books)) and len(books) == 2 * BLOCKS_PER_INPUT  # each block once
    assert len(drawn) % 8 == 0  # whole batches: the one it ran out in was finished from the other source
    assert drawn.index(books[-1]) >= len(drawn) - 8


def test_resumed_mixture_draws_exactly_what_the_uninterrupted_one_does(datasets):
    """Through the trainer's read-ahead (loader.Batches), resumed three times: across epoch boundaries of every
    source and across the cap of one, the blocks are the uninterrupted run's, in order."""
    spec = ({"web": 2.0, "books": 1.0, "code": 1.0}, {"books": 1.25})
    reference = [firsts(b) for b in _batches(mixture(datasets, *spec), 90)]
    assert sum(source_of(b) == "books" for batch in reference for b in batch) == int(1.25 * 2 * BLOCKS_PER_INPUT)

    got, state = [], None
    for take in (7, 23, 41, 19):
        mix = mixture(datasets, *spec)
        if state is not None:
            mix.load_state_dict(state)
        batches = loader.Batches(mix)
        got += [firsts(batches.next()) for _ in range(take)]
        time.sleep(0.1)  # the thread reads ahead meanwhile
        state = batches.state_dict()
    assert got == reference
    assert mixture(datasets, *spec).counts(state)["books"]["exhausted"]


def _batches(mix: Mixture, n: int) -> list[torch.Tensor]:
    return [mix.read() for _ in range(n)]


def test_mixture_config_is_checked_and_its_paths_are_not_its_identity(datasets):
    _, root = datasets
    base = {"train.mixture": {"sources": [{"name": "web", "weight": 0.7}, {"name": "books", "weight": 0.3}]}}
    with pytest.raises(ConfigError, match="only one source may leave `data` unset"):
        load_config("tiny", base)
    with pytest.raises(ConfigError, match="source names must be distinct"):
        load_config("tiny", {"train.mixture": {"sources": [{"name": "a", "weight": 1}, {"name": "a", "weight": 1}]}})
    with pytest.raises(ConfigError, match=r"train.mixture.sources.0.weight"):
        load_config("tiny", {"train.mixture": {"sources": [{"name": "a", "weight": 0}]}})
    with pytest.raises(ConfigError, match="on_exhausted"):
        load_config("tiny", {"train.mixture": {"sources": [{"name": "a", "weight": 1}], "on_exhausted": "wrap"}})

    def cfg(books: str, weight: float = 0.3):
        sources = [{"name": "web", "weight": 0.7}, {"name": "books", "weight": weight, "data": books}]
        return load_config("tiny", {"train.mixture": {"sources": sources}})

    with pytest.raises(ConfigError, match=r"train.mixture.sources\[1\].data: no tokenized training data at .*/nope"):
        preflight(cfg(str(root / "nope")))
    here, there = cfg(str(root / "books")), cfg("s3://elsewhere/books")
    assert here.train.mixture.sources[1].data == str(root / "books")
    assert here.section_digest("train") == there.section_digest("train")  # where it lives is not what it is
    assert here.section_digest("train") != cfg(str(root / "books"), 0.4).section_digest("train")
