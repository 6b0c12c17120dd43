"""Uniform stochastic quantizers: QSGD / standard dithering and the ECQ-SGD quantizer.

**QSGD** (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017, Sec. 3). For each bucket
``v`` of ``n`` coordinates (the last bucket may be shorter) with ``s`` levels,

    Q_s(v_i) = ||v||_2 * sgn(v_i) * xi_i / s,   xi_i = l + Bernoulli(s|v_i|/||v|| - l),
    l = floor(s|v_i|/||v||),

which is unbiased with ``E||Q(v)-v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2`` (Lemma 3.1), so
``omega = min(n/s^2, sqrt(n)/s)`` with ``n = min(bucket_size, d)``. We round ``s v_i/||v||``
stochastically on the signed integer grid ``-s..s``; that has the same distribution.

Bits. A mode byte, ``32`` bits of float32 norm per bucket, then the cheaper of

* dense: the signed level ``s + sgn*xi`` in ``w = ceil(log2(2s+1))`` bits
  (``= 1 + ceil(log2(s+1))``: sign and level), ``d*w`` bits;
* sparse (QSGD's "Elias coding", Sec. 3.1/Thm 3.2): gap flag, ``nnz``, the gaps between
  nonzero positions in Elias gamma or delta (whichever is smaller), one sign bit and the
  level in Elias gamma per nonzero. Codes are written in split streams at exactly the
  textbook lengths, by compiled parallel kernels (layout in ``_elias_kernels``);
* with ``entropy=True`` (or ``"range"``), the dense symbols range-coded (``codec.entropy``);
* with ``entropy="huffman"``, the dense symbols in a canonical Huffman code fitted to this
  payload (``codec.huffman``): letters are pairs of symbols ``levels*a + b`` when
  ``levels <= 4`` (a trailing odd symbol paired with 0), single symbols otherwise; then
  ``4`` bits of code length per letter of the alphabet and ``sum count_k L_k`` bits,
  within one bit per letter of the empirical entropy. Much faster than range coding; for
  ``levels <= 16``.

``expected_bits`` uses the paper's Theorem 3.2 bound per bucket of ``n`` elements,
``(3 + 1.5 log2(2(s^2+n)/(s(s+sqrt n)))) * s(s+sqrt n)`` (the ``o(1)`` dropped), or the dense
size when that is smaller; it is a worst-case bound, so ``bits_rtol`` is wide (measured on
Gaussian vectors with the defaults ``s=4, bucket_size=512``: 29-42% under it; with ``s=7``,
25-50%).

**ECQ-SGD quantizer** (Wu, Huang, Huang, Zhang, ICML 2018, Sec. 3). Our reading: each bucket
``v`` is scaled by ``M = ||v||_inf`` (default) or ``||v||_2`` and quantized onto a codebook
of ``s`` uniformly spaced points ``{-M + 2Mk/(s-1)}_{k=0..s-1}`` spanning ``[-M, M]``, with
stochastic rounding to the two neighbouring points (unbiased). Bits: ``8 + 32*#buckets +
d*ceil(log2 s)``; with ``entropy=True``/``"huffman"`` the codes are range-/Huffman-coded when
that is smaller (a ternary ``s=3`` codebook on gradients, pairs Huffman-coded: ~1.13 bits
per coordinate). The
rounding variance is at most ``(M/(s-1))^2`` per coordinate and ``M <= ||v||_2``, so
``omega = n/(s-1)^2``. (The paper's text was not available offline while writing this; the
codebook and scaling follow its Sec. 3 description of uniformly distributed quantization
points with a per-bucket scaling factor.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter, huffman, read_categorical, write_categorical
from gradpress.compressors import _elias_kernels as ek
from gradpress.compressors import _fastcodes as fc
from gradpress.compressors.base import Compressor
from gradpress.compressors.registry import register
from gradpress.errors import PayloadError
from gradpress.payload import header_size

DENSE, SPARSE, ENTROPY, HUFFMAN = 0, 1, 2, 3
ENTROPY_CODES = (False, "range", "huffman")


def _entropy_code(entropy: bool | str) -> bool | str:
    """``False`` (fixed width), ``"range"`` (``True``) or ``"huffman"``."""
    code = "range" if entropy is True else entropy
    if code not in ENTROPY_CODES:
        raise ValueError(f"entropy must be False, True/'range' or 'huffman', got {entropy!r}")
    return code


def _check_bucket(bucket_size: int | None) -> int | None:
    if bucket_size is not None and (not isinstance(bucket_size, int) or bucket_size < 1):
        raise ValueError(f"bucket_size must be a positive int or None, got {bucket_size!r}")
    return bucket_size


class UniformQuantizer(Compressor):
    """Common machinery: per-bucket scale ``M``, symbols ``floor(a x + c + r)`` on a grid of
    ``levels`` points, dense / entropy-coded bodies. Subclasses define the grid."""

    unbiased = True
    norm: str = "l2"

    def __init__(self, bucket_size: int | None, entropy: bool | str) -> None:
        self.bucket_size = _check_bucket(bucket_size)
        self.entropy = _entropy_code(entropy)
        self.levels = 2
        if self.entropy:
            self.bits_rtol = 0.75  # range coding may save a lot; dense size is the ceiling

    # grid: a = gain / M, c = offset, decoded value (sym - c) * M / gain
    gain: float = 1.0
    offset: float = 0.0

    @property
    def width(self) -> int:
        return max(1, (self.levels - 1).bit_length())

    def _bucket_len(self, d: int) -> int:
        return min(self.bucket_size or d, d)

    def _header_bits(self, d: int) -> int:
        return 8 + 32 * fc.n_buckets(d, self.bucket_size)

    def body_bits(self, d: int) -> float:
        return float(self._header_bits(d) + d * self.width)

    def max_payload_bytes(self, numel: int) -> int:
        """The encoder sends the smallest of its codes, so the dense code is the ceiling."""
        return header_size(1) + math.ceil(UniformQuantizer.body_bits(self, numel) / 8)

    def _quantize(self, flat: torch.Tensor, gen: torch.Generator, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return fc.scaled_quantize(flat, self.bucket_size, self.norm, self.gain, self.offset,
                                  self.levels, seed, gen)

    def _encode(self, flat: torch.Tensor, gen: torch.Generator, seed: int) -> bytes:
        return self._body(*self._quantize(flat, gen, seed))

    def _encode_decoded(self, flat: torch.Tensor, gen: torch.Generator, seed: int
                        ) -> tuple[bytes, torch.Tensor]:
        """Body bytes and :meth:`_dequantize` of the symbols, as the decoder computes it
        from the float32 scales on the wire: the same floats, so the same tensor."""
        scale, sym = self._quantize(flat, gen, seed)
        return self._body(scale, sym), self._dequantize(scale, sym)

    def _body(self, scale: torch.Tensor, sym: torch.Tensor) -> bytes:
        sym_np = sym.cpu().numpy()
        best = self._sparse_body(scale, sym_np)  # None unless smaller than the dense code
        if self.entropy:
            coded = (self._huffman_body(scale, sym_np) if self.entropy == "huffman"
                     else self._range_body(scale, sym_np))
            dense_len = (self._header_bits(sym_np.size) + sym_np.size * self.width + 7) // 8
            if len(coded) < min(dense_len, len(best) if best is not None else dense_len):
                best = coded
        return best if best is not None else self._dense_body(scale, sym_np)

    def _range_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes:
        w = self._start(ENTROPY, scale)
        write_categorical(w, sym_np, self.levels)
        return w.getvalue()

    @property
    def _huffman_alphabet(self) -> tuple[int, int]:
        """(symbols per Huffman letter, alphabet size): pairs ``levels*a + b`` when they fit
        in 16 letters (ternary: 9), single symbols otherwise."""
        if self.levels ** 2 <= huffman.MAX_SYMBOLS:
            return 2, self.levels ** 2
        return 1, self.levels

    def _huffman_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes:
        per, size = self._huffman_alphabet
        letters = sym_np
        if per == 2:  # a trailing odd symbol is paired with 0
            letters = np.zeros((sym_np.size + 1) // 2, dtype=np.uint8)
            letters += sym_np[0::2] * np.uint8(self.levels)
            letters[:sym_np.size // 2] += sym_np[1::2]
        lengths = huffman.code_lengths(huffman.symbol_counts(letters, size))
        w = self._start(HUFFMAN, scale)
        w.write_uint(lengths, 4)
        data, nbits = huffman.encode(letters, lengths)
        w.align()
        w.write_bytes(data)
        return w.getvalue()

    def _start(self, mode: int, scale: torch.Tensor) -> BitWriter:
        w = BitWriter()
        w.write_uint(mode, 8)
        w.write_float32(scale.cpu().numpy())
        return w

    def _dense_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes:
        w = self._start(DENSE, scale)
        w.write_uint(sym_np, self.width)
        return w.getvalue()

    def _sparse_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes | None:
        return None

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        r = BitReader(body)
        (mode,) = r.read_uint(1, 8)
        nb = fc.n_buckets(numel, self.bucket_size)
        scale = fc.read_scales(r.read_float32(nb))
        inv = torch.from_numpy((scale.astype(np.float64) / self.gain).astype(np.float32))
        if mode == DENSE:
            sym_np = r.read_uint8(numel, self.width)
            r.expect_end()
        elif mode == ENTROPY:
            coded = read_categorical(r, numel)
            r.expect_end()
            if coded.size and int(coded.max()) >= self.levels:
                raise PayloadError(f"{self.name} payload holds a symbol outside "
                                   f"0..{self.levels - 1}")
            sym_np = coded.astype(np.uint8)
        elif mode == HUFFMAN and self.levels <= huffman.MAX_SYMBOLS:
            per, size = self._huffman_alphabet
            lengths = r.read_uint(size, 4)
            r.align()
            rest = r.read_bytes(r.remaining // 8)
            letters, used = huffman.decode(rest, -(-numel // per), lengths)
            if (used + 7) // 8 != rest.size or (used % 8 and int(rest[-1]) & (0xFF >> used % 8)):
                raise PayloadError(f"{self.name} payload extended past its Huffman body")
            sym_np = letters
            if per == 2:
                sym_np = np.empty(2 * letters.size, dtype=np.uint8)
                np.divmod(letters, np.uint8(self.levels), out=(sym_np[0::2], sym_np[1::2]))
                if numel % 2 and sym_np[-1]:
                    raise PayloadError(f"{self.name} payload pads its last pair with a "
                                       "non-zero symbol")
                sym_np = sym_np[:numel]
        elif mode == SPARSE:
            return self._decode_sparse(body, r.pos, numel, inv.to(device), device)
        else:
            raise PayloadError(f"{self.name} payload has unknown mode {int(mode)}")
        if sym_np.size and int(sym_np.max()) >= self.levels:
            raise PayloadError(f"{self.name} payload holds a symbol outside 0..{self.levels - 1}")
        return self._dequantize(torch.from_numpy(scale).to(device),
                                torch.from_numpy(sym_np).to(device))

    def _dequantize(self, scale: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
        """Decoded values of symbols ``sym`` (``uint8``) under float32 bucket ``scale``:
        ``(sym - c) * (M / gain)``, the division in float64 then rounded to float32."""
        inv = (scale.double() / self.gain).float()
        return fc.affine_dequantize(sym, self.bucket_size, inv, self.offset)

    def _decode_sparse(self, body: bytes, pos: int, numel: int, inv: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
        raise PayloadError(f"{self.name} has no sparse mode")


@register
class QSGD(UniformQuantizer):
    """QSGD / standard dithering with ``s`` levels per bucket, l2 norm (Alistarh et al. 2017).

    Picks per payload the smallest of the dense fixed-width code, QSGD's Elias-coded sparse
    code and (``entropy=True``) range coding; ``omega = min(n/s^2, sqrt(n)/s)``.
    """

    name = "qsgd"
    compressor_id = 10
    bits_rtol = 0.6  # expected_bits is Thm 3.2's worst case; Gaussians land 25-50% under it
    norm = "l2"

    def __init__(self, s: int = 4, bucket_size: int | None = 512, entropy: bool = False,
                 sparse: bool = True):
        if not isinstance(s, int) or not 1 <= s <= 127:
            raise ValueError(f"qsgd needs an integer number of levels s in 1..127, got {s!r}")
        super().__init__(bucket_size, entropy)
        self.s = s
        self.sparse = bool(sparse)
        self.levels = 2 * s + 1
        self.gain = float(s)
        self.offset = float(s)

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "bucket_size": self.bucket_size, "entropy": self.entropy,
                "sparse": self.sparse}

    def omega(self, d: int) -> float:
        n = self._bucket_len(d)
        return min(n / self.s**2, math.sqrt(n) / self.s)

    def sparse_bound_bits(self, n: int) -> float:
        """QSGD Theorem 3.2: expected bits of the Elias code of one bucket of ``n`` (without
        its 32-bit norm), ``(3 + 1.5 log2(2(s^2+n)/(s(s+sqrt n)))) s(s+sqrt n)``."""
        s = self.s
        k = s * (s + math.sqrt(n))
        return (3 + 1.5 * math.log2(2 * (s * s + n) / k)) * k

    def body_bits(self, d: int) -> float:
        if d == 0:
            return 0.0
        b = self._bucket_len(d)
        nfull, tail = divmod(d, b)
        sparse = nfull * self.sparse_bound_bits(b) + (self.sparse_bound_bits(tail) if tail
                                                      else 0.0)
        return float(self._header_bits(d) + min(d * self.width, sparse))

    def _sparse_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes | None:
        if not self.sparse:
            return None
        # Compiled split-stream Elias code (layout in ``_elias_kernels``); None unless it is
        # smaller than the dense code.
        packed = ek.encode(sym_np, self.s, sym_np.size * self.width)
        if packed is None:
            return None
        w = self._start(SPARSE, scale)
        w.write_bytes(packed)
        return w.getvalue()

    def _decode_sparse(self, body: bytes, pos: int, numel: int, inv: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
        data = np.frombuffer(body, dtype=np.uint8)
        out = ek.decode(data, pos, numel, self.s, inv.cpu().numpy(), self._bucket_len(numel))
        return torch.from_numpy(out).to(device)


@register
class ECQ(UniformQuantizer):
    """ECQ-SGD's quantizer (Wu et al. 2018): ``s`` uniform codebook points in ``[-M, M]`` per
    bucket, ``M`` the bucket's l-inf (default) or l2 norm; unbiased, ``omega = n/(s-1)^2``."""

    name = "ecq"
    compressor_id = 11

    def __init__(self, bits: int | None = None, s: int | None = None,
                 bucket_size: int | None = 512, norm: str = "linf", entropy: bool = False):
        if bits is None and s is None:
            bits = 2
        if bits is not None:
            if not isinstance(bits, int) or not 1 <= bits <= 8:
                raise ValueError(f"ecq bits must be in 1..8, got {bits!r}")
            if s is not None and s != 1 << bits:
                raise ValueError(f"ecq got bits={bits} and s={s}; give one of them")
            s = 1 << bits
        if not isinstance(s, int) or not 2 <= s <= 256:
            raise ValueError(f"ecq needs s in 2..256 codebook points, got {s!r}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"ecq norm must be 'linf' or 'l2', got {norm!r}")
        super().__init__(bucket_size, entropy)
        self.s = s
        self.norm = norm
        self.levels = s
        self.gain = (s - 1) / 2.0
        self.offset = (s - 1) / 2.0

    def config(self) -> dict[str, Any]:
        return {"s": self.s, "bucket_size": self.bucket_size, "norm": self.norm,
                "entropy": self.entropy}

    def omega(self, d: int) -> float:
        return self._bucket_len(d) / (self.s - 1) ** 2

    def codebook(self, scale: float = 1.0) -> np.ndarray:
        """The ``s`` codebook points for a bucket of scale ``M = scale``."""
        return scale * (-1.0 + 2.0 * np.arange(self.s) / (self.s - 1))
