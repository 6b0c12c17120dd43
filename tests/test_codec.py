"""Bit codec: exact round trips and textbook code lengths."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradpress.codec import (
    BitReader,
    BitWriter,
    bit_length,
    delta_decode,
    delta_encode,
    delta_lengths,
    entropy_bits,
    gamma_decode,
    gamma_encode,
    gamma_lengths,
    omega_decode,
    omega_encode,
    omega_lengths,
    read_categorical,
    write_categorical,
)
from gradpress.errors import PayloadError

positive = st.lists(st.integers(1, 2**62), min_size=0, max_size=200)
CODES = [
    (gamma_encode, gamma_decode, gamma_lengths),
    (delta_encode, delta_decode, delta_lengths),
    (omega_encode, omega_decode, omega_lengths),
]


def _omega_len(n: int) -> int:
    bits = 1
    while n > 1:
        bits += n.bit_length()
        n = n.bit_length() - 1
    return bits


@settings(max_examples=60, deadline=None)
@given(positive)
def test_elias_codes_round_trip_exactly(values):
    v = np.array(values, dtype=np.uint64)
    for enc, dec, lens in CODES:
        bits = enc(v)
        assert bits.size == int(lens(v).sum())
        trailing = np.array([1, 0, 1], dtype=np.uint8)  # decoding must stop at the count
        out, used = dec(np.concatenate([bits, trailing]), v.size)
        assert used == bits.size
        np.testing.assert_array_equal(out, v)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2**62))
def test_elias_code_lengths_match_textbook_formulas(n):
    L = int(math.floor(math.log2(n))) if n < 2**50 else n.bit_length() - 1
    v = np.array([n], dtype=np.uint64)
    assert gamma_encode(v).size == 2 * L + 1
    assert delta_encode(v).size == L + 2 * (L + 1).bit_length() - 1
    assert omega_encode(v).size == _omega_len(n)


def test_gamma_code_words_are_the_textbook_ones():
    got = gamma_encode(np.array([1, 2, 3, 4, 9]))
    want = "1" + "010" + "011" + "00100" + "0001001"
    assert "".join(map(str, got)) == want


def test_omega_code_words_are_the_textbook_ones():
    # Elias 1975 table: 1 -> 0, 2 -> 10 0, 17 -> 10 100 10001 0
    assert "".join(map(str, omega_encode(np.array([1, 2, 17])))) == "0" + "100" + "10100100010"


@pytest.mark.parametrize("enc,dec,_", CODES)
def test_truncated_elias_stream_raises(enc, dec, _):
    bits = enc(np.array([5, 1000, 3], dtype=np.uint64))
    with pytest.raises(PayloadError):
        dec(bits[:-1], 3)
    with pytest.raises(PayloadError):
        dec(bits, 4)


@pytest.mark.parametrize("enc,dec,_", CODES)
def test_garbage_elias_stream_never_crashes(enc, dec, _):
    rng = np.random.default_rng(0)
    for _ in range(50):
        bits = rng.integers(0, 2, size=int(rng.integers(0, 300))).astype(np.uint8)
        try:
            vals, used = dec(bits, int(rng.integers(1, 20)))
        except PayloadError:
            continue
        assert used <= bits.size and (vals >= 1).all()


def test_elias_rejects_non_positive():
    with pytest.raises(ValueError):
        gamma_encode(np.array([0, 3]))


def test_bit_length_matches_python():
    v = np.array([0, 1, 2, 3, 255, 256, 2**40 + 1, 2**63], dtype=np.uint64)
    assert bit_length(v).tolist() == [int(x).bit_length() for x in v.tolist()]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2**40)), max_size=12))
def test_bitwriter_fixed_width_fields_round_trip(fields):
    w = BitWriter()
    for width, value in fields:
        w.write_uint(np.array([value % (1 << width)] * 3), width)
    data = w.getvalue()
    total = sum(3 * width for width, _ in fields)
    assert len(data) == (total + 7) // 8
    r = BitReader(data)
    for width, value in fields:
        assert r.read_uint(3, width).tolist() == [value % (1 << width)] * 3
    r.expect_end()


def test_bitwriter_mixes_aligned_and_unaligned_fields():
    w = BitWriter()
    w.write_uint(np.array([1]), 3)
    w.write_float32(np.array([1.5, -2.0], dtype=np.float32))
    w.write_uint(np.arange(5), 16)
    w.write_gamma(np.array([7, 1]))
    w.write_float16(np.array([0.25]))
    r = BitReader(w.getvalue())
    assert r.read_uint(1, 3).tolist() == [1]
    assert r.read_float32(2).tolist() == [1.5, -2.0]
    assert r.read_uint(5, 16).tolist() == list(range(5))
    assert r.read_gamma(2).tolist() == [7, 1]
    assert r.read_float16(1).tolist() == [0.25]
    r.expect_end()


def test_reader_past_end_raises_payload_error():
    r = BitReader(b"\x01")
    with pytest.raises(PayloadError, match="truncated"):
        r.read_uint(1, 16)


def test_extended_body_is_detected():
    w = BitWriter()
    w.write_uint(np.array([3]), 8)
    r = BitReader(w.getvalue() + b"\x00")
    r.read_uint(1, 8)
    with pytest.raises(PayloadError, match="extended"):
        r.expect_end()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=0, max_size=500), st.integers(7, 40))
def test_range_coder_round_trips(symbols, k):
    s = np.array(symbols, dtype=np.int64)
    w = BitWriter()
    write_categorical(w, s, k)
    r = BitReader(w.getvalue())
    np.testing.assert_array_equal(read_categorical(r, s.size), s)
    r.expect_end()


def test_range_coder_costs_about_the_entropy():
    rng = np.random.default_rng(0)
    s = rng.choice(4, size=50_000, p=[0.7, 0.2, 0.07, 0.03])
    w = BitWriter()
    write_categorical(w, s, 4)
    overhead = 8 * len(w.getvalue()) - entropy_bits(s, 4)
    assert 0 <= overhead < 200  # model (4 gamma counts) + coder flush + padding


def test_corrupted_range_coded_stream_raises():
    rng = np.random.default_rng(1)
    s = rng.choice(3, size=2000, p=[0.6, 0.3, 0.1])
    w = BitWriter()
    write_categorical(w, s, 3)
    data = bytearray(w.getvalue())
    data[-5] ^= 0xFF
    r = BitReader(bytes(data))
    try:
        out = read_categorical(r, s.size)
    except PayloadError:
        return
    assert out.min() >= 0 and out.max() < 3
