"""Compiled CPU kernels: how gradpress calls numba.

The hot loops of the quantizers and of fixed-width packing are numba kernels (``@kernel``):
compiled once per machine (``cache=True``), parallel over ``prange``. :func:`launch` runs one

* with as many threads as torch is allowed (``torch.get_num_threads()``, capped at numba's
  pool): a DDP worker that pins torch to one thread gets single-threaded kernels, so a comm
  hook never competes with the backward pass for cores;
* under a process-wide lock: numba's default ``workqueue`` threading layer aborts the process
  when two Python threads launch parallel kernels at once, so concurrent callers take turns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numba
import torch

_LOCK = threading.Lock()


def kernel(fn: Callable) -> Callable:
    """``numba.njit(parallel=True, cache=True, nogil=True)``: a compiled, parallel kernel."""
    return numba.njit(parallel=True, cache=True, nogil=True)(fn)


def compiled(fn: Callable) -> Callable:
    """``numba.njit(cache=True, nogil=True)``: a compiled single-threaded kernel (for loops
    that cannot be split, such as a prefix-code decoder)."""
    return numba.njit(cache=True, nogil=True)(fn)


def serial(fn: Callable) -> Callable:
    """A compiled helper inlined into kernels (``numba.njit(inline='always')``)."""
    return numba.njit(inline="always", cache=True)(fn)


def threads() -> int:
    """Threads a kernel may use now: torch's setting, at most numba's pool size."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def launch(fn: Callable, *args: Any) -> Any:
    """Run kernel ``fn(*args)`` with :func:`threads` threads, one launch at a time."""
    with _LOCK:
        numba.set_num_threads(threads())
        return fn(*args)
