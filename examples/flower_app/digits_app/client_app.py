"""digits_app: the Flower ClientApp, as in Flower's PyTorch quickstart, plus one line: the
gradpress mod, which sends the update (trained - received arrays) as gradpress payloads."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import gradpress
from digits_app.task import Net, load_data
from digits_app.task import test as test_fn
from digits_app.task import train as train_fn
from gradpress.flower import compression_mod

# The one added line: QSGD with 4 levels on the uplink. (QSGD is unbiased and needs no
# error feedback; for a biased compressor such as top-k add feedback="ef".)
app = ClientApp(mods=[compression_mod(gradpress.get("qsgd", s=4))])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with its arrays."""
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(int(context.node_config["partition-id"]),
                               int(context.node_config["num-partitions"]),
                               int(context.run_config["batch-size"]))
    loss = train_fn(model, trainloader, int(context.run_config["local-epochs"]),
                    float(msg.content["config"]["lr"]))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss,
                                 "num-examples": len(trainloader.dataset)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's validation split."""
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, valloader = load_data(int(context.node_config["partition-id"]),
                             int(context.node_config["num-partitions"]),
                             int(context.run_config["batch-size"]))
    loss, acc = test_fn(model, valloader)
    content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc,
                                                   "num-examples": len(valloader.dataset)})})
    return Message(content=content, reply_to=msg)
