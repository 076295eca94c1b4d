"""Worker processes for work over every recording (featurize's feature sets, the split
stage's fingerprints): forked where the platform can, one torch thread each, and ended with
the stage however it ends.

The one pool both stages use. It lives outside tympan/features on purpose: the featurize code
digest (`tympan.features.cache.code_digest`) hashes that package, and how work is spread over
processes changes no feature value, so a fix here recomputes no cached feature set.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

# Fewer items than this run in the calling process: starting workers would cost more.
PARALLEL_MIN = 256
# prctl(2) option: the signal this process gets when the thread that forked it ends.
PR_SET_PDEATHSIG = 1


def worker_count(items: int) -> int:
    """One process per CPU for `PARALLEL_MIN` items or more, else 1 (this process)."""
    return (os.cpu_count() or 1) if items >= PARALLEL_MIN else 1


def process_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """`[fn(item) for item in items]`, in order, in `workers` processes (in this one when
    `workers` <= 1), each with one torch thread; an exception in `fn` reaches the caller."""
    if workers <= 1 or len(items) < 2:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # clip-sized tensors: more threads only wait on each other
        try:
            return [fn(item) for item in items]
        finally:
            torch.set_num_threads(threads)
    chunk = max(1, len(items) // (8 * workers))
    return list(pool_map(fn, items, workers, chunksize=chunk))


def pool_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    init: Callable[..., Any] | None = None,
    initargs: tuple = (),
    chunksize: int = 1,
) -> Iterator[R]:
    """`fn(item)` for each item, yielded in order as they finish, in `workers` processes forked
    where the platform can (as torch's DataLoader workers are: starting takes milliseconds
    instead of the seconds a spawned interpreter spends importing torch). Each worker dies
    with this process (`die_with`), runs one torch thread, then `init(*initargs)` (state the
    worker keeps for every item, such as a torch front end). An exception in `fn` reaches
    the caller; leaving the generator early shuts the pool down."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_worker_init,
        initargs=(os.getpid(), init, initargs),
    ) as pool:
        yield from pool.map(fn, items, chunksize=chunksize)


def _worker_init(parent: int, init: Callable[..., Any] | None, initargs: tuple) -> None:
    die_with(parent)
    torch.set_num_threads(1)  # one process per core does the parallel work
    if init is not None:
        init(*initargs)


def die_with(parent: int) -> None:
    """End this worker when the process `parent` ends, however it ends: killed with SIGKILL,
    a stage cleans nothing up, and idle workers would wait on their queue for ever. On Linux
    the kernel sends them SIGKILL (PR_SET_PDEATHSIG), the parent checked once more after
    arming it in case it died first; elsewhere a daemon thread exits when the parent pid
    changes."""
    if _arm_parent_death_signal():
        if os.getppid() != parent:
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _arm_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)
