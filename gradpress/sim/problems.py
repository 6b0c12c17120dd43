"""Convex test problems with exact optima: least squares, ridge and logistic regression.

Objectives over ``n`` rows ``(x_i, y_i)`` (the rows the workers actually hold):

* least squares  ``f(w) = 1/(2n) ||Xw - y||^2``;             optimum ``X^+ y`` (lstsq);
* ridge          ``f(w) = 1/(2n) ||Xw - y||^2 + lam/2 ||w||^2``; optimum solves
  ``(X^T X / n + lam I) w = X^T y / n``;
* logistic       ``f(w) = 1/n sum_i log(1 + exp(-y_i x_i^T w)) + lam/2 ||w||^2``,
  ``y_i in {-1, +1}``; optimum by Newton's method in float64 to machine precision.

Smoothness ``L = lambda_max(X^T X / n) + lam`` (``/4`` on the data term for logistic).
Data: ``synthetic_linear`` is the ECQ-SGD paper's Syn-d set (Wu et al. 2018, Sec. 6.1:
``y_i = w*^T x_i + eps_i``, ``eps`` i.i.d. noise, 10k samples; Syn-20K: 50k samples of 20k
features, 4 GB as float32); ``real_dataset`` loads the data sets bundled with scikit-learn
(no download), standardized, with a bias column. ``X`` is kept as float64, or as float32
when given so (large problems): losses are then accumulated in float64 over float32
products, and the exact optimum is solved in float64 only where it fits (``optimum_fits``).
Bits: none (no communication here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("least_squares", "ridge", "logistic")
#: Largest ``n*d`` whose optimum is solved exactly (a float64 copy of ``X``: 400 MB).
EXACT_OPTIMUM_MAX = 50_000_000


def _logsig_neg(z: np.ndarray) -> np.ndarray:
    """``log(1 + exp(-z))``, stable."""
    return np.logaddexp(0.0, -z)


@dataclass
class Problem:
    """A finite-sum problem ``f(w) = 1/n sum_i f_i(w)`` with float64 reference data.

    ``X`` is ``(n, d)`` float64 (or float32, kept as given), ``y`` is ``(n,)`` float64
    (``{-1, +1}`` for logistic); ``lam`` the l2 weight (0 for least squares).
    """

    name: str
    kind: str
    X: np.ndarray
    y: np.ndarray
    lam: float = 0.0
    _opt: tuple[np.ndarray, float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"problem kind must be one of {KINDS}, got {self.kind!r}")
        dtype = np.float32 if np.asarray(self.X).dtype == np.float32 else np.float64
        self.X = np.ascontiguousarray(self.X, dtype=dtype)
        self.y = np.ascontiguousarray(self.y, dtype=np.float64).reshape(-1)
        if self.X.ndim != 2 or self.X.shape[0] != self.y.shape[0] or self.X.shape[0] == 0:
            raise ValueError(f"X must be (n, d) and y (n,), got {self.X.shape}, {self.y.shape}")
        if self.lam < 0 or (self.kind == "least_squares" and self.lam != 0):
            raise ValueError("lam must be >= 0 (and 0 for least_squares; use ridge)")
        if self.kind == "logistic" and not np.isin(self.y, (-1.0, 1.0)).all():
            raise ValueError("logistic labels must be -1 or +1")

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]

    def subset(self, rows: np.ndarray) -> Problem:
        """The same problem on the given rows (e.g. those the workers hold); ``self`` when
        they are every row once (the objective is a mean: row order does not matter)."""
        rows = np.asarray(rows).reshape(-1)
        if rows.size == self.n and np.array_equal(np.sort(rows), np.arange(self.n)):
            return self
        return Problem(self.name, self.kind, self.X[rows], self.y[rows], self.lam)

    @property
    def optimum_fits(self) -> bool:
        """Whether :meth:`optimum` is cheap enough to solve (``n*d <= EXACT_OPTIMUM_MAX``)."""
        return self.n * self.d <= EXACT_OPTIMUM_MAX

    def _X64(self) -> np.ndarray:
        return self.X if self.X.dtype == np.float64 else self.X.astype(np.float64)

    # -- float64 reference ------------------------------------------------------------
    def _margins(self, w: np.ndarray) -> np.ndarray:
        """``X w`` in float64 (float32 products for float32 ``X``: one pass, no copy)."""
        if self.X.dtype == np.float64:
            return self.X @ w
        return (self.X @ w.astype(np.float32)).astype(np.float64)

    def loss(self, w: np.ndarray | torch.Tensor) -> float:
        w = _np64(w)
        z = self._margins(w)
        reg = 0.5 * self.lam * float(w @ w)
        if self.kind == "logistic":
            return float(np.mean(_logsig_neg(self.y * z))) + reg
        r = z - self.y
        return 0.5 * float(r @ r) / self.n + reg

    def grad(self, w: np.ndarray | torch.Tensor) -> np.ndarray:
        w = _np64(w)
        z = self._margins(w)
        if self.kind == "logistic":
            coef = -self.y / (1.0 + np.exp(np.clip(self.y * z, -700, 700)))
        else:
            coef = z - self.y
        g = (self.X.T @ coef.astype(self.X.dtype)).astype(np.float64)
        return g / self.n + self.lam * w

    def hessian(self, w: np.ndarray | torch.Tensor) -> np.ndarray:
        w = _np64(w)
        if self.kind == "logistic":
            s = 1.0 / (1.0 + np.exp(-np.clip(self.X @ w, -700, 700)))
            D = s * (1.0 - s)
        else:
            D = np.ones(self.n)
        X = self._X64()
        return (X.T * D) @ X / self.n + self.lam * np.eye(self.d)

    def smoothness(self) -> float:
        """``L``: the largest eigenvalue bound of the Hessian."""
        X = self._X64()
        top = float(np.linalg.eigvalsh(X.T @ X / self.n)[-1])
        return (top / 4.0 if self.kind == "logistic" else top) + self.lam

    def optimum(self) -> tuple[np.ndarray, float]:
        """``(w*, f*)`` in float64: closed form for least squares/ridge, Newton for logistic."""
        if self._opt is None:
            if self.kind == "least_squares":
                w = np.linalg.lstsq(self._X64(), self.y, rcond=None)[0]
            elif self.kind == "ridge":
                X = self._X64()
                A = X.T @ X / self.n + self.lam * np.eye(self.d)
                w = np.linalg.solve(A, X.T @ self.y / self.n)
            else:
                w = self._newton()
            self._opt = (w, self.loss(w))
        return self._opt

    def _newton(self, tol: float = 1e-13, max_iter: int = 200) -> np.ndarray:
        w = np.zeros(self.d)
        f = self.loss(w)
        for _ in range(max_iter):
            g = self.grad(w)
            if np.linalg.norm(g) <= tol * max(1.0, abs(f)):
                break
            step = np.linalg.lstsq(self.hessian(w), g, rcond=None)[0]
            t = 1.0
            while t > 1e-12:  # backtracking (Armijo)
                w_new = w - t * step
                f_new = self.loss(w_new)
                if f_new <= f - 1e-4 * t * float(g @ step):
                    break
                t *= 0.5
            if f_new >= f and t <= 1e-12:
                break
            w, f = w_new, f_new
        return w

    def worker_smoothness(self, shards: np.ndarray) -> float:
        """``max_p L_p`` over the workers' local objectives (``shards`` is ``(P, m)`` rows)."""
        scale = 0.25 if self.kind == "logistic" else 1.0
        tops = [float(np.linalg.eigvalsh(self.X[r].T @ self.X[r] / len(r))[-1]) for r in shards]
        return scale * max(tops) + self.lam


