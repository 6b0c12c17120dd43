"""Hostile bytes: every decoder raises PayloadError wherever the format can see the fault.

Detectable, so ``PayloadError`` is demanded (no "finite tensor" escape):

* a truncated body (every cut point for bodies up to 600 bytes, a dense sample beyond),
  for every compressor and its variable-length variants;
* bytes past the end of the body;
* a header whose shape lies (more or fewer elements than the body holds), including
  ``2^30`` elements over a few bytes, which must be rejected before anything is allocated
  (before the compressor's ``_decode`` runs, with no 4 GiB output in the process's RSS):
  the header's config digest covers the shape; a header forged with a matching digest is
  still rejected wherever the body's length shows the lie (``body_len_bounds``: exact for
  fixed-length codes, a floor of a scale per bucket / the k values for the others);
* a payload decoded by the same compressor configured differently (the config digest).

Undetectable without the optional CRC32, so "PayloadError or a finite tensor of the
declared shape" is all a test can ask of a bit flip inside a body of the right length:

* ``fp32``/``fp16``/``bf16``: every finite bit pattern is a valid value (a flip into an
  Inf/NaN pattern is caught);
* the scaled quantizers (``qsgd``, ``ecq``, ``terngrad``, ``natural_dithering``,
  ``sign``): flips in a bucket's float32 scale or in the fixed-width level codes;
  ``natural``: sign/exponent fields (any exponent within the range is valid);
* ``topk``/``randk``: value bits, and index bits that stay in range and increasing;
  ``randk``'s indices are not sent at all (shared seed);
* ``powersgd``: the float32 factors; ``spherical``: block directions and magnitudes;
  ``spherical_cap`` (small d): the norm and the low bits of the index (any ``T <= T_max``
  is a valid point);
* ``sparse_dithering``(``_rand``) and entropy-coded variants: flips that still parse as
  a valid code of the right length.
"""

from __future__ import annotations

import dataclasses
import resource

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradpress
from gradpress.errors import PayloadError
from gradpress.payload import Payload

NAMES = gradpress.available()
SHAPE = (20, 10)
#: Every registered compressor at its defaults, plus the variable-length variants.
CASES = [(n, {}) for n in NAMES] + [
    ("qsgd", {"entropy": True}), ("qsgd", {"entropy": True, "sparse": False}),
    ("qsgd", {"bucket_size": None}), ("terngrad", {"entropy": "huffman"}),
    ("ecq", {"entropy": "huffman", "s": 3, "bucket_size": 512}),
    ("natural", {"exponent_range": True}),
    ("sparse_dithering", {"entropy": True}), ("sparse_dithering_rand", {"entropy": True}),
    ("topk", {"values": "fp16"}), ("randk", {"ratio": 0.1})]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw in CASES]


def _valid(name: str, kw: dict | None = None, shape=SHAPE) -> Payload:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return gradpress.get(name, **(kw or {})).encode(x, seed=9)


def _decode_or_reject(name: str, p: Payload, shape=SHAPE, kw: dict | None = None) -> None:
    try:
        y = gradpress.get(name, **(kw or {})).decode(Payload.from_bytes(p.to_bytes()))
    except PayloadError:
        return
    assert y.shape == torch.Size(shape)
    assert bool(torch.isfinite(y).all()), "decoded a non-finite tensor from corrupt bytes"


def _must_reject(name: str, kw: dict, p: Payload, what: str) -> None:
    c = gradpress.get(name, **kw)
    try:
        y = c.decode(Payload.from_bytes(p.to_bytes()))
    except PayloadError:
        return
    pytest.fail(f"{name}{kw}: {what} decoded to a {tuple(y.shape)} tensor instead of "
                "raising PayloadError")


def _with_body(p: Payload, body: bytes, shape=None) -> Payload:
    return dataclasses.replace(p, body=body, shape=shape or p.shape)


