"""gradpress on ``torch.distributed``: variable-length payload all-gather and a DDP comm hook.

    from gradpress.dist import CompressionState, compression_hook
    state = CompressionState(None, compressor="ecq", compressor_kwargs={"bits": 2},
                             feedback=gradpress.ECQFeedback())
    ddp_model.register_comm_hook(state, compression_hook)

``gradpress.dist.flower`` (imported on its own) adapts compressors to Flower clients.
"""

from gradpress.dist.allgather import allgather_bytes
from gradpress.dist.hook import CompressionState, StepBytes, compression_hook, payload_bound

__all__ = ["CompressionState", "StepBytes", "allgather_bytes", "compression_hook",
           "payload_bound"]
