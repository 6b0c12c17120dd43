"""Byte collectives over ``torch.distributed``: variable-length payloads in fixed-size frames.
No DDP or FSDP specifics live here."""

from gradpress.collectives.allgather import allgather_bytes, allgather_bytes_async

__all__ = ["allgather_bytes", "allgather_bytes_async"]
