"""gradpress: gradient compression to real bit streams, with bounds and error compensation.

Implements ECQ-SGD (Wu et al., ICML 2018) and the optimal compressors of Albasyoni,
Safaryan, Condat and Richtarik (2020). Quick start::

    import gradpress
    c = gradpress.get("qsgd", s=4)
    payload = c.encode(grad, seed=0)      # real bytes: len(payload.to_bytes())
    approx = c.decode(payload)

Allocation-free, into buffers allocated once (the DDP hook's path)::

    buf = torch.empty(c.max_payload_bytes(grad.numel()), dtype=torch.uint8)
    view = c.encode_into(buf, grad, seed=0)   # a PayloadView: len(view) real bytes
    c.decode_into(out, view, add=True)        # out += C(grad), no new tensor
"""

from gradpress.collectives import allgather_bytes
from gradpress.compressors import Compressor, available, get, register
from gradpress.ddp import CompressionState, compression_hook
from gradpress.errors import GradpressError, NonFiniteGradientError, PayloadError, PeerError
from gradpress.feedback import EF21, ECQFeedback, ErrorFeedback, Feedback, NoFeedback
from gradpress.payload import Payload, PayloadView

__version__ = "0.1.0"

__all__ = [
    "Compressor", "GradpressError", "NonFiniteGradientError", "Payload", "PayloadError",
    "PayloadView",
    "PeerError", "available", "get", "register",
    "EF21", "ECQFeedback", "ErrorFeedback", "Feedback", "NoFeedback",
    "CompressionState", "allgather_bytes", "compression_hook",
]
