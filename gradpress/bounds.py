"""Rate-distortion bounds for gradient compression (Albasyoni, Safaryan, Condat, Richtarik 2020,
"Optimal Gradient Compression for Distributed and Federated Learning", arXiv 2010.03246).

Classes of operators (Sec. 2): unbiased ``U(omega)``, ``E C(x) = x`` and
``E||C(x)-x||^2 <= omega ||x||^2``; contractive ``B(alpha)``,
``E||C(x)-x||^2 <= (1-alpha) ||x||^2``. ``C in U(omega)`` gives ``C/(omega+1) in B(1/(omega+1))``,
so an unbiased operator sits at distortion ``1 - alpha = omega/(omega+1)`` on the same axis.

**Spherical cap.** ``P(alpha, d)`` is the normalized surface measure of the cap
``{x in S^(d-1): <x, e> >= sqrt(alpha)}``. With ``t = <x, e>``, ``t^2 ~ Beta(1/2, (d-1)/2)``, so

    P(alpha, d) = 1/2 * I_(1-alpha)((d-1)/2, 1/2)          (I = regularized incomplete beta)

computed from ``scipy.special.betainc`` and, where that underflows (large ``d``), from the
continued fraction of ``I`` evaluated in log space with ``scipy.special.betaln`` (exact to
rounding for every ``d`` up to 10^9 and beyond). The large-``d`` (Laplace) form is

    P(alpha, d) ~ (1-alpha)^((d-1)/2) / sqrt(2 pi (d-1) alpha),

from ``I_x(a, b) ~ x^a (1-x)^(b-1) / (a B(a, b))`` and ``a B(a, 1/2) ~ sqrt(pi a)``.

**Worst-case bound (uncertainty principle, Sec. 3).** A deterministic encoder with ``b`` bits
has ``2^b`` code words; after the (free) norm, the decoder outputs ``r u_j`` with ``r >= 0``.
For ``||C(x)-x||^2 <= (1-alpha)||x||^2`` at every ``x``, ``x`` must lie in the cap of angle
``arccos sqrt(alpha)`` around its code word (the best ``r`` leaves error
``||x||^2 (1 - <x/||x||, u>^2)``), and ``2^b`` caps must cover the sphere:

    b >= b_low(alpha, d) = -log2 P(alpha, d)
                         ~ (d-1)/2 log2(1/(1-alpha)) + 1/2 log2(2 pi d alpha).

(With a signed scale the caps become double caps and the bound drops by exactly one bit.)
Randomness without shared seeds cannot help in the worst case: for each ``x`` the best code
word is deterministic. Coverings of the sphere by caps (Rogers; Boroczky-Wintsche) give the
matching upper bound, which we use in the asymptotic form the paper states,

    b*(alpha, d) ~ -log2 P(alpha, d) + log2 d + 1/2 log2 log2 d + eps.

Per coordinate both tend to ``1/2 log2(1/(1-alpha))``: at ``1-alpha = 1/10`` that is 1.66 bits,
and the paper's deterministic Sparse Dithering (3.35 bits/coordinate) sits 1.69 above it.

**Average-case bound (Sec. 4).** For ``x`` uniform on the sphere and ``N = 2^b`` code words
with non-negative scales, the code word ``u`` of a cell ``V`` contributes
``int_V <x, u>_+^2``, which for a given measure ``|V|`` is largest when ``V`` is the cap around
``u`` (bathtub principle). Hence with caps of measure ``1/N``, i.e. ``P(t0^2, d) = 2^-b``,

    alpha_avg(b, d) <= E[t^2 | t >= t0] = (1/d) I_(1-t0^2)((d-1)/2, 3/2) / I_(1-t0^2)((d-1)/2, 1/2)

(using ``E[T 1{T >= c}] = E[T] I_(1-c)((d-1)/2, 3/2)`` for ``T ~ Beta(1/2, (d-1)/2)``), and
``b_avg(alpha, d)`` inverts it. A random code book of ``N`` uniform points (Spherical Compression)
achieves ``alpha_rand(b, d) = E[max_j T_j]``, :func:`random_code_alpha`, a few bits from it.

Measurement helpers (:func:`measure`) give a compressor's empirical distortion, ``omega``,
``alpha`` and real payload bits (``8 * len(payload.to_bytes())``) on given vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from scipy import integrate, optimize, special

LN2 = math.log(2.0)
#: Below this ``scipy.special.betainc`` is replaced by the log-space continued fraction.
_TINY = 1e-250


# -- incomplete beta in log space ------------------------------------------------------
def _log_betacf(a: float, b: float, x: float) -> float:
    """log of the continued fraction of ``I_x(a, b)`` (modified Lentz), for
    ``x < (a+1)/(a+b+2)``, where it converges fast."""
    fpmin = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, dd = 1.0, 1.0 - qab * x / qap
    dd = 1.0 / (dd if abs(dd) > fpmin else fpmin)
    h = dd
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        dd = 1.0 + aa * dd
        dd = 1.0 / (dd if abs(dd) > fpmin else fpmin)
        c = 1.0 + aa / c
        c = c if abs(c) > fpmin else fpmin
        h *= dd * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        dd = 1.0 + aa * dd
        dd = 1.0 / (dd if abs(dd) > fpmin else fpmin)
        c = 1.0 + aa / c
        c = c if abs(c) > fpmin else fpmin
        delta = dd * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.log(h)


def log_betainc(a: float, b: float, x: float) -> float:
    """Natural log of the regularized incomplete beta ``I_x(a, b)``, accurate where
    ``I`` underflows double precision (``a`` up to 10^9 and beyond)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"log_betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return -math.inf
    if x >= 1.0:
        return 0.0
    v = float(special.betainc(a, b, x))
    if v > _TINY:
        return math.log(v)
    if x > (a + 1.0) / (a + b + 2.0):  # upper tail: I = 1 - I_{1-x}(b, a), not tiny there
        return math.log1p(-float(special.betainc(b, a, 1.0 - x)))
    log_front = a * math.log(x) + b * math.log1p(-x) - special.betaln(a, b) - math.log(a)
    return log_front + _log_betacf(a, b, x)


