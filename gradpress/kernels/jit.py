"""Compiled CPU kernels: how gradpress calls numba.

The hot loops of the quantizers and of the bit codes are numba kernels (``@kernel``), each
compiled once per machine (``cache=True``) in two builds:

* **parallel**: ``prange`` loops split over numba's thread pool, used when torch may use
  several threads (``torch.get_num_threads() > 1``; capped at numba's pool size), under a
  process-wide lock: numba's default ``workqueue`` threading layer aborts the process when
  two Python threads launch parallel kernels at once, so concurrent callers take turns;
* **serial**: ``prange`` is a plain loop on the calling thread, used when torch runs on one
  thread, as in a DDP worker. The pool is never woken there: measured on this project's
  2-core machine with 2 gloo ranks, pool threads competing with the backward pass doubled
  the step time of ECQ training (135 -> 69 ms per step).

A kernel is called like a function (``_quantize(x, ...)``).

**The on-disk cache across processes.** ``torchrun`` starts every rank at once, so on a
fresh install all of them compile the same kernels at the same moment and write the same
cache files. Numba's cache is not safe for that (numba issues #4807 and #10128): saving an
overload reads the index, picks the next free data-file number, writes the index, then
the data file, so two processes that save different signatures of one kernel can leave an
index that points one signature at the other's machine code, which a later process loads
and crashes in. Every cached dispatcher made here therefore loads and saves under an
exclusive ``flock`` on ``<index>.lock`` beside numba's index (:func:`_guard_cache`): each
save is atomic with respect to every other process's load and save. Where ``fcntl`` is
missing (Windows) or the cache directory cannot be written, numba's own behaviour stays.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types
from collections.abc import Callable
from typing import Any

import numba
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: numba's unguarded cache
    fcntl = None  # type: ignore[assignment]

_LOCK = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: str, create_dir: bool):
    """Hold an exclusive ``flock`` on ``path`` (created if missing; its directory too with
    ``create_dir``); without ``fcntl``, or when the file cannot be opened or locked (a
    read-only or lock-less file system), no lock: numba's own behaviour."""
    fd = None
    if fcntl is not None:
        try:
            if create_dir:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _guard_cache(dispatcher):
    """Make ``dispatcher``'s cache load and save each overload under the inter-process lock
    of its index (see the module docstring); returns ``dispatcher``."""
    cache = getattr(dispatcher, "_cache", None)
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    if not isinstance(index, str) or not hasattr(cache, "save_overload"):
        return dispatcher  # another numba's layout: leave it as numba made it
    lock = index + ".lock"
    load, save = cache.load_overload, cache.save_overload

    def load_overload(sig, target_context):
        with _file_lock(lock, create_dir=False):  # no directory yet: nothing to load
            return load(sig, target_context)

    def save_overload(sig, data):
        with _file_lock(lock, create_dir=True):
            return save(sig, data)

    cache.load_overload, cache.save_overload = load_overload, save_overload
    return dispatcher


def _njit(fn: Callable, **options: Any):
    """``numba.njit(cache=True, **options)(fn)`` with its cache guarded."""
    return _guard_cache(numba.njit(cache=True, **options)(fn))


def threads() -> int:
    """Threads a kernel may use now: torch's setting, at most numba's pool size."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class Kernel:
    """A compiled kernel in a parallel and a serial build (see the module docstring)."""

    def __init__(self, fn: Callable) -> None:
        self.parallel = _njit(fn, parallel=True, nogil=True)
        # A separate function object with its own name, so the two builds never share an
        # on-disk cache entry.
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = _njit(twin, nogil=True)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        n = threads()
        if n == 1:
            return self.serial(*args)
        with _LOCK:
            numba.set_num_threads(n)
            return self.parallel(*args)


def kernel(fn: Callable) -> Kernel:
    """Compile ``fn`` (whose loops may use ``numba.prange``) as a :class:`Kernel`."""
    return Kernel(fn)


def compiled(fn: Callable) -> Callable:
    """``numba.njit(cache=True, nogil=True)``: a compiled single-threaded kernel (for loops
    that cannot be split, such as a prefix-code decoder)."""
    return _njit(fn, nogil=True)


def serial(fn: Callable) -> Callable:
    """A compiled helper inlined into kernels (``numba.njit(inline='always')``)."""
    return _njit(fn, inline="always")
