"""Bonsai's ClientApp.

``query``    -> reports the node's partition id (the server orders its
                population by it, for seeded sampling).
``train``    -> loads the model view, trains on this node's examples, replies
                with the new weights and metrics.
``evaluate`` -> loss and accuracy of the received model on this node's examples.

The experiment config comes from the run config (the same flat keys the server
reads); the node's data comes from its partition of the configured dataset.
Nothing is kept in module globals except the read-only dataset cache: Ray
reuses worker processes across simulated clients.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl import contract as k
from fl.config import ExperimentConfig, from_flat
from fl.data import Arrays, node_data
from fl.models import build_model
from fl.sampling import round_seed
from fl.train import evaluate, pick_device, train

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> ExperimentConfig:
    return from_flat(dict(items))


def _setup(context: Context) -> tuple[ExperimentConfig, int, Arrays, torch.nn.Module]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    torch.set_num_threads(cfg.resources.client_cpus)  # respect this client's CPU share
    node = node_data(cfg, context.node_config)
    model = build_model(cfg.model, node.input_shape, node.num_classes)
    return cfg, node.partition_id, node.data, model


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id and example count."""
    cfg, pid, data, _ = _setup(context)
    metrics = MetricRecord({"partition-id": pid, k.NUM_EXAMPLES: len(data)})
    return Message(RecordDict({k.METRICS: metrics}), reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's examples."""
    cfg, pid, data, model = _setup(context)
    model.load_state_dict(msg.content[k.ARRAYS].to_torch_state_dict())
    conf: ConfigRecord = msg.content[k.CONFIG]
    server_round = int(conf.get(k.SERVER_ROUND, 0))
    device = pick_device(cfg.resources.device)
    res = train(
        model, data, cfg.train,
        seed=round_seed(cfg.seed, server_round, salt=1000 + pid),
        device=device,
        margin_lambda=float(conf.get(k.MARGIN_LAMBDA, cfg.objective.margin_lambda)),
        proximal_mu=float(conf.get(k.PROXIMAL_MU, 0.0)),
    )
    model.to("cpu")
    metrics = MetricRecord({
        k.NUM_EXAMPLES: res.num_examples,
        k.TRAIN_LOSS: res.loss,
        k.TRAIN_SECONDS: res.seconds,
    })
    return Message(RecordDict({k.ARRAYS: ArrayRecord(model.state_dict()), k.METRICS: metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's examples."""
    cfg, pid, data, model = _setup(context)
    model.load_state_dict(msg.content[k.ARRAYS].to_torch_state_dict())
    loss, acc = evaluate(model, data, pick_device(cfg.resources.device))
    metrics = MetricRecord({k.NUM_EXAMPLES: len(data), k.EVAL_LOSS: loss,
                            k.EVAL_ACCURACY: acc})
    return Message(RecordDict({k.METRICS: metrics}), reply_to=msg)
