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
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_processes(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    dask_address: str | None = None,
    on_result: Callable[[R], None] | None = None,
) -> list[R]:
    """`on_result` is called with each result as it is done (locally in input order, as soon as it and those
    before it are; on Dask in the order they finish)."""
    items = list(items)
    if dask_address:
        return map_on_dask(fn, items, dask_address, on_result)
    if workers <= 1 or len(items) <= 1:
        return _followed((fn(item) for item in items), on_result)
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(items)), mp_context=context, initializer=exit_when_gone, initargs=(os.getpid(),)
    ) as pool:
        return _followed(pool.map(fn, items), on_result)


def _followed(results: Iterable[R], on_result: Callable[[R], None] | None) -> list[R]:
    collected = []
    for result in results:
        collected.append(result)
        if on_result:
            on_result(result)
    return collected


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return True  # (nothing to watch)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user: alive as far as we can tell
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc (not Linux): os.kill said it exists


def exit_when_gone(pid: int, every: float = 1.0) -> None:
    """Exit this process once process `pid` is gone, checked by a daemon thread every `every` seconds.

    A stage's process that is SIGKILLed (a lost flow run) cannot stop its workers. Left running they would go on
    building units beside the retry, and they hold the stage's stdout, so Prefect's runner, which reads it to the
    end, would not see the run crash until they finished. The kernel's parent-death signal cannot do this here:
    forkserver workers are the forkserver's children, and it lives as long as they do.
    """

    def watch() -> None:
        while process_alive(pid):
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-when-{pid}-gone", daemon=True).start()


def map_on_dask(
    fn: Callable[[T], R], items: list[T], address: str, on_result: Callable[[R], None] | None = None
) -> list[R]:
    from distributed import Client, get_worker, worker_client

    if not items:
        return []
    try:
        get_worker()
        inside_worker = True
    except ValueError:
        inside_worker = False
    with worker_client() if inside_worker else Client(address) as client:
        futures = client.map(fn, items, pure=False)
        if on_result:
            from distributed import as_completed

            for future in as_completed(futures):
                on_result(future.result())
        return client.gather(futures)
