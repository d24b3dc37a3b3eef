"""Run a function over work items in worker processes, results in input order.

Workers start with `forkserver` so they never inherit the parent's threads or locks (Prefect, torch and
obstore all start threads, and a forked copy of a held lock deadlocks). One worker runs inline, which keeps
tracebacks simple and costs no start-up.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_processes(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
        return list(pool.map(fn, items))
