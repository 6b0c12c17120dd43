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
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import numba
import torch

_LOCK = threading.Lock()


def threads() -> int:
    """Threads a kernel may use now: torch's setting, at most numba's pool size."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class Kernel:
    """A compiled kernel in a parallel and a serial build (see the module docstring)."""

    def __init__(self, fn: Callable) -> None:
        self.parallel = numba.njit(parallel=True, cache=True, nogil=True)(fn)
        # A separate function object with its own name, so the two builds never share an
        # on-disk cache entry.
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = numba.njit(cache=True, nogil=True)(twin)
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
    return numba.njit(cache=True, nogil=True)(fn)


def serial(fn: Callable) -> Callable:
    """A compiled helper inlined into kernels (``numba.njit(inline='always')``)."""
    return numba.njit(inline="always", cache=True)(fn)
