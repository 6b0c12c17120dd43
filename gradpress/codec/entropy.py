"""Entropy coding of skewed symbol streams with ``constriction``'s range coder.

A quantizer whose levels are far from uniform (QSGD with few levels, sparse dithering) pays
``log2(K)`` bits per symbol with fixed-width codes but only about the empirical entropy
``H = -sum p_k log2 p_k`` with an entropy coder. We send the model in the stream, so the
decoder needs nothing else:

    K        gamma(K)               alphabet size
    counts   gamma(count_k + 1)     the empirical histogram, one per symbol
    words    gamma(n_words + 1), then n_words * 32 bits of range-coder output

Cost: ``n*H + O(K log n) + 32`` bits; :func:`categorical_cost_bits` is the model-free part.
The probability model is built from the integer counts with ``perfect=False``, which is a
deterministic function of the counts on every platform.
"""

from __future__ import annotations

import numpy as np

from gradpress.codec.bits import BitReader, BitWriter
from gradpress.errors import PayloadError

#: Largest alphabet the decoder accepts (hostile headers cannot ask for more).
MAX_ALPHABET = 1 << 16


def _model(counts: np.ndarray):
    import constriction

    Categorical = constriction.stream.model.Categorical

    return Categorical(counts.astype(np.float64), perfect=False)


def entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Empirical entropy of ``symbols`` times their count, in bits (the coder's target)."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=alphabet_size)
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def write_categorical(w: BitWriter, symbols: np.ndarray, alphabet_size: int) -> None:
    """Append ``symbols`` (integers in ``[0, alphabet_size)``) range-coded with their
    own empirical histogram as the model."""
    import constriction

    RangeEncoder = constriction.stream.queue.RangeEncoder

    s = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
    if not 1 <= alphabet_size <= MAX_ALPHABET:
        raise ValueError(f"alphabet size must be in 1..{MAX_ALPHABET}, got {alphabet_size}")
    if s.size and (s.min() < 0 or s.max() >= alphabet_size):
        raise ValueError(f"symbols must lie in [0, {alphabet_size})")
    counts = np.bincount(s, minlength=alphabet_size).astype(np.uint64)
    w.write_gamma(np.array([alphabet_size]))
    w.write_gamma(counts + np.uint64(1))
    used = np.flatnonzero(counts)
    if used.size <= 1:  # zero or one distinct symbol: the counts say everything
        w.write_gamma(np.array([1]))
        return
    enc = RangeEncoder()
    enc.encode(s, _model(counts))
    words = enc.get_compressed()
    w.write_gamma(np.array([words.size + 1]))
    w.write_uint(words.astype(np.uint64), 32)


def read_categorical(r: BitReader, count: int) -> np.ndarray:
    """Read ``count`` symbols written by :func:`write_categorical` (``int64`` array)."""
    import constriction

    RangeDecoder = constriction.stream.queue.RangeDecoder

    (k,) = r.read_gamma(1)
    k = int(k)
    if k > MAX_ALPHABET:
        raise PayloadError(f"entropy-coded alphabet of {k} symbols exceeds {MAX_ALPHABET}")
    counts = r.read_gamma(k).astype(np.int64) - 1
    if int(counts.sum()) != count:
        raise PayloadError(f"entropy model counts sum to {int(counts.sum())}, expected {count}")
    (n_words,) = r.read_gamma(1)
    n_words = int(n_words) - 1
    used = np.flatnonzero(counts)
    if used.size <= 1:
        if n_words:
            raise PayloadError("entropy stream has words for a single-symbol alphabet")
        return np.full(count, used[0] if used.size else 0, dtype=np.int64)
    if n_words * 32 > r.remaining:
        raise PayloadError("entropy-coded stream truncated")
    words = r.read_uint(n_words, 32).astype(np.uint32)
    try:
        dec = RangeDecoder(np.ascontiguousarray(words))
        out = dec.decode(_model(counts), count).astype(np.int64)
    except Exception as e:  # constriction reports corrupt data with its own types
        raise PayloadError(f"entropy-coded stream corrupted: {e}") from e
    if np.bincount(out, minlength=k)[:k].tolist() != counts.tolist():
        raise PayloadError("entropy-coded stream corrupted: decoded histogram differs")
    return out