def _cut_points(n: int) -> list[int]:
    """Every length below ``n`` for short bodies; for long ones the first and last 128 and
    about 300 evenly spread between."""
    if n <= 600:
        return list(range(n))
    return sorted(set(range(128)) | set(range(n - 128, n)) | set(range(0, n, n // 300)))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_every_truncated_body_raises(name, kw):
    for shape in (SHAPE, (3000,)):
        p = _valid(name, kw, shape)
        for n in _cut_points(len(p.body)):
            _must_reject(name, kw, _with_body(p, p.body[:n]),
                         f"a {shape} body cut to {n} of {len(p.body)} bytes")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("extra", [b"\x00", b"\xff" * 3, b"\x00" * 64])
def test_extended_body_raises(name, kw, extra):
    p = _valid(name, kw)
    _must_reject(name, kw, _with_body(p, p.body + extra), f"{len(extra)} bytes past the end")


LIES = [(1,), (199,), (201,), (2000,), (3, 7, 11), (20, 11)]
#: Codes whose bodies can be a few bytes for any element count (one unbounded bucket, range-
#: coded gains or levels): only the header's digest sees a forged 2^30-element shape.
#: Codes whose valid body can be a few bytes for any element count (one scale for the whole
#: tensor and a sparse or entropy code): only the digest guards their shape. ``ecq``'s
#: default (the paper's: ``bucket_size=None``, the smallest of its codes) is one of them.
NO_LENGTH_FLOOR = {"qsgd-bucket_size=None", "spherical", "sparse_dithering-entropy=True",
                   "sparse_dithering_rand-entropy=True", "ecq",
                   "spherical_cap"}  # blockwise above d = 13, like spherical


def _forged(c: gradpress.Compressor, p: Payload, shape) -> Payload:
    """``p``'s body under ``shape`` with the config digest recomputed for that shape: a
    header that lies consistently, which only the body's length can expose."""
    return dataclasses.replace(p, shape=shape, config_digest=c.config_digest(shape))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("shape", LIES)
def test_body_under_a_lying_shape_raises(name, kw, shape):
    """An altered shape field: the header's digest (over config and shape) catches it."""
    p = _valid(name, kw)
    _must_reject(name, kw, _with_body(p, p.body, shape), f"a {SHAPE} body under shape {shape}")


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("shape", LIES)
def test_forged_shape_raises_wherever_the_body_length_shows_it(name, kw, shape, monkeypatch):
    """A consistently forged header: a body whose length no payload of that many elements
    has is rejected before ``_decode``; fixed-length codes reject every lie that changes
    their byte count. The rest may decode to a finite tensor: a sparse code whose indices
    fit under both shapes, or one element more or less hiding in a sub-byte code's padding
    (``sign``, ``terngrad``, ``ecq``: 199 vs 200 symbols of 1-2 bits fill the same bytes)."""
    c = gradpress.get(name, **kw)
    p = _valid(name, kw)
    n = 1
    for s in shape:
        n *= s
    lo, hi = (c.body_len_bounds(n) if name != "powersgd"
              else (len(c.encode(torch.zeros(shape)).body),) * 2)
    if c.bits_rtol == 0 and shape in ((1,), (2000,)):
        assert not lo <= len(p.body) <= hi, f"{name}: fixed-length bounds admit shape {shape}"
    if lo <= len(p.body) <= (hi if hi is not None else len(p.body)):
        _decode_or_reject(name, _forged(c, p, shape), shape, kw)
        return
    monkeypatch.setattr(c, "_decode", lambda *a, **k: pytest.fail(f"{name} entered _decode"))
    with pytest.raises(PayloadError, match="truncated, extended, or a lying shape"):
        c.decode(Payload.from_bytes(_forged(c, p, shape).to_bytes()))


@pytest.mark.parametrize("forge", [False, True], ids=["as-sent", "forged"])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_huge_declared_shape_over_a_tiny_body_raises_before_allocating(name, kw, forge,
                                                                       monkeypatch):
    c = gradpress.get(name, **kw)
    p = _valid(name, kw)
    shape = (1 << 15, 1 << 15) if name == "powersgd" else (1 << 30,)
    lying = _forged(c, p, shape) if forge else _with_body(p, p.body, shape)
    if forge and f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}".rstrip("-") in (
            NO_LENGTH_FLOOR):
        assert c.body_len_bounds(1 << 30)[0] <= len(p.body)  # the documented gap
        return

    def _no_decode(*args, **kwargs):
        raise AssertionError(f"{name} entered _decode for a 2^30-element header over "
                             f"{len(p.body)} bytes")

    monkeypatch.setattr(c, "_decode", _no_decode)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(PayloadError):
        c.decode(Payload.from_bytes(lying.to_bytes()))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown_mib < 512, f"{name} touched {grown_mib:.0f} MiB before rejecting"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_bit_flipped_body_is_rejected_or_finite(name, data):
    """Flips inside a body of the right length: see the module docstring for the fields
    no check can see, where a finite tensor of the declared shape is the honest outcome."""
    p = _valid(name)
    if not p.body:
        return
    body = bytearray(p.body)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 8 * len(body) - 1))
        body[i // 8] ^= 1 << (i % 8)
    _decode_or_reject(name, _with_body(p, bytes(body)))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=600))
def test_random_body_is_rejected_or_finite(name, body):
    _decode_or_reject(name, _with_body(_valid(name), body))


def test_no_pickle_or_eval_on_the_wire_path():
    import pathlib

    root = pathlib.Path(gradpress.__file__).parent
    for f in list((root / "codec").glob("*.py")) + list((root / "compressors").glob("*.py")) + [
            root / "payload.py"]:
        text = f.read_text()
        for banned in ("pickle", "eval(", "exec(", "torch.load"):
            assert banned not in text, f"{banned} in {f.name}"
