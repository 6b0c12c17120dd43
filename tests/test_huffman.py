"""Canonical Huffman codes: exact round trips, textbook sizes, optimality, hostile tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpress.codec import huffman as hf
from gradpress.errors import PayloadError


def brute_force_optimum(counts: list[int]) -> int:
    """Smallest sum(count * length) over prefix codes: Huffman's merge cost, recomputed."""
    c = sorted(x for x in counts if x)
    if len(c) <= 1:
        return sum(c)  # one symbol: 1 bit each
    total = 0
    while len(c) > 1:
        a, b = c.pop(0), c.pop(0)
        total += a + b
        c = sorted(c + [a + b])
    return total


@given(st.integers(1, 16), st.integers(0, 3000), st.integers(0, 2**32 - 1))
@settings(max_examples=80, deadline=None)
def test_round_trip_and_exact_size(levels, n, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(levels, 0.3))
    sym = rng.choice(levels, size=n, p=p).astype(np.uint8)
    counts = np.bincount(sym, minlength=levels)
    lengths = hf.code_lengths(counts)
    data, nbits = hf.encode(sym, lengths)
    assert nbits == int((counts * lengths.astype(np.int64)).sum())
    assert data.size == (nbits + 7) // 8
    back, used = hf.decode(data, n, lengths)
    assert used == nbits and np.array_equal(back, sym)
    assert nbits == brute_force_optimum(counts.tolist())
    # within one bit per symbol of the empirical entropy (Huffman's guarantee)
    if n:
        q = counts[counts > 0] / n
        h = float(-(q * np.log2(q)).sum())
        assert h - 1e-9 <= nbits / n <= h + 1


def test_kraft_and_lengths_for_a_skewed_alphabet():
    counts = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987])
    lengths = hf.code_lengths(counts)  # Fibonacci counts: the deepest possible tree
    assert int(lengths.max()) == 15
    assert sum(2.0 ** -int(x) for x in lengths) == pytest.approx(1.0)


def test_ternary_gradient_symbols_cost_about_one_and_a_quarter_bits():
    rng = np.random.default_rng(0)
    sym = rng.choice(3, size=100_000, p=[0.13, 0.74, 0.13]).astype(np.uint8)
    lengths = hf.code_lengths(np.bincount(sym, minlength=3))
    assert lengths.tolist() == [2, 1, 2]
    _, nbits = hf.encode(sym, lengths)
    assert math.isclose(nbits / sym.size, 1.26, abs_tol=0.01)


def test_hostile_tables_and_bodies_raise():
    sym = np.array([0, 1, 2, 1, 1, 0], dtype=np.uint8)
    lengths = hf.code_lengths(np.bincount(sym, minlength=3))
    data, nbits = hf.encode(sym, lengths)
    with pytest.raises(PayloadError, match="over-full"):
        hf.decode(data, 6, np.array([1, 1, 1]))
    with pytest.raises(PayloadError, match="longer than 15"):
        hf.decode(data, 6, np.array([16, 1, 2]))
    with pytest.raises(PayloadError, match="no symbols"):
        hf.decode(data, 6, np.array([0, 0, 0]))
    with pytest.raises(PayloadError, match="truncated"):
        hf.decode(data[:0], 6, lengths)
    with pytest.raises(PayloadError, match="truncated"):
        hf.decode(data, 60, lengths)  # asks for more symbols than the body holds
    # an incomplete code (one symbol, code '0'): a '1' bit is no code word
    with pytest.raises(PayloadError, match="invalid code"):
        hf.decode(np.array([0xFF], dtype=np.uint8), 3, np.array([1, 0, 0]))


@given(st.binary(max_size=64), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_random_bytes_never_crash(raw, n):
    data = np.frombuffer(raw, dtype=np.uint8)
    for lengths in (np.array([2, 1, 2]), np.array([3, 1, 2, 3]), np.array([1, 0, 0])):
        try:
            back, used = hf.decode(data, n, lengths)
        except PayloadError:
            continue
        assert back.size == n and used <= 8 * data.size and int(back.max(initial=0)) < 4


@given(st.integers(1, 256), st.integers(0, 40_000), st.integers(0, 2**32 - 1))
@settings(max_examples=30, deadline=None)
def test_symbol_counts_equal_bincount(levels, n, seed):
    sym = np.random.default_rng(seed).integers(0, levels, n).astype(np.uint8)
    assert np.array_equal(hf.symbol_counts(sym, levels), np.bincount(sym, minlength=levels))
    if levels < 256 and n:
        with pytest.raises(ValueError, match="below"):
            hf.symbol_counts(np.array([levels], dtype=np.uint8), levels)
