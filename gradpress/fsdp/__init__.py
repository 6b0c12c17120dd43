"""PyTorch FSDP2 integration: a compressed reduce-scatter for every FSDP unit.

    from torch.distributed.fsdp import fully_shard
    import gradpress.fsdp

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    comms = gradpress.fsdp.register(model, compressor=gradpress.get("qsgd", s=4))
    ...
    torch.save({name: c.state_dict() for name, c in comms.items()}, f"rs-rank{rank}.pt")
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule

from gradpress.compressors import Compressor
from gradpress.feedback import Feedback
from gradpress.fsdp.reduce_scatter import CallBytes, CompressedReduceScatter

__all__ = ["CallBytes", "CompressedReduceScatter", "register"]


def register(model: nn.Module, compressor: Compressor | str, feedback: Feedback | None = None,
             *, seed: int = 0, crc: bool = False) -> dict[str, CompressedReduceScatter]:
    """Set a :class:`CompressedReduceScatter` on every FSDP module of ``model`` (itself
    included) with :meth:`FSDPModule.set_custom_reduce_scatter`; return them by module name
    (``""`` for ``model``).

    Each unit gets a fresh feedback of the same kind and configuration as ``feedback``
    (``feedback`` itself keeps no state), keyed by the module's name. Worker feedback
    costs a float32 residual of the unit's full unsharded gradient on every rank; where
    memory is tight pass an unbiased compressor (``"qsgd"``, ``"natural_dithering"``) and
    ``feedback=None``. For an exact resume save every comm's ``state_dict()`` on every rank
    next to the model's and the optimizer's, and load them into the comms of the new run.
    """
    comms: dict[str, CompressedReduceScatter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        fb = None if feedback is None else type(feedback)(**feedback.config())
        comm = CompressedReduceScatter(compressor, fb, seed=seed, crc=crc, key=name)
        module.set_custom_reduce_scatter(comm)
        comms[name] = comm
    if not comms:
        raise ValueError("model has no FSDP modules: call fully_shard on it (and its units) "
                         "before gradpress.fsdp.register")
    return comms
