"""Federated learning with Flower: a client mod and a strategy, added to any Flower app.

Albasyoni, Safaryan, Condat and Richtarik (2020, "Optimal Gradient Compression for
Distributed and Federated Learning", arXiv 2010.03246) target the federated uplink, where
each client's model update is the message. Two lines put gradpress on it::

    app = ClientApp(mods=[compression_mod(gradpress.get("qsgd", s=4), feedback="ef")])
    strategy = CompressedFedAvg(gradpress.get("qsgd", s=4), fraction_train=0.5)

One round of FedAvg (McMahan et al. 2017) with them:

1. The server broadcasts the global arrays ``w`` (any ``ArrayRecord``: a flat vector or a
   torch ``state_dict``), uncompressed, as Flower's ``FedAvg`` does.
2. The client's app, unchanged, trains from ``w`` and replies with its arrays ``w'``.
3. :func:`compression_mod` (:mod:`~gradpress.flower.mod`) turns each float array's update
   ``w'_k - w_k`` into a gradpress payload (optional error feedback ``ef``/``ecq``, its
   state in Flower's ``context.state``, so it survives between rounds on any actor) and
   sends the payload bytes as ``uint8`` arrays under :data:`UPDATE_KEY`.
4. :class:`CompressedFedAvg` (:mod:`~gradpress.flower.strategy`, a subclass of Flower's
   message-API ``FedAvg``) reads every reply as untrusted input: ``num-examples`` a
   positive int under a cap, payload headers checked against the model's shapes and dtypes
   before anything is decoded; a bad reply is dropped with a log line naming the client.
   It then sets ``w_k <- w_k + server_lr * sum_i n_i C_i,k / sum_i n_i``.

Bits: the uplink of a round is ``sum len(payload)`` the server received; Flower's own
framing (the ``.npy`` header of each array) is reported apart. The downlink is Flower's
uncompressed model.

The demo (:mod:`~gradpress.flower.task`: digits split across clients, an MLP as one flat
vector, plain local SGD) runs in Flower's simulation (:func:`run_flower`) or, with the same
encode/decode functions (:mod:`~gradpress.flower.update`), in an in-repo loop without
Flower (:func:`run_local`).
"""

from gradpress.flower.client import make_client_app
from gradpress.flower.compat import FLWR_MISSING, HAVE_FLWR
from gradpress.flower.mod import STATE_KEY, compression_mod
from gradpress.flower.replies import UPDATE_KEY
from gradpress.flower.run import run_flower, run_local
from gradpress.flower.strategy import CompressedFedAvg
from gradpress.flower.task import (
    FederatedData,
    digits_partitions,
    evaluate,
    init_params,
    local_train,
    num_params,
)
from gradpress.flower.update import (
    FEEDBACKS,
    check_header,
    decode_update,
    encode_update,
    make_feedback,
    round_seed,
)

__all__ = [
    "FEEDBACKS", "FLWR_MISSING", "HAVE_FLWR", "STATE_KEY", "UPDATE_KEY", "CompressedFedAvg",
    "FederatedData", "check_header", "compression_mod", "decode_update", "digits_partitions",
    "encode_update", "evaluate", "init_params", "local_train", "make_client_app",
    "make_feedback", "num_params", "round_seed", "run_flower", "run_local",
]
