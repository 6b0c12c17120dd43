"""The compressor zoo, one module per method named after its paper. Importing this package
registers every compressor."""

from gradpress.compressors import (
    casts,  # noqa: F401  (registers)
    ecq,  # noqa: F401  (registers)
    natural,  # noqa: F401  (registers)
    powersgd,  # noqa: F401  (registers)
    qsgd,  # noqa: F401  (registers)
    sign,  # noqa: F401  (registers)
    sparse_dithering,  # noqa: F401  (registers)
    sparsify,  # noqa: F401  (registers)
    spherical,  # noqa: F401  (registers)
    spherical_cap,  # noqa: F401  (registers)
    terngrad,  # noqa: F401  (registers)
)
from gradpress.compressors.base import Compressor, check_gradient, generator_for
from gradpress.compressors.registry import available, class_for_id, get, register

__all__ = ["Compressor", "available", "check_gradient", "class_for_id", "generator_for", "get",
           "register"]
