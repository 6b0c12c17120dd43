"""The compiled Elias coder of QSGD's sparse body (``kernels.elias_writer``): the same bytes as
the vectorized numpy writer it replaced, exact inversion, and rejection of corrupt bodies."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpress.errors import PayloadError
from gradpress.kernels import elias_reader as er
from gradpress.kernels import elias_writer as ek
from gradpress.kernels import fields


def reference_body(sym: np.ndarray, s: int, limit: int) -> np.ndarray | None:
    """The numpy writer the kernels replaced (``pack_chunks`` of the split Elias streams)."""
    nz = np.flatnonzero(sym != s)
    nnz = nz.size
    gaps = np.diff(nz, prepend=-1)
    signed = sym[nz].astype(np.int64) - s
    levels, neg = np.abs(signed), signed < 0
    lg = fields.floor_log2(gaps) if nnz else np.zeros(0, np.int64)
    ll = fields.floor_log2(levels) if nnz else np.zeros(0, np.int64)
    dl = fields._LOG2_LUT[lg + 1]
    g_bits, d_bits = 2 * int(lg.sum()) + nnz, int(lg.sum()) + 2 * int(dl.sum()) + nnz
    use_delta = d_bits < g_bits
    cost = 1 + fields.gamma_bits(np.array([nnz + 1])) + min(g_bits, d_bits) + 2 * int(ll.sum()) \
        + 2 * nnz
    if cost >= limit:
        return None
    head_v, head_w = fields.gamma_fields(np.array([nnz + 1]))
    pre = dl if use_delta else lg
    chunks = [(np.concatenate([[int(use_delta)], *head_v]), np.concatenate([[1], *head_w])),
              ((1 << (ll + 1)) | 1, pre + ll + 2)]
    if use_delta:
        chunks.append(((lg + 1) & ((1 << dl) - 1), dl))
    low = (gaps & ((1 << lg) - 1)) << ll | (levels & ((1 << ll) - 1))
    chunks.append(((low << 1) | neg, lg + ll + 1))
    return fields.pack_chunks(iter(chunks), cost)


def symbols(n: int, s: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sym = np.full(n, s, dtype=np.uint8)
    hit = rng.random(n) < density
    sym[hit] = rng.integers(0, 2 * s + 1, int(hit.sum()))
    return sym


def dequantized(sym: np.ndarray, s: int, inv: np.ndarray, b: int) -> np.ndarray:
    return (sym.astype(np.float32) - np.float32(s)) * np.repeat(inv, b)[:sym.size]


@given(st.integers(1, 3000), st.integers(1, 127), st.sampled_from([0.0, 0.002, 0.05, 0.3, 1.0]),
       st.integers(0, 2**32 - 1), st.booleans())
@settings(max_examples=150, deadline=None)
def test_kernel_bytes_equal_the_numpy_reference_writer(n, s, density, seed, tight):
    sym = symbols(n, s, density, seed)
    limit = n * (2 * s).bit_length() if tight else 1 << 40
    want = reference_body(sym, s, limit)
    got = ek.encode(sym, s, limit)
    assert (got is None) == (want is None)
    if want is not None:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("density", [0.0, 1e-4, 0.01, 0.14, 0.9])
def test_kernel_bytes_equal_the_reference_across_tiles_and_blocks(density):
    # several encoder tiles and decoder blocks; sparse inputs take the delta gap code
    n = 3 * ek.TILE + 13
    sym = symbols(n, 4, density, 7)
    got = ek.encode(sym, 4, 1 << 40)
    assert np.array_equal(got, reference_body(sym, 4, 1 << 40))
    inv = np.random.default_rng(1).random(-(-n // 100)).astype(np.float32)
    assert np.array_equal(er.decode(got, 0, n, 4, inv, 100), dequantized(sym, 4, inv, 100))


@given(st.integers(1, 5000), st.integers(1, 127), st.sampled_from([0.0, 0.001, 0.1, 0.6]),
       st.integers(0, 2**32 - 1), st.integers(0, 3))
@settings(max_examples=100, deadline=None)
def test_decode_inverts_encode(n, s, density, seed, lead):
    sym = symbols(n, s, density, seed)
    body = ek.encode(sym, s, 1 << 40)
    b = 1 + seed % 700
    inv = np.random.default_rng(seed).random(-(-n // b)).astype(np.float32)
    data = np.concatenate([np.full(lead, 0xA5, np.uint8), body])  # body after `lead` bytes
    assert np.array_equal(er.decode(data, 8 * lead, n, s, inv, b), dequantized(sym, s, inv, b))


def test_long_gaps_and_huge_levels_round_trip():
    n = 1 << 20
    sym = np.full(n, 127, dtype=np.uint8)
    sym[[0, 1, 5, 70_000, n - 1]] = [0, 254, 126, 128, 1]  # gaps up to 2^20, levels 1..127
    body = ek.encode(sym, 127, 1 << 40)
    inv = np.ones(1, dtype=np.float32)
    assert np.array_equal(er.decode(body, 0, n, 127, inv, n), dequantized(sym, 127, inv, n))


@pytest.mark.parametrize("density,delta", [(0.02, 1), (0.14, 0)])
def test_corrupt_multi_block_bodies_are_rejected_or_in_range(density, delta):
    """Bit flips, truncations and extensions of a body spanning several decoder blocks:
    PayloadError or a finite tensor of the declared size, never a crash."""
    n = int(2.5 * ek.BLOCK / density)
    s = 4
    sym = symbols(n, s, density, 3)
    body = ek.encode(sym, s, 1 << 40)
    assert body[0] >> 7 == delta  # the gap flag
    inv = np.ones(-(-n // 512), dtype=np.float32)
    rng = np.random.default_rng(0)
    bad = [body[:k] for k in rng.integers(0, body.size, 40)]
    bad += [np.concatenate([body, np.zeros(k, np.uint8)]) for k in (1, 9)]
    for _ in range(150):
        b = body.copy()
        for i in rng.integers(0, 8 * b.size, rng.integers(1, 5)):
            b[i >> 3] ^= np.uint8(1 << (i & 7))
        bad.append(b)
    bad.append(np.zeros_like(body))
    bad.append(np.full_like(body, 255))
    rejected = 0
    for b in bad:
        for numel in (n, n // 3):
            try:
                y = er.decode(b, 0, numel, s, inv, 512)
            except PayloadError:
                rejected += 1
                continue
            assert y.shape == (numel,) and np.isfinite(y).all()
    assert rejected > len(bad)  # almost every corruption is caught


def test_claimed_nonzeros_beyond_the_payload_are_rejected_before_allocating():
    # gap flag 0, then gamma(2^40 + 1): a trillion nonzeros claimed in 11 bytes
    body = np.frombuffer((((1 << 40) + 1) << 6).to_bytes(11, "big"), dtype=np.uint8)
    with pytest.raises(PayloadError, match="truncated"):
        er.decode(body, 0, 1 << 41, 4, np.ones(1, np.float32), 1 << 41)
