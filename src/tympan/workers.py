"""Worker processes for work over every recording (the split stage's fingerprints): forked
where the platform can, one torch thread each, and ended with the stage however it ends.

featurize (tympan.features.cache) runs its own pool the same way; it keeps its own copy of the
parent watch, since any change under tympan/features changes the code digest that keys every
cached feature set.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

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
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    chunk = max(1, len(items) // (8 * workers))
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(fn, items, chunksize=chunk))


def _worker_init(parent: int) -> None:
    die_with(parent)
    torch.set_num_threads(1)  # one process per core does the parallel work


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
