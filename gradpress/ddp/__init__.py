"""PyTorch DDP integration: a comm hook that sends gradpress payloads.

    from gradpress.ddp import CompressionState, compression_hook
    state = CompressionState(None, compressor="ecq",
                             compressor_kwargs={"bits": 2, "norm": "linf", "bucket_size": 512},
                             feedback=gradpress.ECQFeedback())
    ddp_model.register_comm_hook(state, compression_hook)
"""

from gradpress.ddp.hook import compression_hook
from gradpress.ddp.state import CompressionState, StepBytes, payload_bound

__all__ = ["CompressionState", "StepBytes", "compression_hook", "payload_bound"]
