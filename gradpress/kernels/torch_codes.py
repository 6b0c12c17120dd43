"""Device-resident fixed-width codes: the dither hash, stochastic rounding, fixed-width
packing and sign bits in torch ops, so a CUDA tensor is quantized and packed on its own
device and only the finished body crosses to the host, once.

Every function here gives the bytes of the compiled CPU kernels (``kernels.quantize``,
``codec.packing``) bit for bit:

* **dither**: ``r_i = (mix(mix(i ^ k0) ^ k1) >> 8) * 2^-24`` with ``mix`` the lowbias32
  hash (``kernels.quantize._mix32``) and ``(k0, k1) = stream_keys(seed)``. The hash runs in
  ``int32`` tensors: a product wraps mod ``2^32`` (two's complement, the same low 32 bits
  as numba's ``uint32``) and a logical right shift is an arithmetic one masked to the
  bits that stay;
* **rounding**: ``u = x a_j + c`` (a float32 product, then a float32 sum, as the kernel),
  ``sym = clamp(trunc(u) + [r_i < u - trunc(u)], 0, levels - 1)`` as ``uint8``;
* **packing**: ``w``-bit fields (``w`` in 1..8) MSB first, back to back, the last byte
  zero-padded (``np.packbits`` order): 8 symbols make ``w`` bytes, one ``int64`` word each;
* **signs**: the 1-bit packing of ``x < 0``.

**Where it runs.** Tensors off the CPU always take this path for the dense fixed-width
code of sign, QSGD, ECQ, TernGrad and natural dithering. CPU tensors use the numba
kernels unless the environment variable ``GRADPRESS_TORCH_CODES=1`` is set (read at every
call, :func:`use_torch_codes`), which is how CI checks this path's bytes against the
kernels'. The body is assembled on the device (mode byte, big-endian float32 scales,
packed symbols) and copied to the host once as a ``uint8`` tensor, then to ``bytes``
(``Payload.body`` is ``bytes``; the collectives send host bytes). Scalar syncs per call:
the scale check (``check_scales``), the encoder's finiteness check (``check_gradient``),
and on decode one symbol-range check (only when ``levels < 2^w``) and the decoded-range
check (``check_decoded``).

**What stays on the host.** The variable-length codes: QSGD's Elias-coded sparse mode,
the Huffman and range codes (``entropy=...``), sparse dithering, spherical compression,
natural compression and the top-k/rand-k index codes. A compressor that may choose one of
them (``qsgd`` with ``sparse=True``, ``ecq`` with its default ``entropy="best"``) copies
its symbols to the host to size those codes; the dense code is still packed on device.

**Same bytes on every device** holds for the dither, the rounding and the packing given
the same float32 scales. Natural dithering and natural compression still round with
torch's generator (only natural dithering's packing is here), so their bytes differ
between devices. ``linf`` scales (maxima) are exact on every device; ``l2`` norms
and sign's mean ``|x|`` are sums, whose last bit follows the device's reduction order, so
a bucket whose norm rounds differently on another device quantizes differently.

Cost: about 30 integer ops per element for the dither; on CPU the work walks the tensor
in chunks of :func:`chunk_elements` so temporaries stay small.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

#: Environment variable that forces this path on CPU tensors (``1``: on).
ENV_VAR = "GRADPRESS_TORCH_CODES"

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32: the same low 32 bits of every product
_CPU_CHUNK = 1 << 17
_DEVICE_CHUNK = 1 << 22


def use_torch_codes(device: torch.device | str) -> bool:
    """Whether fixed-width codes on ``device`` use this module: always off the CPU; on the
    CPU when ``GRADPRESS_TORCH_CODES`` is set to anything but ``""``/``"0"``."""
    if torch.device(device).type != "cpu":
        return True
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def chunk_elements(device: torch.device) -> int:
    """Elements per work chunk: 2^17 on CPU (cache-sized temporaries), 2^22 elsewhere."""
    return _CPU_CHUNK if device.type == "cpu" else _DEVICE_CHUNK


def _i32(k: int) -> int:
    """A 32-bit pattern as the signed int32 with those bits."""
    k = int(k) & 0xFFFFFFFF
    return k - (1 << 32) if k >= 1 << 31 else k


def _xorshift_(h: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """``h ^= h >> s`` (logical shift of the 32-bit pattern), in place."""
    torch.bitwise_right_shift(h, s, out=tmp)
    h.bitwise_xor_(tmp.bitwise_and_((1 << (32 - s)) - 1))


def mix32_(h: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """lowbias32 of every ``int32`` entry of ``h``, in place (returns ``h``):
    ``h ^= h>>16; h *= 0x7FEB352D; h ^= h>>15; h *= 0x846CA68B; h ^= h>>16`` mod 2^32."""
    tmp = torch.empty_like(h) if tmp is None else tmp
    _xorshift_(h, 16, tmp)
    h.mul_(_M1)
    _xorshift_(h, 15, tmp)
    h.mul_(_M2)
    _xorshift_(h, 16, tmp)
    return h


def dither(n: int, k0: int, k1: int, offset: int = 0,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """``r_i = (mix(mix(i ^ k0) ^ k1) >> 8) * 2^-24`` for ``i = offset .. offset+n-1``
    (float32 in ``[0, 1)``, exactly the CPU kernel's ``_dither``)."""
    device = torch.device(device)
    h = torch.arange(n, dtype=torch.int32, device=device).add_(_i32(offset))
    tmp = torch.empty_like(h)
    h.bitwise_xor_(_i32(k0))
    mix32_(h, tmp)
    h.bitwise_xor_(_i32(k1))
    mix32_(h, tmp)
    torch.bitwise_right_shift(h, 8, out=tmp)
    return tmp.bitwise_and_(0xFFFFFF).to(torch.float32).mul_(2.0**-24)


def chunk_blocks(n: int, b: int, chunk: int):
    """``(start, bucket, rows, width)`` blocks of about ``chunk`` elements covering ``n``
    elements in buckets of ``b``: ``rows`` whole buckets of ``width = b``, the short last
    bucket alone, or pieces of one bucket longer than ``chunk``."""
    nfull, tail = divmod(n, b)
    if b <= chunk:
        per = chunk // b
        for j in range(0, nfull, per):
            yield j * b, j, min(per, nfull - j), b
        if tail:
            yield nfull * b, nfull, 1, tail
        return
    for j in range(nfull + (1 if tail else 0)):
        end = min(n, (j + 1) * b)
        for i in range(j * b, end, chunk):
            yield i, j, 1, min(chunk, end - i)


def quantize(flat: torch.Tensor, b: int, a: torch.Tensor, c: float, levels: int,
             k0: int, k1: int) -> torch.Tensor:
    """``uint8`` symbols ``clamp(floor(a_j x_i + c + r_i), 0, levels-1)`` with the hash
    dither ``r_i`` (:func:`dither`), on ``flat``'s device; equal to the CPU kernel's."""
    n = flat.numel()
    dev = flat.device
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    a = a.to(device=dev, dtype=torch.float32)
    for s0, j, rows, w in chunk_blocks(n, b, chunk_elements(dev)):
        k = rows * w
        u = flat[s0:s0 + k].view(rows, w) * a[j:j + rows, None]  # float32 product ...
        u.add_(c)  # ... then a float32 sum, as the kernel (no fused multiply-add)
        f = torch.trunc(u)  # u >= 0 up to rounding: truncation is the kernel's int32 cast
        up = dither(k, k0, k1, s0, dev).view(rows, w) < u.sub_(f)
        out[s0:s0 + k].copy_(f.add_(up).clamp_(0, levels - 1).view(-1))
    return out


def dequantize(sym: torch.Tensor, b: int, inv: torch.Tensor, c: float) -> torch.Tensor:
    """``(sym_i - c) * inv_j`` as float32 on ``sym``'s device (the CPU kernel's order)."""
    n = sym.numel()
    dev = sym.device
    out = torch.empty(n, dtype=torch.float32, device=dev)
    inv = inv.to(device=dev, dtype=torch.float32)
    for s0, j, rows, w in chunk_blocks(n, b, chunk_elements(dev)):
        k = rows * w
        o = out[s0:s0 + k].view(rows, w)
        o.copy_(sym[s0:s0 + k].view(rows, w)).sub_(c).mul_(inv[j:j + rows, None])
    return out


def _shifts(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offsets of the 8 fields in a ``8*width``-bit group and of its ``width`` bytes."""
    fields = torch.arange(7, -1, -1, device=device, dtype=torch.int64) * width
    nbytes = torch.arange(width - 1, -1, -1, device=device, dtype=torch.int64) * 8
    return fields, nbytes


def _check_width(width: int) -> None:
    if not isinstance(width, int) or not 1 <= width <= 8:
        raise ValueError(f"fixed-width codes take widths 1..8, got {width!r}")


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """Packed bytes (``uint8`` tensor on ``values``' device, ``ceil(n*width/8)`` of them)
    of ``values`` in ``width`` bits each, MSB first: ``codec.packing.pack_uint8``'s bytes.
    Values must fit in ``width`` bits (unchecked, as there)."""
    _check_width(width)
    v = values.reshape(-1)
    n = v.numel()
    dev = v.device
    nbytes = (n * width + 7) // 8
    if width == 8:
        return v.to(torch.uint8, copy=True)
    out = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    fields, byte_shifts = _shifts(width, dev)
    step = chunk_elements(dev) // 8 * 8
    for s0 in range(0, n, step):
        part = v[s0:s0 + step]
        k = part.numel()
        groups = -(-k // 8)
        acc = torch.zeros(groups * 8, dtype=torch.int64, device=dev)
        acc[:k].copy_(part)
        word = acc.view(groups, 8).bitwise_left_shift_(fields).sum(1)  # disjoint bits: OR
        byts = word[:, None].bitwise_right_shift(byte_shifts).bitwise_and_(255)
        o0 = s0 // 8 * width
        o1 = min(nbytes, o0 + groups * width)
        out[o0:o1].copy_(byts.view(-1)[:o1 - o0])
    return out


def unpack(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` values (``uint8``, on ``data``'s device) from at least
    ``ceil(n*width/8)`` packed bytes (extra bytes ignored)."""
    _check_width(width)
    nbytes = (n * width + 7) // 8
    d = data.reshape(-1)
    if d.numel() < nbytes:
        raise ValueError(f"{d.numel()} bytes cannot hold {n} fields of {width} bits")
    dev = d.device
    if width == 8:
        return d[:n].to(torch.uint8, copy=True)
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    fields, byte_shifts = _shifts(width, dev)
    mask = (1 << width) - 1
    step = chunk_elements(dev) // 8 * 8
    for s0 in range(0, n, step):
        k = min(step, n - s0)
        groups = -(-k // 8)
        b0 = s0 // 8 * width
        b1 = min(nbytes, b0 + groups * width)
        acc = torch.zeros(groups * width, dtype=torch.int64, device=dev)
        acc[:b1 - b0].copy_(d[b0:b1])
        word = acc.view(groups, width).bitwise_left_shift_(byte_shifts).sum(1)
        vals = word[:, None].bitwise_right_shift(fields).bitwise_and_(mask)
        out[s0:s0 + k].copy_(vals.view(-1)[:k])
    return out


def pack_signs(flat: torch.Tensor) -> torch.Tensor:
    """Packed bits of ``flat < 0`` (one per element, MSB first): ``np.packbits(flat < 0)``."""
    return pack(flat < 0, 1)


def float32_be(values: torch.Tensor) -> torch.Tensor:
    """Big-endian IEEE float32 bytes of ``values`` (``uint8``, on their device), as
    ``BitWriter.write_float32`` writes them."""
    v = values.reshape(-1).to(torch.float32).contiguous()
    native = v.view(torch.uint8).view(-1, 4)  # CUDA devices are little-endian, like x86/arm
    return native.flip(1).reshape(-1) if sys.byteorder == "little" else native.reshape(-1)


def to_host_bytes(parts: list[torch.Tensor]) -> bytes:
    """The ``uint8`` tensors in ``parts`` (on one device) as one ``bytes``: concatenated on
    the device, copied to the host once."""
    dev = parts[-1].device
    whole = torch.cat([p.to(dev) for p in parts])
    return whole.cpu().numpy().tobytes()


def from_host_bytes(body: bytes, start: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` bytes of ``body`` from ``start`` as a ``uint8`` tensor on ``device`` (one
    copy to a device; on the CPU a read-only view of ``body``, which nothing here writes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the buffer is read-only: we only read
        view = torch.frombuffer(body, dtype=torch.uint8, offset=start, count=count) if count \
            else torch.zeros(0, dtype=torch.uint8)
    return view.to(device)
