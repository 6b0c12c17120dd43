"""digits_app: the Flower ServerApp, as in Flower's PyTorch quickstart, with FedAvg replaced
by gradpress's CompressedFedAvg (the second added line), which decodes the clients' payloads
(and drops lying or broken replies). It logs accuracy and uplink bytes per round."""

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import gradpress
from digits_app.task import Net, load_centralized_dataset, test
from gradpress.flower import CompressedFedAvg

app = ServerApp()
log = logging.getLogger("flwr.digits_app")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for ``num-server-rounds`` rounds, evaluating on the held-out digits."""
    torch.manual_seed(0)
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # The other added line (was: FedAvg(fraction_train=...)): same compressor as the mod.
    strategy = CompressedFedAvg(gradpress.get("qsgd", s=4),
                                fraction_train=float(context.run_config["fraction-train"]),
                                fraction_evaluate=float(context.run_config["fraction-evaluate"]))

    result = strategy.start(grid=grid, initial_arrays=arrays,
                            train_config=ConfigRecord({"lr": float(context.run_config["lr"])}),
                            num_rounds=int(context.run_config["num-server-rounds"]),
                            evaluate_fn=global_evaluate)
    fp32 = sum(a.numpy().nbytes for a in arrays.values())
    for h in strategy.history:
        acc = result.evaluate_metrics_serverapp[h["round"]]["accuracy"]
        log.info("round %d: accuracy %.3f, %d clients, uplink %d payload bytes (fp32: %d, "
                 "%.1fx), dropped %s", h["round"], acc, h["clients"], h["uplink_bytes"],
                 fp32 * h["clients"], fp32 * h["clients"] / max(h["uplink_bytes"], 1),
                 h["dropped"] or "none")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the global model on the held-out quarter of digits."""
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, load_centralized_dataset())
    return MetricRecord({"accuracy": accuracy, "loss": loss})
