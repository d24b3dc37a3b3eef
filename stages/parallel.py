"""Run a function over work items in parallel, results in input order: local processes or a Dask cluster.

Locally, workers start with `forkserver` so they never inherit the parent's threads or locks (Prefect, torch
and obstore all start threads, and a forked copy of a held lock deadlocks). One worker runs inline, which
keeps tracebacks simple and costs no start-up.

With a Dask scheduler address, the items run on that cluster instead (dask.distributed), whatever the local
`workers`: the same unit functions, which read and write only through the storage layer, so they run on any
machine that has this code and reaches the storage. Called from inside a Dask task (a stage submitted to the
cluster by prefect-dask), it borrows that worker's client and secedes from the worker's thread pool while
it waits, so the stage's own task does not hold a slot its units need.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_processes(
    fn: Callable[[T], R], items: Iterable[T], workers: int, dask_address: str | None = None
) -> list[R]:
    items = list(items)
    if dask_address:
        return map_on_dask(fn, items, dask_address)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        return list(pool.map(fn, items))


def map_on_dask(fn: Callable[[T], R], items: list[T], address: str) -> list[R]:
    from distributed import Client, get_worker, worker_client

    if not items:
        return []
    try:
        get_worker()
        inside_worker = True
    except ValueError:
        inside_worker = False
    if inside_worker:
        with worker_client() as client:
            return client.gather(client.map(fn, items, pure=False))
    with Client(address) as client:
        return client.gather(client.map(fn, items, pure=False))