def _check(alpha: float, d: int) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if int(d) != d or d < 1:
        raise ValueError(f"dimension d must be a positive integer, got {d}")


# -- the cap -------------------------------------------------------------------------------
def log2_cap_measure(alpha: float, d: int) -> float:
    """``log2 P(alpha, d)``, the exact normalized measure of the cap ``<x, e> >= sqrt(alpha)``
    on ``S^(d-1)`` (``-inf`` at ``alpha = 1`` for ``d >= 2``)."""
    _check(alpha, d)
    if d == 1:
        return -1.0  # S^0 = {-1, +1}: the cap is one of two points
    if alpha == 1.0:
        return -math.inf
    return (log_betainc((d - 1) / 2.0, 0.5, 1.0 - alpha) - LN2) / LN2


def log2_cap_measure_asymptotic(alpha: float, d: int) -> float:
    """Large-``d`` form ``log2[(1-alpha)^((d-1)/2) / sqrt(2 pi (d-1) alpha)]``."""
    _check(alpha, d)
    if d < 2 or alpha == 1.0:
        raise ValueError("the asymptotic form needs d >= 2 and alpha < 1")
    return ((d - 1) / 2.0 * math.log1p(-alpha)
            - 0.5 * math.log(2 * math.pi * (d - 1) * alpha)) / LN2


def worst_case_bits(alpha: float, d: int) -> float:
    """Worst-case lower bound ``-log2 P(alpha, d)``: bits any deterministic (or privately
    randomized) compressor in ``B(alpha)`` needs for the direction of ``x`` in ``R^d``."""
    return -log2_cap_measure(alpha, d)


def optimal_bits_asymptotic(alpha: float, d: int, eps: float = 0.0) -> float:
    """The paper's asymptotic optimum ``b* ~ -log2 P + log2 d + 1/2 log2 log2 d + eps``
    (the covering upper bound that matches :func:`worst_case_bits` to lower order)."""
    _check(alpha, d)
    lg = math.log2(d)
    return worst_case_bits(alpha, d) + lg + 0.5 * math.log2(max(lg, 1.0)) + eps


