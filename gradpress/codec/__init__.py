"""Bit-level building blocks, no ML: fixed-width packing, Elias codes, entropy coding."""

from gradpress.codec.bits import BitReader, BitWriter, bits_to_uint, uint_to_bits, width_for
from gradpress.codec.elias import (
    bit_length,
    delta_decode,
    delta_encode,
    delta_lengths,
    gamma_decode,
    gamma_encode,
    gamma_lengths,
    omega_decode,
    omega_encode,
    omega_lengths,
)
from gradpress.codec.entropy import entropy_bits, read_categorical, write_categorical

__all__ = [
    "BitReader", "BitWriter", "bits_to_uint", "uint_to_bits", "width_for", "bit_length",
    "gamma_encode", "gamma_decode", "gamma_lengths", "delta_encode", "delta_decode",
    "delta_lengths", "omega_encode", "omega_decode", "omega_lengths", "entropy_bits",
    "read_categorical", "write_categorical",
]
