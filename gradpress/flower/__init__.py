"""Federated learning with Flower: compressed client updates decoded inside a Strategy.

Albasyoni, Safaryan, Condat and Richtarik (2020, "Optimal Gradient Compression for
Distributed and Federated Learning", arXiv 2010.03246) target the federated uplink, where
each client's model update is the message. One round of FedAvg (McMahan et al. 2017) with
gradpress on the uplink:

1. The server broadcasts the global weights ``w`` (a flat float32 vector, Flower
   ``ArrayRecord``) and the compressor's name and arguments (``ConfigRecord``).
2. Client ``i`` trains ``E`` local epochs of SGD on its data from ``w`` and forms the update
   ``delta_i = w_i - w``.
3. Optional client error feedback (``ef``: classic EF, ``ecq``: ECQ-SGD's
   ``delta + alpha h``): ``v_i = fb.to_send(delta_i)``; ``payload = C.encode(v_i, seed)``
   with a CRC32 in the header; ``fb.commit(delta_i, C(v_i))``. The feedback state lives in
   Flower's ``context.state`` so it survives between rounds on any simulation actor.
4. The payload's bytes travel as a ``uint8`` array in the reply's ``ArrayRecord``.
5. The server strategy (:class:`CompressedFedAvg`, a subclass of Flower's message-API
   ``FedAvg``) parses each payload (CRC checked; a corrupt one raises a
   :class:`~gradpress.errors.PayloadError` naming the client), decodes it, and sets
   ``w <- w + server_lr * sum_i n_i C(v_i) / sum_i n_i``.

Bits: the uplink of a round is ``sum_i len(payload_i.to_bytes())``, counted on the server
from the bytes it received; Flower's own framing (the numpy array header in its
``ArrayRecord``) is reported separately. The downlink is the uncompressed fp32 model.

The data, model and local training below are plain functions, so :func:`run_local` runs
the same algorithm without Flower (an in-repo loop used when ``flwr`` is not installed).
"""

from gradpress.flower.client import (
    FEEDBACKS,
    encode_update,
    make_client_app,
    make_feedback,
    round_seed,
)
from gradpress.flower.compat import FLWR_MISSING, HAVE_FLWR
from gradpress.flower.run import run_flower, run_local
from gradpress.flower.strategy import CompressedFedAvg, decode_update
from gradpress.flower.task import (
    FederatedData,
    digits_partitions,
    evaluate,
    init_params,
    local_train,
    num_params,
)

__all__ = [
    "FEEDBACKS", "FLWR_MISSING", "HAVE_FLWR", "CompressedFedAvg", "FederatedData",
    "decode_update", "digits_partitions", "encode_update", "evaluate", "init_params",
    "local_train", "make_client_app", "make_feedback", "num_params", "round_seed",
    "run_flower", "run_local",
]
