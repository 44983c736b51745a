"""Plain Flower ClientApp: train the received model on this node's chunk."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plainfl import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    rc = context.run_config
    torch.set_num_threads(1)
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    x, y = task.partition(str(rc["data-path"]), float(rc["test-fraction"]), int(rc["seed"]), pid, n)
    model = task.net(x)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = task.train(model, x, y, int(rc["local-epochs"]), int(rc["batch-size"]), float(rc["lr"]),
                      float(rc["momentum"]), seed=pid)
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)
