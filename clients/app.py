"""Bonsai's ClientApp.

``query``    -> reports the node's partition id (the server orders its
                population by it, for seeded sampling).
``train``    -> loads the model view, trains on this node's examples, replies
                with the new weights and metrics.
``evaluate`` -> loss and accuracy of the received model on this node's examples.

The experiment config comes from the run config (the same flat keys the server
reads); the node's data from fl.data.node_data (its partition of the configured
dataset in a simulation, its own file in a deployment), its device and threads
from clients/edge.py.
Nothing is kept in module globals except the read-only dataset cache: Ray
reuses worker processes across simulated clients.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.edge import measured, node_profile
from fl import contract, wire
from fl.config import ExperimentConfig, from_flat
from fl.data import NodeData, node_data
from fl.kernels import pack_bits, unpack_bits
from fl.models import build_model
from fl.pruning import (
    count_flops,
    prunable_names,
    shrink_model,
    structure_from_json,
    training_flops_per_example,
)
from fl.sampling import round_seed
from fl.train import evaluate, pick_device, train

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> ExperimentConfig:
    return from_flat(dict(items))


def _node(context: Context) -> tuple[ExperimentConfig, NodeData]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    cfg = node_profile(cfg, context)  # this node's thread limit and device (edge profile)
    return cfg, node_data(cfg, context.node_config)


def _setup(context: Context) -> tuple[ExperimentConfig, NodeData, torch.nn.Module]:
    cfg, node = _node(context)
    return cfg, node, build_model(cfg.model, node.input_shape, node.num_classes)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id and example count."""
    _, node = _node(context)  # no model: at 1000 simulated nodes its init is most of a query
    metrics = MetricRecord({contract.PARTITION_ID: node.partition_id,
                            contract.NUM_EXAMPLES: len(node.data)})
    return Message(RecordDict({contract.METRICS: metrics}), reply_to=msg)


@lru_cache(maxsize=16)
def _forward_flops(model: str, input_shape: tuple[int, ...], num_classes: int,
                   structure: str) -> int:
    """Forward FLOPs per example of the model ``structure`` leaves (cached: a model's
    FLOPs depend only on these, and tracing it costs as much as a few training steps)."""
    net = (shrink_model(model, input_shape, num_classes, structure_from_json(structure))
           if structure else build_model(model, input_shape, num_classes))
    return count_flops(net, input_shape)


def _train_metrics(res, cfg: ExperimentConfig, node: NodeData, epochs: int,
                   structure: str = "") -> MetricRecord:
    """num-examples, loss, seconds and the training FLOPs of the model actually trained."""
    fwd = _forward_flops(cfg.model, node.input_shape, node.num_classes, structure)
    return MetricRecord({
        contract.NUM_EXAMPLES: res.num_examples,
        contract.TRAIN_LOSS: res.loss,
        contract.TRAIN_SECONDS: res.seconds,
        contract.TRAIN_FLOPS: training_flops_per_example(fwd) * res.num_examples * epochs,
    })


