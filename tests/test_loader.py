"""The trainer's loader (stages/train/loader.py): shuffled blocks split per rank and per worker, resumed mid-epoch at
exactly the next sample, and a wrong endpoint, rejected credentials or a missing dataset failing in seconds with
an error that says which."""

from __future__ import annotations

import subprocess
import time

import pytest
import torch

from stages.core.config import load_config
from stages.train import loader
from tests.conftest import BIN, free_port, wait_for_port

TOKENS_PER_INPUT = 1000
BLOCK = 17
BLOCKS = 8 * (TOKENS_PER_INPUT // BLOCK)  # litdata's blocks do not span chunks: one chunk per input here


def tokens_of(i: int):
    yield torch.arange(i * TOKENS_PER_INPUT, (i + 1) * TOKENS_PER_INPUT, dtype=torch.int32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, monkeypatch_module):
    """8,000 consecutive token ids in 8 chunks under {root}/tokens/train: every block says where it came from."""
    from litdata import TokensLoader, optimize

    root = tmp_path_factory.mktemp("loader")
    monkeypatch_module.setenv(loader.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    optimize(
        fn=tokens_of,
        inputs=list(range(8)),
        output_dir=str(root / "tokens" / "train"),
        chunk_bytes="4KB",
        item_loader=TokensLoader(),
        num_workers=1,
        verbose=False,
    )
    return load_config(
        "tiny", {"storage.root": str(root), "train.data": str(root / "tokens"), "train.seq_len": BLOCK - 1}
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def blocks(batches) -> list[int]:
    """The first token of every block: identifies it."""
    return [int(block[0]) for batch in batches for block in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_next_samples(dataset, workers):
    whole = loader.make_loader(dataset, "train", batch_size=4, shuffle=True, num_workers=workers)
    reference = blocks(iter(whole))
    assert len(reference) == len(set(reference)) == BLOCKS
    assert reference != sorted(reference)  # shuffled

    first = loader.make_loader(dataset, "train", batch_size=4, shuffle=True, num_workers=workers)
    it, seen = iter(first), []
    for _ in range(23):
        seen += blocks([next(it)])
    state = first.state_dict()
    resumed = loader.make_loader(dataset, "train", batch_size=4, shuffle=True, num_workers=workers)
    resumed.load_state_dict(state)
    assert seen + blocks(iter(resumed)) == reference


def test_resume_of_a_resumed_run_through_batches(dataset):
    """Batches (the trainer's read-ahead) saves each batch's own position, also after a resume, when litdata
    updates one restored state dict in place: a second resume continues at exactly the next block."""
    reference = blocks(iter(loader.make_loader(dataset, "train", batch_size=4, shuffle=True, num_workers=0)))

    def resumed_from(state: dict | None, take: int) -> tuple[list[int], dict]:
        dl = loader.make_loader(dataset, "train", batch_size=4, shuffle=True, num_workers=0)
        if state is not None:
            dl.load_state_dict(state)
        batches = loader.Batches(loader.Epochs(dl, 4, log=lambda _: None))
        taken = blocks([batches.next() for _ in range(take)])
        time.sleep(0.2)  # the thread reads ahead meanwhile
        return taken, batches.state_dict()

    first, state = resumed_from(None, 10)
    second, state = resumed_from(state, 10)
    third, _ = resumed_from(state, 10)
    assert first + second + third == reference[:120]


def test_ranks_read_disjoint_samples_covering_the_dataset(dataset):
    from litdata.utilities.env import _DistributedEnv

    per_rank = []
    for rank in range(2):
        ds = loader.make_dataset(dataset, "train", shuffle=True)
        ds.distributed_env = _DistributedEnv(world_size=2, global_rank=rank, num_nodes=1)  # as torch.distributed says
        per_rank.append([int(block[0]) for block in ds])
    a, b = map(set, per_rank)
    assert a and b and not a & b
    assert len(a | b) == BLOCKS


@pytest.fixture
def s3(tmp_path):
    """A moto server that checks credentials after its first 2 requests (creating a bucket, writing an index):
    every later request is refused, as with wrong keys."""
    port = free_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_port(port, 30)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def s3_config(endpoint: str, root: str):
    return load_config(
        "tiny-s3", {"storage.endpoint_url": endpoint, "storage.root": root, "train.data": f"{root}/tokens"}
    )


def fails_fast(cfg) -> loader.DatasetUnavailable:
    started = time.monotonic()
    with pytest.raises(loader.DatasetUnavailable) as caught:
        loader.make_dataset(cfg, "train", shuffle=True)
    assert time.monotonic() - started < 30
    return caught.value


def test_wrong_endpoint_bad_credentials_and_missing_dataset_fail_fast_saying_which(s3):
    import boto3

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")  # fmt: skip
    client.create_bucket(Bucket="tokens")
    client.put_object(Bucket="tokens", Key="run/tokens/train/index.json", Body=b"{}")

    dead = fails_fast(s3_config(f"http://127.0.0.1:{free_port()}", "s3://tokens/run"))
    assert dead.kind == "endpoint" and "cannot reach the S3 endpoint" in str(dead)
    refused = fails_fast(s3_config(s3, "s3://tokens/run"))  # from now on this server refuses every key
    assert refused.kind == "credentials" and "rejected the credentials" in str(refused)


def test_missing_dataset_fails_fast(s3_endpoint, tmp_path):
    missing = fails_fast(s3_config(s3_endpoint["endpoint"], f"s3://{s3_endpoint['bucket']}/nothing-here"))
    assert missing.kind == "missing" and "tokens/train/index.json does not exist" in str(missing)
    local = fails_fast(load_config("tiny", {"storage.root": str(tmp_path), "train.data": str(tmp_path / "tokens")}))
    assert local.kind == "missing" and "run the tokenize stage first" in str(local)
