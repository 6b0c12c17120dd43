"""The uniform quantizer grid shared by QSGD, ECQ-SGD, TernGrad and natural dithering.

Per bucket ``v`` with scale ``M`` (its l2 or l-inf norm), gain ``a`` and offset ``c``, a
coordinate becomes the integer symbol ``floor(a v_i / M + c + r_i)`` (``r_i ~ U[0,1)``:
unbiased stochastic rounding onto the grid) and decodes as ``(sym - c) * M / a``. The body
is a mode byte, ``32`` bits of float32 scale per bucket, then the smallest of the dense
fixed-width code (``ceil(log2 levels)`` bits a symbol), a subclass's sparse code and the
entropy codes asked for: the range code (``entropy=True``/``"range"``), the per-payload
canonical Huffman code (``"huffman"``, for at most 16 levels) or both (``"best"``). Ties go
to the first of dense, sparse, Huffman, range. The paper modules (``qsgd.py``, ``ecq.py``,
``terngrad.py``, ``natural.py``) choose the grid.

Devices: the dense code is built and read with torch ops on the tensor's own device
(:mod:`gradpress.kernels.torch_codes`; on CPU with numba unless ``GRADPRESS_TORCH_CODES=1``),
the same bytes either way. The sparse, Huffman and range codes run on the host: a quantizer
configured to try them copies its symbols to the host once per call.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gradpress.codec import BitReader, BitWriter, huffman, read_categorical, write_categorical
from gradpress.codec.packing import pack_uint8
from gradpress.compressors.base import Compressor
from gradpress.errors import PayloadError
from gradpress.kernels import fused as fk
from gradpress.kernels import quantize as fc
from gradpress.kernels import torch_codes as tc
from gradpress.payload import header_size

DENSE, SPARSE, ENTROPY, HUFFMAN = 0, 1, 2, 3
ENTROPY_CODES = (False, "range", "huffman", "best")


def _entropy_code(entropy: bool | str) -> bool | str:
    """``False`` (fixed width), ``"range"`` (``True``), ``"huffman"`` or ``"best"`` (both,
    the smaller sent)."""
    code = "range" if entropy is True else entropy
    if code not in ENTROPY_CODES:
        raise ValueError(f"entropy must be False, True/'range', 'huffman' or 'best', "
                         f"got {entropy!r}")
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
    #: Whether the encoder tries a subclass's sparse code (``_sparse_body``) besides the dense.
    sparse: bool = False

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

    def _min_body_len(self, numel: int) -> int:
        """Every mode starts with the mode byte and a float32 scale per bucket; without a
        sparse or range mode, the symbols cost at least a bit per Huffman letter."""
        head = 1 + 4 * fc.n_buckets(numel, self.bucket_size)
        if self.entropy == "range" or type(self)._sparse_body is not UniformQuantizer._sparse_body:
            return head
        dense = math.ceil((8 * head + numel * self.width) / 8)
        if self.entropy != "huffman" or self.levels > huffman.MAX_SYMBOLS:
            return dense
        per, size = self._huffman_alphabet
        return min(dense, math.ceil((8 * head + 4 * size) / 8) + math.ceil(-(-numel // per) / 8))

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
        """The smallest of the dense code, the sparse code and the entropy codes asked for
        (ties: the first of dense, sparse, Huffman, range). Only a quantizer that tries a
        host-side code copies its symbols to the host."""
        n = sym.numel()
        best, size = None, (self._header_bits(n) + n * self.width + 7) // 8
        codes = []
        if self.sparse:
            codes.append(self._sparse_body)  # returns None unless smaller than the dense code
        if self.entropy in ("huffman", "best") and self.levels <= huffman.MAX_SYMBOLS:
            codes.append(self._huffman_body)
        if self.entropy in ("range", "best"):
            codes.append(self._range_body)
        sym_np = sym.cpu().numpy() if codes else None
        for code in codes:
            body = code(scale, sym_np)
            if body is not None and len(body) < size:
                best, size = body, len(body)
        return best if best is not None else self._dense_body(scale, sym)

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

    def _dense_body(self, scale: torch.Tensor, sym: torch.Tensor) -> bytes:
        """Mode byte, big-endian float32 scales, then ``width`` bits a symbol (MSB first);
        packed on ``sym``'s device by torch ops there (or forced on CPU), else by numba."""
        if tc.use_torch_codes(sym.device):
            mode = torch.full((1,), DENSE, dtype=torch.uint8, device=sym.device)
            return tc.to_host_bytes([mode, tc.float32_be(scale.to(sym.device)),
                                     tc.pack(sym, self.width)])
        # Packed straight into one buffer, one copy to bytes: the symbols come from our own
        # clamped rounding, so BitWriter's range scan and its two copies are not needed.
        head = 1 + 4 * scale.numel()
        out = np.empty(head + (sym.numel() * self.width + 7) // 8, dtype=np.uint8)
        out[0] = DENSE
        out[1:head] = scale.cpu().numpy().astype(">f4").view(np.uint8)
        pack_uint8(sym.numpy(), self.width, out=out[head:])
        return out.tobytes()

    def _sparse_body(self, scale: torch.Tensor, sym_np: np.ndarray) -> bytes | None:
        return None

    def _decode(self, body: bytes, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        r = BitReader(body)
        (mode,) = r.read_uint(1, 8)
        nb = fc.n_buckets(numel, self.bucket_size)
        scale = fc.read_scales(r.read_float32(nb))
        inv = torch.from_numpy((scale.astype(np.float64) / self.gain).astype(np.float32))
        if mode == DENSE and tc.use_torch_codes(device):
            return self._decode_dense_on(device, body, r, scale, numel)
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

    def _decode_dense_on(self, device: torch.device, body: bytes, r: BitReader,
                         scale: np.ndarray, numel: int) -> torch.Tensor:
        """The dense code unpacked and dequantized by torch ops on ``device``: the body goes
        to the device once; one scalar sync checks the symbols' range."""
        start = r.pos // 8  # mode byte and float32 scales: byte-aligned
        r.skip(numel * self.width)
        r.expect_end()
        data = tc.from_host_bytes(body, start, len(body) - start, device)
        sym = tc.unpack(data, numel, self.width)
        if self.levels < 1 << self.width and bool((sym >= self.levels).any()):
            raise PayloadError(f"{self.name} payload holds a symbol outside 0..{self.levels - 1}")
        return self._dequantize(torch.from_numpy(scale).to(device), sym)

    def _prepare_body(self, body: np.ndarray, numel: int):
        """The dense code's checked writer (``out_i (+)= (sym_i - c) M_j / gain``); other
        modes decode through :meth:`_decode`."""
        if body[0] != DENSE or type(self)._decode is not UniformQuantizer._decode or (
                type(self)._dequantize is not UniformQuantizer._dequantize):
            return None
        nb = fc.n_buckets(numel, self.bucket_size)
        off = 1 + 4 * nb
        if body.size != off + math.ceil(numel * self.width / 8):
            raise PayloadError(f"{self.name} dense body has {body.size} bytes, "
                               f"{numel} symbols need {off + math.ceil(numel * self.width / 8)}")
        scale = fc.read_scales(body[1:off].view(">f4"))
        top = fk._max_symbol(body, off, numel, self.width)
        if top == 256:
            raise PayloadError(f"{self.name} payload extended past its last field")
        if top >= self.levels:
            raise PayloadError(f"{self.name} payload holds a symbol outside 0..{self.levels - 1}")
        inv = (scale.astype(np.float64) / self.gain).astype(np.float32)
        b, c, w = self._bucket_len(numel), np.float32(self.offset), self.width
        return lambda out, add: fk._unpack_dequantize(body, off, numel, w, b, inv, c, add, out)

    def _dequantize(self, scale: torch.Tensor, sym: torch.Tensor) -> torch.Tensor:
        """Decoded values of symbols ``sym`` (``uint8``) under float32 bucket ``scale``:
        ``(sym - c) * (M / gain)``, the division in float64 then rounded to float32."""
        inv = (scale.double() / self.gain).float()
        return fc.affine_dequantize(sym, self.bucket_size, inv, self.offset)

    def _decode_sparse(self, body: bytes, pos: int, numel: int, inv: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
        raise PayloadError(f"{self.name} has no sparse mode")