def _np64(w: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().double().numpy()
    return np.asarray(w, dtype=np.float64).reshape(-1)


def synthetic_linear(n: int = 10_000, d: int = 256, noise: float = 1.0, seed: int = 0,
                     kind: str = "least_squares", lam: float = 0.0,
                     dtype: type = np.float64) -> Problem:
    """The ECQ-SGD paper's Syn-d: ``x_i ~ N(0, I_d)``, ``w* ~ N(0, I_d)``,
    ``y_i = w*^T x_i + eps_i`` with ``eps_i ~ N(0, noise^2)`` i.i.d. (seeded). With
    ``dtype=np.float32``, ``X`` is drawn directly in float32 (``4 n d`` bytes, no float64
    copy: Syn-20K's 50k x 20k is 4 GB) and ``y`` accumulated in float64 over row blocks."""
    if n < 1 or d < 1:
        raise ValueError(f"need n, d >= 1, got n={n}, d={d}")
    rng = np.random.default_rng(seed)
    if dtype == np.float64:
        X = rng.standard_normal((n, d))
        w_true = rng.standard_normal(d)
        y = X @ w_true + noise * rng.standard_normal(n)
    elif dtype == np.float32:
        X = rng.standard_normal((n, d), dtype=np.float32)
        w_true = rng.standard_normal(d)
        y = np.empty(n)
        for i in range(0, n, 4096):
            y[i:i + 4096] = X[i:i + 4096].astype(np.float64) @ w_true
        y += noise * rng.standard_normal(n)
    else:
        raise ValueError(f"dtype must be np.float64 or np.float32, got {dtype!r}")
    return Problem(f"syn-{d}", kind, X, y, lam)


REAL_DATASETS = ("diabetes", "breast_cancer", "breast_cancer_mean", "digits", "wine")


def real_dataset(name: str, kind: str | None = None, lam: float = 1e-3,
                 bias: bool = True) -> Problem:
    """A data set bundled with scikit-learn, standardized, with a bias column (``bias``).

    ``diabetes`` is a regression (ridge by default, target standardized); ``breast_cancer``
    (malignant vs benign; ``breast_cancer_mean``: its first ten features, the per-image
    means), ``digits`` (0-4 vs 5-9) and ``wine`` (class 0 vs rest) are binary with labels
    in ``{-1, +1}`` (logistic by default).
    """
    from sklearn import datasets

    loaders = {"diabetes": datasets.load_diabetes, "breast_cancer": datasets.load_breast_cancer,
               "breast_cancer_mean": datasets.load_breast_cancer,
               "digits": datasets.load_digits, "wine": datasets.load_wine}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose from {REAL_DATASETS}")
    X, t = loaders[name](return_X_y=True)
    X = np.asarray(X, dtype=np.float64)
    if name == "breast_cancer_mean":
        X = X[:, :10]
    sd = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    if bias:
        X = np.hstack([X, np.ones((X.shape[0], 1))])
    if name == "diabetes":
        y = (t - t.mean()) / t.std()
        kind = kind or "ridge"
    else:
        pos = {"breast_cancer": t == 1, "breast_cancer_mean": t == 1, "digits": t >= 5,
               "wine": t == 0}[name]
        y = np.where(pos, 1.0, -1.0)
        kind = kind or "logistic"
    return Problem(name, kind, X, y, 0.0 if kind == "least_squares" else lam)
