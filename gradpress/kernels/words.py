"""Machine-word operations for the compiled kernels, as LLVM intrinsics (numba has no
public count-leading-zeros, popcount or unaligned 8-byte load/store). Loads and stores are
unchecked: callers keep 8 bytes of slack after every index they pass."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def _clz(typingctx, x):
    """Leading zeros of a ``uint64`` (64 for 0), as ``int64``."""
    def codegen(context, builder, sig, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))
    return types.int64(types.uint64), codegen


@intrinsic
def _popcount(typingctx, x):
    """Set bits of a ``uint64``, as ``int64``."""
    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])
    return types.int64(types.uint64), codegen


def _word_ptr(context, builder, sig, args):
    data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
    return builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())


@intrinsic
def _load64(typingctx, arr, idx):
    """The 8 bytes from element ``idx`` of ``arr`` (unchecked) as a native ``uint64``."""
    def codegen(context, builder, sig, args):
        return builder.load(_word_ptr(context, builder, sig, args), align=1)
    return types.uint64(arr, types.int64), codegen


@intrinsic
def _store64(typingctx, arr, idx, v):
    """Write ``uint64`` ``v`` natively into the 8 bytes from element ``idx`` of ``arr``
    (unchecked)."""
    def codegen(context, builder, sig, args):
        builder.store(args[2], _word_ptr(context, builder, sig, args), align=1)
        return context.get_dummy_value()
    return types.void(arr, types.int64, types.uint64), codegen


@intrinsic
def _load_be64(typingctx, arr, idx):
    """Bytes ``arr[idx:idx+8]`` (uint8, unchecked) as a big-endian ``uint64``: the first
    byte in the top bits, so bit order is stream order."""
    def codegen(context, builder, sig, args):
        return builder.bswap(builder.load(_word_ptr(context, builder, sig, args), align=1))
    return types.uint64(arr, types.int64), codegen


@intrinsic
def _store_be64(typingctx, arr, idx, v):
    """Write ``uint64`` ``v`` big-endian into ``arr[idx:idx+8]`` (uint8, unchecked)."""
    def codegen(context, builder, sig, args):
        builder.store(builder.bswap(args[2]), _word_ptr(context, builder, sig, args), align=1)
        return context.get_dummy_value()
    return types.void(arr, types.int64, types.uint64), codegen