@app.train()
@measured
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's examples.

    A dense ``arrays`` record (Flower's FedAvg family) is answered with the new
    weights; a wire ``payload`` (FedLD, AutoFLIP) with the update on kept entries.
    """
    if contract.PAYLOAD in msg.content:
        return _train_sparse(msg, context)
    cfg, node, model = _setup(context)
    pid, data = node.partition_id, node.data
    model.load_state_dict(msg.content[contract.ARRAYS].to_torch_state_dict())
    conf: ConfigRecord = msg.content[contract.CONFIG]
    server_round = int(conf.get(contract.SERVER_ROUND, 0))
    res = train(
        model, data, cfg.train,
        seed=round_seed(cfg.seed, server_round, salt=1000 + pid),
        device=pick_device(cfg.resources.device),
        margin_lambda=float(conf.get(contract.MARGIN_LAMBDA, cfg.objective.margin_lambda)),
        proximal_mu=float(conf.get(contract.PROXIMAL_MU, 0.0)),
    )
    model.to("cpu")
    metrics = _train_metrics(res, cfg, node, cfg.train.local_epochs)
    content = RecordDict({contract.ARRAYS: ArrayRecord(model.state_dict()),
                          contract.METRICS: metrics})
    return Message(content, reply_to=msg)


# context.state records: the mask this node holds (a wire payload) and its version
_MASK_STATE, _MASK_META = "bonsai-mask", "bonsai-mask-meta"


def _keep_masks(context: Context, masks: dict[str, torch.Tensor], version: int,
                structure: str) -> None:
    """Store the node's mask as 1-bit bitmaps (fl.kernels.pack_bits): simulated nodes'
    states live in one process, so 1000 clients hold 1000 of them."""
    context.state[_MASK_STATE] = ArrayRecord(
        {n: Array(pack_bits(m.reshape(-1)).numpy()) for n, m in masks.items()})
    shapes = json.dumps({n: list(m.shape) for n, m in masks.items()})
    context.state[_MASK_META] = ConfigRecord({"version": version, "structure": structure,
                                              "shapes": shapes})


def _held_masks(context: Context, version: int) -> dict[str, torch.Tensor] | None:
    """The mask this node holds, when it is the version the server names."""
    meta = context.state.get(_MASK_META)
    if meta is None or int(meta["version"]) != version or _MASK_STATE not in context.state:
        return None
    shapes = json.loads(str(meta["shapes"]))
    bits = context.state[_MASK_STATE]
    return {n: unpack_bits(torch.from_numpy(bits[n].numpy()), math.prod(shape)).reshape(shape)
            for n, shape in shapes.items()}


def _sparse_view(msg: Message, context: Context, cfg: ExperimentConfig,
                 input_shape: tuple[int, ...], num_classes: int
                 ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int, str]:
    """Decode the payload into the (physically smaller) model, its masks, the mask
    version and the structure (JSON) the model was shrunk to.

    A fresh mask (and the kept units) arrive only when the node's copy is
    stale; otherwise the values are read against the mask kept in
    ``context.state`` from an earlier round.
    """
    conf: ConfigRecord = msg.content[contract.CONFIG]
    version = int(conf.get(contract.MASK_VERSION, 0))
    meta = context.state.get(_MASK_META)
    held = _held_masks(context, version)
    state, masks = wire.decode(wire.from_record(msg.content[contract.PAYLOAD]), known_masks=held,
                               known_mask_version=version if held is not None else None)
    structure = conf.get(contract.STRUCTURE, meta["structure"] if meta is not None else "")
    if masks or contract.STRUCTURE in conf:
        _keep_masks(context, masks, version, str(structure))
    masks = masks or held or {}
    model = (shrink_model(cfg.model, input_shape, num_classes, structure_from_json(structure))
             if structure else build_model(cfg.model, input_shape, num_classes))
    model.load_state_dict(state)
    return model, {n: m.bool() for n, m in masks.items()}, version, str(structure)


def _train_sparse(msg: Message, context: Context) -> Message:
    cfg, node = _node(context)
    pid, data, shape = node.partition_id, node.data, node.input_shape
    model, masks, version, structure = _sparse_view(msg, context, cfg, shape,
                                                    node.num_classes)
    conf: ConfigRecord = msg.content[contract.CONFIG]
    server_round = int(conf.get(contract.SERVER_ROUND, 0))
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    res = train(
        model, data, cfg.train,
        seed=round_seed(cfg.seed, server_round, salt=1000 + pid),
        device=pick_device(cfg.resources.device),
        margin_lambda=float(conf.get(contract.MARGIN_LAMBDA, cfg.objective.margin_lambda)),
        proximal_mu=float(conf.get(contract.PROXIMAL_MU, 0.0)),
        masks=masks,
    )
    model.to("cpu")
    delta = {n: t - start[n] for n, t in model.state_dict().items()}
    payload = wire.encode(delta, masks=masks or None, mask_version=version, send_mask=False,
                          quantize=cfg.pruning.quantize)
    metrics = _train_metrics(res, cfg, node, cfg.train.local_epochs, structure)
    content = RecordDict({contract.PAYLOAD: wire.to_record(payload), contract.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.train(contract.EXPLORE_ACTION)
@measured
def explore_handler(msg: Message, context: Context) -> Message:
    """AutoFLIP exploration: train a copy of theta_0 and return the squared
    deviation (theta_k - theta_0)^2 of every prunable weight (docs/ALGORITHMS.md §1.1)."""
    cfg, node, model = _setup(context)
    pid, data = node.partition_id, node.data
    state, _ = wire.decode(wire.from_record(msg.content[contract.PAYLOAD]))
    model.load_state_dict(state)
    conf: ConfigRecord = msg.content[contract.CONFIG]
    epochs = int(conf.get(contract.LOCAL_EPOCHS, 1))
    theta0 = {n: t.detach().clone() for n, t in model.state_dict().items()}
    res = train(model, data, cfg.train, seed=round_seed(cfg.seed, 0, salt=1000 + pid),
                device=pick_device(cfg.resources.device), epochs=epochs)
    model.to("cpu")
    after = model.state_dict()
    deviations = {n: (after[n] - theta0[n]) ** 2 for n in prunable_names(model)}
    metrics = _train_metrics(res, cfg, node, epochs)
    return Message(RecordDict({contract.PAYLOAD: wire.to_record(wire.encode(deviations)),
                               contract.METRICS: metrics}), reply_to=msg)


@app.evaluate(contract.DECOMPOSE_ACTION)
def decompose_handler(msg: Message, context: Context) -> Message:
    """Loss of each of the round's client models and of the global model on this
    node's own examples: one row of the loss decomposition (docs/ALGORITHMS.md §2.1)."""
    cfg, node, model = _setup(context)
    device = pick_device(cfg.resources.device)
    losses = {}
    for name in msg.content.array_records:
        if name == contract.GLOBAL_MODEL or name.startswith(contract.CLIENT_MODEL_PREFIX):
            model.load_state_dict(msg.content[name].to_torch_state_dict())
            key = name.removeprefix(contract.CLIENT_MODEL_PREFIX)
            losses[f"{contract.LOSS_PREFIX}{key}"] = evaluate(model, node.data, device)[0]
    return Message(RecordDict({contract.METRICS: MetricRecord(losses)}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's examples."""
    cfg, node, model = _setup(context)
    model.load_state_dict(msg.content[contract.ARRAYS].to_torch_state_dict())
    loss, acc = evaluate(model, node.data, pick_device(cfg.resources.device))
    metrics = MetricRecord({contract.NUM_EXAMPLES: len(node.data), contract.EVAL_LOSS: loss,
                            contract.EVAL_ACCURACY: acc})
    return Message(RecordDict({contract.METRICS: metrics}), reply_to=msg)
