"""The decoding parameters travel with the payload: a 2-byte digest of the compressor's
name, ``config()`` and the tensor's shape sits in every header (format version 2), so a
decoder configured differently from the encoder raises PayloadError instead of decoding
garbage; and the 2 bytes are counted in every size the library states."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import gradpress
from gradpress.errors import PayloadError
from gradpress.payload import Payload, config_digest, header_size

#: (encoder, decoder) pairs of one compressor that differ in a decoding parameter.
MISMATCHES = [
    (("qsgd", {"s": 4}), ("qsgd", {"s": 2})),
    (("qsgd", {"bucket_size": 512}), ("qsgd", {"bucket_size": 256})),
    (("qsgd", {"entropy": True}), ("qsgd", {"entropy": False})),
    (("ecq", {"s": 4}), ("ecq", {"s": 8})),
    (("ecq", {"norm": "linf"}), ("ecq", {"norm": "l2"})),
    (("terngrad", {"bucket_size": None}), ("terngrad", {"bucket_size": 64})),
    (("natural_dithering", {"s": 7}), ("natural_dithering", {"s": 3})),
    (("natural", {"exponent_range": True}), ("natural", {})),
    (("sign", {"bucket_size": 512}), ("sign", {"bucket_size": 128})),
    (("topk", {"ratio": 0.01}), ("topk", {"ratio": 0.02})),
    (("topk", {"values": "fp16"}), ("topk", {"values": "fp32"})),
    (("randk", {"ratio": 0.1}), ("randk", {"ratio": 0.05})),
    (("powersgd", {"rank": 2}), ("powersgd", {"rank": 1})),
    (("spherical", {"bits": 10}), ("spherical", {"bits": 8})),
    (("sparse_dithering", {"nu": 0.1}), ("sparse_dithering", {"nu": 0.2})),
    (("sparse_dithering_rand", {"omega": 0.25}), ("sparse_dithering_rand", {})),
]


@pytest.mark.parametrize("enc,dec", MISMATCHES, ids=lambda c: f"{c[0]}{c[1]}")
def test_decoding_with_another_config_raises_naming_both_configs(enc, dec):
    """Caught bug: a qsgd(s=4) payload read by qsgd(s=2) silently halves every value."""
    a, b = gradpress.get(enc[0], **enc[1]), gradpress.get(dec[0], **dec[1])
    assert a.config() != b.config()
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(2))
    raw = a.encode(x, seed=1).to_bytes()
    with pytest.raises(PayloadError, match="config digest") as err:
        b.decode(raw)
    msg = str(err.value)
    assert repr(b) in msg, msg  # names the decoder's config ...
    assert f"0x{a.config_digest((40, 30)):04x}" in msg  # ... the payload's digest ...
    # ... and the encoder's config, found among one-parameter changes of the decoder's
    named = f"{a.name}(" + ", ".join(f"{k}={v!r}" for k, v in a.config().items()) + ")"
    assert named in msg, msg
    a.decode(raw)  # the encoder's own config still reads it


def test_topk_payload_read_by_randk_raises():
    raw = gradpress.get("topk").encode(torch.randn(500)).to_bytes()
    with pytest.raises(PayloadError, match="compressor id"):
        gradpress.get("randk").decode(raw)


def test_digest_is_stable_and_a_pure_function_of_name_config_and_shape():
    """Pinned values: changing the digest's definition is a wire-format change."""
    assert config_digest("qsgd", {"s": 4, "bucket_size": 512}, (10,)) == config_digest(
        "qsgd", {"bucket_size": 512, "s": 4}, (10,))
    c = gradpress.get("qsgd", s=4)
    assert c.config_digest((100,)) == gradpress.get("qsgd", **c.config()).config_digest((100,))
    assert c.config_digest((100,)) != c.config_digest((10, 10))


def test_digest_collision_rate_is_about_two_to_the_minus_16():
    """Over a few thousand distinct (config, shape) pairs, the 16-bit digests collide at the
    birthday rate of a uniform 16-bit hash (pairs / 2^16), not more."""
    keys = [({"s": s, "bucket_size": b, "entropy": e}, (n,))
            for s, b, e, n in itertools.product(range(1, 17), (None, 64, 128, 256, 512, 1024),
                                                 (False, True), range(1, 31))]
    digests = [config_digest("qsgd", cfg, shape) for cfg, shape in keys]
    pairs = len(keys) * (len(keys) - 1) / 2
    expected = pairs / 2**16
    collisions = sum(v * (v - 1) // 2 for v in _counts(digests))
    assert collisions <= expected + 6 * math.sqrt(expected), (collisions, expected)


def _counts(values):
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out.values()


@pytest.mark.parametrize("name", gradpress.available())
def test_every_size_counts_the_digest(name):
    """header_size, expected_bits and max_payload_bytes all include the 2-byte digest: the
    1-D header is 18 bytes (14 + 4), 26 with a seed; and the measured size meets them."""
    assert header_size(1) == 18 and header_size(1, seed=True) == 26
    c = gradpress.get(name)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    p = c.encode(x, seed=4)
    raw = p.to_bytes()
    head = header_size(1, seed=c.shared_randomness)
    assert len(raw) == len(p) == head + len(p.body)
    assert Payload.from_bytes(raw).config_digest == c.config_digest((1000,))
    assert c.expected_bits(1000) - c.body_bits(1000) == 8 * head
    bound = c.max_payload_bytes(1000)
    if bound is not None:
        assert len(raw) <= bound
        assert bound >= head + c.body_len_bounds(1000)[0]