def worst_case_alpha(bits: float, d: int) -> float:
    """Inverse of :func:`worst_case_bits`: the largest ``alpha`` a ``bits``-bit direction code
    can guarantee in dimension ``d``."""
    return _invert_alpha(lambda a: worst_case_bits(a, d), bits)


# -- average case ----------------------------------------------------------------------------
def cap_mean_alpha(alpha0: float, d: int) -> float:
    """``E[t^2 | t >= sqrt(alpha0)]`` for ``x`` uniform on ``S^(d-1)``: the average ``alpha``
    inside the cap of measure ``P(alpha0, d)``."""
    _check(alpha0, d)
    if d == 1 or alpha0 == 1.0:
        return 1.0
    a, x = (d - 1) / 2.0, 1.0 - alpha0
    return math.exp(log_betainc(a, 1.5, x) - log_betainc(a, 0.5, x)) / d


def average_case_alpha(bits: float, d: int) -> float:
    """Average-case upper bound on ``alpha`` for ``2^bits`` code words in dimension ``d``
    (caps of measure ``2^-bits``)."""
    if bits <= 1.0:
        return cap_mean_alpha(1e-300, d) if bits >= 1.0 else 1.0 / d
    if d == 1:
        return 1.0
    target = -float(bits)
    lo, hi = 1e-300, 1.0 - 1e-16
    f = lambda a: log2_cap_measure(a, d) - target  # noqa: E731  decreasing in a
    if f(hi) > 0:
        alpha0 = hi
    else:
        alpha0 = optimize.brentq(f, lo, hi, xtol=1e-15, rtol=1e-13)
    return cap_mean_alpha(alpha0, d)


def average_case_bits(alpha: float, d: int) -> float:
    """Average-case lower bound: fewest bits whose code book can reach mean ``alpha`` for ``x``
    uniform on ``S^(d-1)`` (inverse of :func:`average_case_alpha`)."""
    _check(alpha, d)
    if alpha <= 1.0 / d:
        return 0.0
    if alpha >= 1.0:
        return math.inf
    g = lambda b: average_case_alpha(b, d) - alpha  # noqa: E731  increasing in b
    hi = max(2.0, 2.0 * worst_case_bits(alpha, d) + 4)
    return optimize.brentq(g, 0.0, hi, xtol=1e-9, rtol=1e-12)


def random_code_alpha(bits: float, d: int) -> float:
    """``E[max_j <x, u_j>_+^2]`` over a code book of ``2^bits`` directions ``{+-v_j}``,
    ``v_j`` i.i.d. uniform: what Spherical Compression achieves per block, for every ``x``."""
    m = 2.0 ** (bits - 1)  # pairs +-v_j: max over them of <x, v_j>^2 with the sign free
    if d == 1:
        return 1.0
    a = (d - 1) / 2.0

    def tail(t: float) -> float:  # 1 - F(t)^m with F the Beta(1/2, (d-1)/2) cdf
        f = float(special.betainc(0.5, a, t))
        return -math.expm1(m * math.log(f)) if f > 0 else 1.0

    # The integrand drops from 1 to 0 around the 1 - 1/m quantile; give quad that point.
    q = float(special.betaincinv(0.5, a, max(0.0, 1.0 - 1.0 / m)))
    pts = sorted({min(max(q * s, 1e-12), 1 - 1e-12) for s in (0.5, 0.9, 1.0, 1.1, 1.5)})
    val, _ = integrate.quad(tail, 0.0, 1.0, points=pts, limit=400, epsabs=1e-12)
    return float(val)


def _invert_alpha(bits_of, bits: float) -> float:
    lo, hi = 1e-12, 1.0 - 1e-15
    if bits_of(hi) <= bits:
        return hi
    if bits_of(lo) >= bits:
        return lo
    return optimize.brentq(lambda a: bits_of(a) - bits, lo, hi, xtol=1e-15, rtol=1e-13)


