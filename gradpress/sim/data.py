"""Splitting a data set across ``P`` simulated workers, i.i.d. or non-i.i.d.

``split(n, P)`` returns a ``(P, m)`` array of row indices, ``m = n // P`` (the ``n mod P``
leftover rows are dropped so every worker holds the same number of rows and the simulator
stays vectorized; the global objective is then the mean of the workers' local objectives
over exactly these rows):

* ``"iid"``: a seeded random permutation cut into ``P`` equal shards;
* ``"noniid"``: rows sorted by ``key`` (the label or the regression target; ties broken by
  a seeded shuffle), then cut into contiguous shards, so each worker sees a narrow slice of
  the labels: the heterogeneous regime of federated learning;
* ``"blocks"``: consecutive rows in storage order, ``m`` per worker: an i.i.d. split when
  the rows are i.i.d. draws (synthetic data), and one the simulator can slice without
  copying (mini-batch windows are views of ``X``).

Bits: none.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("iid", "noniid", "blocks")


def split(n: int, workers: int, how: str = "iid", key: np.ndarray | None = None,
          seed: int = 0) -> np.ndarray:
    """``(workers, n // workers)`` row indices; see the module docstring."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if n < workers:
        raise ValueError(f"cannot split {n} rows across {workers} workers")
    if how not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {how!r}")
    m = n // workers
    if how == "blocks":
        return np.arange(m * workers).reshape(workers, m)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if how == "noniid":
        if key is None:
            raise ValueError("a non-iid split needs key (labels or targets) per row")
        key = np.asarray(key).reshape(-1)
        if key.shape[0] != n:
            raise ValueError(f"key has {key.shape[0]} entries for {n} rows")
        perm = perm[np.argsort(key[perm], kind="stable")]
    return perm[: m * workers].reshape(workers, m)