def bound_curves(d: int, distortions: Sequence[float]) -> dict[str, list[float]]:
    """Bits per coordinate of the worst-case and average-case bounds at each distortion
    ``1 - alpha`` (for plots and tables)."""
    worst, avg = [], []
    for e in distortions:
        a = 1.0 - float(e)
        worst.append(worst_case_bits(a, d) / d)
        avg.append(average_case_bits(a, d) / d)
    return {"distortion": [float(e) for e in distortions], "worst_case": worst,
            "average_case": avg}


# -- measuring compressors ----------------------------------------------------------------
@dataclass
class Measurement:
    """A compressor measured on real payloads.

    ``distortion`` is ``mean ||C(x)-x||^2 / ||x||^2``; for unbiased compressors
    ``omega = distortion`` and the plotted ``scaled_distortion`` is ``omega/(omega+1)`` (the
    distortion of ``C/(omega+1)``), otherwise ``scaled_distortion = distortion``.
    """

    name: str
    config: dict[str, Any]
    d: int
    samples: int
    unbiased: bool
    payload_bits: float
    body_bits: float
    distortion: float
    scaled_distortion: float
    bits_per_coord: float = field(init=False)
    body_bits_per_coord: float = field(init=False)

    def __post_init__(self) -> None:
        self.bits_per_coord = self.payload_bits / self.d
        self.body_bits_per_coord = self.body_bits / self.d

    @property
    def alpha(self) -> float:
        return 1.0 - self.scaled_distortion

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(compressor: Any, vectors: Iterable[torch.Tensor], seeds: Sequence[int] = (0,)
            ) -> Measurement:
    """Encode every vector under every seed; average real payload bits and distortion."""
    from gradpress.payload import Payload

    bits, body, dist, n, d = 0.0, 0.0, 0.0, 0, None
    for x in vectors:
        xf = x.detach().reshape(-1).double()
        nx = float((xf * xf).sum())
        if d is None:
            d = xf.numel()
        for s in seeds:
            p = compressor.encode(x, seed=int(s))
            raw = p.to_bytes()
            y = compressor.decode(Payload.from_bytes(raw)).reshape(-1).double()
            bits += 8 * len(raw)
            body += 8 * len(p.body)
            dist += float(((y - xf) ** 2).sum()) / nx if nx > 0 else 0.0
            n += 1
    if not n or not d:
        raise ValueError("measure needs at least one non-empty vector and one seed")
    dist /= n
    unbiased = bool(getattr(compressor, "unbiased", False))
    scaled = dist / (1.0 + dist) if unbiased else dist
    return Measurement(getattr(compressor, "name", type(compressor).__name__),
                       dict(compressor.config()), int(d), n, unbiased, bits / n, body / n,
                       dist, scaled)


def empirical_omega(compressor: Any, x: torch.Tensor, seeds: Sequence[int]) -> float:
    """``mean_s ||C_s(x) - x||^2 / ||x||^2`` over the seeds (the variance for unbiased ones)."""
    return measure(compressor, [x], seeds).distortion


def empirical_alpha(compressor: Any, x: torch.Tensor, seeds: Sequence[int] = (0,)) -> float:
    """``1 - mean_s ||C_s(x) - x||^2 / ||x||^2`` (the contraction actually achieved)."""
    return 1.0 - measure(compressor, [x], seeds).distortion


def gap_to_bound(m: Measurement, kind: str = "worst") -> float:
    """Body bits per coordinate of ``m`` over the ``kind`` ('worst' or 'average') bound at
    the distortion ``m`` achieved (``nan`` when the distortion is >= 1)."""
    e = m.scaled_distortion
    if not 0.0 <= e < 1.0:
        return float("nan")
    a = min(1.0 - e, 1.0 - 1e-12)
    bound = worst_case_bits(a, m.d) if kind == "worst" else average_case_bits(a, m.d)
    return m.body_bits_per_coord - bound / m.d


__all__ = [
    "Measurement", "average_case_alpha", "average_case_bits", "bound_curves", "cap_mean_alpha",
    "empirical_alpha", "empirical_omega", "gap_to_bound", "log2_cap_measure",
    "log2_cap_measure_asymptotic", "log_betainc", "measure", "optimal_bits_asymptotic",
    "random_code_alpha", "worst_case_alpha", "worst_case_bits",
]

