"""Bonsai's ClientApp.

``query``    -> reports the node's partition id (the server orders its
                population by it, for seeded sampling).
``train``    -> loads the model view, trains on this node's examples, replies
                with the new weights and metrics.
``evaluate`` -> loss and accuracy of the received model on this node's examples.

The experiment config comes from the run config (the same flat keys the server
reads); the node's data from fl.nodedata.node_data (its partition of the configured
dataset in a simulation, its own file in a deployment), its device and threads
from clients/edge.py.
Nothing is kept in module globals except the read-only dataset cache: Ray
reuses worker processes across simulated clients.

Cohort mode (``simulation.cohort_size``, simulation only): the node is a
*worker* and a message carries several clients (fl/packing.py; server/cohorts.py
packs them). Each client is answered as its own node would answer it, from its
own partition: the train messages' clients are trained together by
fl.cohort.train_cohort (those that train the same architecture with the same
objective in one call: one after another, or vectorised), the others one by one;
the replies travel back packed. A worker keeps the masks its clients hold by
mask version (:class:`_WorkerMasks`).

Why one module of this length: Flower registers a ClientApp's handlers on one
``app`` object, and every handler (a node's or a cohort worker's) goes through the same
private steps: the node's config and data, the masks it holds, the training jobs and
their replies. Split, those steps would become an interface with a single caller.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.edge import measured, node_profile
from fl import contract, packing, wire
from fl.cohort import ClientTraining, train_cohort
from fl.config import ExperimentConfig, from_flat
from fl.kernels import pack_bits, unpack_bits
from fl.models import build_model
from fl.node import DATA_PATH, NUM_PARTITIONS, PARTITION_ID, PEAK_CUDA_MEMORY_MB, PeakMemory
from fl.nodedata import NodeData, node_data
from fl.pruning import (
    count_flops,
    prunable_names,
    shrink_model,
    structure_from_json,
    training_flops_per_example,
)
from fl.sampling import round_seed
from fl.train import evaluate, pick_device

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


def _worker_config(context: Context) -> ExperimentConfig:
    """A worker's config: the run config with the worker's own thread limit and device.

    Raises ValueError on a deployed node (one with its own ``data-path``): it is one
    client with its own data, and must not train other clients on a central dataset.
    """
    if context.node_config.get(DATA_PATH):
        raise ValueError("cohort mode (simulation.cohort_size) is for simulations; this "
                         f"node holds its own data ({DATA_PATH}) and trains only itself")
    return node_profile(_config(tuple(sorted(context.run_config.items()))), context)


def _client_data(cfg: ExperimentConfig, client: int) -> NodeData:
    """What client ``client`` trains on: its partition, as its own node would load it."""
    return node_data(cfg, {PARTITION_ID: client, NUM_PARTITIONS: cfg.partition.num_clients})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id and example count (a worker: its place)."""
    if contract.CONFIG in msg.content and msg.content[contract.CONFIG].get(contract.COHORT_QUERY):
        _worker_config(context)  # a deployed node refuses to be a worker
        metrics = MetricRecord({
            contract.WORKER_INDEX: int(context.node_config.get(PARTITION_ID, 0)),
            contract.NUM_WORKERS: int(context.node_config.get(NUM_PARTITIONS, 1))})
        return Message(RecordDict({contract.METRICS: metrics}), reply_to=msg)
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


# --- masks a node (or a worker, for its clients) holds ---------------------------------
# context.state records: the mask this node holds (a wire payload) and its version
_MASK_STATE, _MASK_META = "bonsai-mask", "bonsai-mask-meta"
# a worker's: one mask per version ("bonsai-mask-v3", ...) and the version each client holds
_WORKER_CLIENTS = "bonsai-mask-clients"


def _bits_record(masks: dict[str, torch.Tensor], version: int, structure: str
                 ) -> tuple[ArrayRecord, ConfigRecord]:
    """Masks as 1-bit bitmaps (fl.kernels.pack_bits): simulated nodes' states live in one
    process, so 1000 clients hold 1000 of them."""
    bits = ArrayRecord({n: Array(pack_bits(m.reshape(-1)).numpy()) for n, m in masks.items()})
    shapes = json.dumps({n: list(m.shape) for n, m in masks.items()})
    return bits, ConfigRecord({"version": version, "structure": structure, "shapes": shapes})


def _unbits(bits: ArrayRecord, meta: ConfigRecord) -> dict[str, torch.Tensor]:
    shapes = json.loads(str(meta["shapes"]))
    return {n: unpack_bits(torch.from_numpy(bits[n].numpy()), math.prod(shape)).reshape(shape)
            for n, shape in shapes.items()}


class _NodeMasks:
    """The one mask a node holds (a node is one client), in ``context.state``."""

    def __init__(self, context: Context):
        self.state = context.state

    def held(self, version: int) -> dict[str, torch.Tensor] | None:
        """The mask this node holds, when it is the version the server names."""
        meta = self.state.get(_MASK_META)
        if meta is None or int(meta["version"]) != version or _MASK_STATE not in self.state:
            return None
        return _unbits(self.state[_MASK_STATE], meta)

    def structure(self, version: int) -> str:
        """The kept units (JSON) of the held mask ("" when none is held)."""
        meta = self.state.get(_MASK_META)
        return str(meta["structure"]) if meta is not None else ""

    def keep(self, masks: dict[str, torch.Tensor], version: int, structure: str) -> None:
        self.state[_MASK_STATE], self.state[_MASK_META] = _bits_record(masks, version,
                                                                       structure)


class _WorkerMasks:
    """The masks a worker's clients hold, one copy per mask version (every client of a
    version holds the same mask), and which version each client holds.

    The server sends a client the mask only when that client's copy is stale, so the
    worker must hold, for each of its clients, the version the client last received:
    the server keeps a client on the same worker for the whole run
    (server/cohorts.py). A version no client holds any more is dropped.
    """

    def __init__(self, context: Context, client: int):
        self.state, self.client = context.state, str(client)

    @staticmethod
    def _names(version: int) -> tuple[str, str]:
        return f"{_MASK_STATE}-v{version}", f"{_MASK_META}-v{version}"

    def held(self, version: int) -> dict[str, torch.Tensor] | None:
        bits, meta = self._names(version)
        if bits not in self.state or meta not in self.state:
            return None
        return _unbits(self.state[bits], self.state[meta])

    def structure(self, version: int) -> str:
        meta = self.state.get(self._names(version)[1])
        return str(meta["structure"]) if meta is not None else ""

    def keep(self, masks: dict[str, torch.Tensor], version: int, structure: str) -> None:
        bits, meta = self._names(version)
        self.state[bits], self.state[meta] = _bits_record(masks, version, structure)
        clients = self.state.get(_WORKER_CLIENTS) or ConfigRecord()
        clients[self.client] = version
        self.state[_WORKER_CLIENTS] = clients
        live = {int(v) for v in clients.values()}
        for name in [n for n in self.state if n.startswith(f"{_MASK_META}-v")]:
            v = int(name.rsplit("-v", 1)[1])
            if v not in live:
                for stale in self._names(v):
                    del self.state[stale]


_Masks = _NodeMasks | _WorkerMasks


# --- training: one job per client, trained in groups with fl.cohort ---------------------
@dataclass
class _Job:
    """One client's training: where it starts, how it trains, how its reply is built."""

    node: NodeData
    group: tuple  #: clients with the same group train together (architecture, objective)
    model: torch.nn.Module  #: the architecture trained (shared by the group)
    start: dict[str, torch.Tensor]
    seed: int
    epochs: int
    margin_lambda: float
    proximal_mu: float
    masks: dict[str, torch.Tensor] | None
    reply: Callable[[ClientTraining], RecordDict]


class _Models:
    """The architecture for a structure, built once per message (a worker's clients of
    one round share it; each job loads its own state into a copy)."""

    def __init__(self, cfg: ExperimentConfig, node: NodeData):
        self.cfg, self.shape, self.classes = cfg, node.input_shape, node.num_classes
        self.built: dict[str, torch.nn.Module] = {}

    def __call__(self, structure: str) -> torch.nn.Module:
        if structure not in self.built:
            c = self.cfg
            self.built[structure] = (
                shrink_model(c.model, self.shape, self.classes, structure_from_json(structure))
                if structure else build_model(c.model, self.shape, self.classes))
        return self.built[structure]


def _start(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as ``model`` holds it (its dtypes and names), copied."""
    model.load_state_dict(state)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _objective(conf: ConfigRecord, cfg: ExperimentConfig) -> tuple[float, float]:
    return (float(conf.get(contract.MARGIN_LAMBDA, cfg.objective.margin_lambda)),
            float(conf.get(contract.PROXIMAL_MU, 0.0)))


def _dense_job(content: RecordDict, cfg: ExperimentConfig, node: NodeData,
               models: _Models) -> _Job:
    """A dense ``arrays`` record (Flower's FedAvg family): answered with the new weights."""
    model = models("")
    start = _start(model, content[contract.ARRAYS].to_torch_state_dict())
    conf: ConfigRecord = content[contract.CONFIG]
    server_round = int(conf.get(contract.SERVER_ROUND, 0))
    margin, mu = _objective(conf, cfg)

    def reply(out: ClientTraining) -> RecordDict:
        metrics = _train_metrics(out.result, cfg, node, cfg.train.local_epochs)
        return RecordDict({contract.ARRAYS: ArrayRecord(out.state), contract.METRICS: metrics})

    return _Job(node, ("dense", "", margin, mu), model, start,
                round_seed(cfg.seed, server_round, salt=1000 + node.partition_id),
                cfg.train.local_epochs, margin, mu, None, reply)


def _sparse_view(content: RecordDict, held: _Masks
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, str]:
    """Decode the payload: the (physically smaller) model's state, its masks, the mask
    version and the structure (JSON) the model was shrunk to.

    A fresh mask (and the kept units) arrive only when the client's copy is
    stale; otherwise the values are read against the mask kept from an earlier
    round (a worker without that mask version fails this client: wire.decode
    names the missing mask).
    """
    conf: ConfigRecord = content[contract.CONFIG]
    version = int(conf.get(contract.MASK_VERSION, 0))
    known = held.held(version)
    state, masks = wire.decode(wire.from_record(content[contract.PAYLOAD]), known_masks=known,
                               known_mask_version=version if known is not None else None)
    structure = str(conf.get(contract.STRUCTURE, held.structure(version)))
    if masks or contract.STRUCTURE in conf:
        held.keep(masks, version, structure)
    masks = masks or known or {}
    return state, {n: m.bool() for n, m in masks.items()}, version, structure


def _sparse_job(content: RecordDict, cfg: ExperimentConfig, node: NodeData, models: _Models,
                held: _Masks) -> _Job:
    """A wire ``payload`` (FedLD, AutoFLIP): answered with the update on kept entries."""
    state, masks, version, structure = _sparse_view(content, held)
    model = models(structure)
    start = _start(model, state)
    conf: ConfigRecord = content[contract.CONFIG]
    server_round = int(conf.get(contract.SERVER_ROUND, 0))
    margin, mu = _objective(conf, cfg)

    def reply(out: ClientTraining) -> RecordDict:
        delta = {n: t - start[n] for n, t in out.state.items()}
        payload = wire.encode(delta, masks=masks or None, mask_version=version, send_mask=False,
                              quantize=cfg.pruning.quantize)
        metrics = _train_metrics(out.result, cfg, node, cfg.train.local_epochs, structure)
        return RecordDict({contract.PAYLOAD: wire.to_record(payload),
                           contract.METRICS: metrics})

    return _Job(node, ("sparse", structure, margin, mu), model, start,
                round_seed(cfg.seed, server_round, salt=1000 + node.partition_id),
                cfg.train.local_epochs, margin, mu, masks, reply)


def _explore_job(content: RecordDict, cfg: ExperimentConfig, node: NodeData,
                 models: _Models) -> _Job:
    """AutoFLIP exploration: train a copy of theta_0 and return the squared deviation
    (theta_k - theta_0)^2 of every prunable weight (docs/ALGORITHMS.md §1.1)."""
    model = models("")
    state, _ = wire.decode(wire.from_record(content[contract.PAYLOAD]))
    theta0 = _start(model, state)
    epochs = int(content[contract.CONFIG].get(contract.LOCAL_EPOCHS, 1))

    def reply(out: ClientTraining) -> RecordDict:
        deviations = {n: (out.state[n] - theta0[n]) ** 2 for n in prunable_names(model)}
        metrics = _train_metrics(out.result, cfg, node, epochs)
        return RecordDict({contract.PAYLOAD: wire.to_record(wire.encode(deviations)),
                           contract.METRICS: metrics})

    return _Job(node, ("explore", "", 0.0, 0.0), model, theta0,
                round_seed(cfg.seed, 0, salt=1000 + node.partition_id), epochs, 0.0, 0.0, None,
                reply)


def _train_group(jobs: Sequence[_Job], cfg: ExperimentConfig, mode: str = "sequential"
                 ) -> list[RecordDict]:
    """Train ``jobs`` (one group: same architecture and objective) with
    fl.cohort.train_cohort and build their replies, in order."""
    first = jobs[0]
    outs = train_cohort(
        first.model, [j.start for j in jobs], [j.node.data for j in jobs], cfg.train,
        seeds=[j.seed for j in jobs], device=pick_device(cfg.resources.device),
        margin_lambda=first.margin_lambda, proximal_mu=first.proximal_mu,
        masks=[j.masks for j in jobs], epochs=[j.epochs for j in jobs], mode=mode,
        cohort_size=cfg.simulation.cohort_size or None)
    return [j.reply(o) for j, o in zip(jobs, outs)]


def _one(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


@app.train()
@measured
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's examples.

    A dense ``arrays`` record (Flower's FedAvg family) is answered with the new
    weights; a wire ``payload`` (FedLD, AutoFLIP) with the update on kept entries.
    """
    if packing.is_packed(msg.content):
        return _worker_train(msg, context, _train_job)
    cfg, node = _node(context)
    job = _train_job(msg.content, cfg, node, _Models(cfg, node), _NodeMasks(context))
    return _one(msg, _train_group([job], cfg)[0])


def _train_job(content: RecordDict, cfg: ExperimentConfig, node: NodeData, models: _Models,
               held: _Masks) -> _Job:
    if contract.PAYLOAD in content:
        return _sparse_job(content, cfg, node, models, held)
    return _dense_job(content, cfg, node, models)


@app.train(contract.EXPLORE_ACTION)
@measured
def explore_handler(msg: Message, context: Context) -> Message:
    """AutoFLIP exploration (:func:`_explore_job`)."""
    if packing.is_packed(msg.content):
        return _worker_train(msg, context,
                             lambda c, cfg, node, models, _: _explore_job(c, cfg, node, models))
    cfg, node = _node(context)
    return _one(msg, _train_group([_explore_job(msg.content, cfg, node, _Models(cfg, node))],
                                  cfg)[0])


def _decompose(content: RecordDict, cfg: ExperimentConfig, node: NodeData) -> RecordDict:
    model = build_model(cfg.model, node.input_shape, node.num_classes)
    device = pick_device(cfg.resources.device)
    losses = {}
    for name in content.array_records:
        if name == contract.GLOBAL_MODEL or name.startswith(contract.CLIENT_MODEL_PREFIX):
            model.load_state_dict(content[name].to_torch_state_dict())
            key = name.removeprefix(contract.CLIENT_MODEL_PREFIX)
            losses[f"{contract.LOSS_PREFIX}{key}"] = evaluate(model, node.data, device)[0]
    return RecordDict({contract.METRICS: MetricRecord(losses)})


@app.evaluate(contract.DECOMPOSE_ACTION)
def decompose_handler(msg: Message, context: Context) -> Message:
    """Loss of each of the round's client models and of the global model on this
    node's own examples: one row of the loss decomposition (docs/ALGORITHMS.md §2.1)."""
    if packing.is_packed(msg.content):
        return _worker_each(msg, context, _decompose)
    cfg, node = _node(context)
    return _one(msg, _decompose(msg.content, cfg, node))


def _evaluate(content: RecordDict, cfg: ExperimentConfig, node: NodeData) -> RecordDict:
    model = build_model(cfg.model, node.input_shape, node.num_classes)
    model.load_state_dict(content[contract.ARRAYS].to_torch_state_dict())
    loss, acc = evaluate(model, node.data, pick_device(cfg.resources.device))
    metrics = MetricRecord({contract.NUM_EXAMPLES: len(node.data), contract.EVAL_LOSS: loss,
                            contract.EVAL_ACCURACY: acc})
    return RecordDict({contract.METRICS: metrics})


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's examples."""
    if packing.is_packed(msg.content):
        return _worker_each(msg, context, _evaluate)
    cfg, node = _node(context)
    return _one(msg, _evaluate(msg.content, cfg, node))


# --- a worker's packed messages (cohort mode) --------------------------------------------
def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _worker_each(msg: Message, context: Context,
                 fn: Callable[[RecordDict, ExperimentConfig, NodeData], RecordDict]) -> Message:
    """Answer each client of a packed message with ``fn``, one after another."""
    cfg = _worker_config(context)
    out: list[packing.Entry] = []
    for client, content in packing.unpack(msg.content):
        try:
            out.append((client, fn(content, cfg, _client_data(cfg, client))))
        # A client's failure is its own error reply, as Flower gives a node whose
        # handler raised; the worker's other clients are answered.
        except Exception as exc:  # noqa: BLE001
            out.append((client, _reason(exc)))
    return Message(packing.pack(out), reply_to=msg)


_JobFn = Callable[[RecordDict, ExperimentConfig, NodeData, _Models, _Masks], _Job]


def _worker_train(msg: Message, context: Context, make: _JobFn) -> Message:
    """Train every client of a packed message: their jobs grouped by architecture and
    objective, each group one fl.cohort.train_cohort call (``simulation.cohort_mode``);
    the replies carry the worker's peak memory over the message."""
    cfg = _worker_config(context)
    mode = cfg.simulation.cohort_mode
    results: dict[int, RecordDict | str] = {}
    groups: dict[tuple, list[tuple[int, _Job]]] = {}
    entries = packing.unpack(msg.content)
    models: dict[tuple, _Models] = {}
    device = pick_device(cfg.resources.device)
    with PeakMemory(device) as peak:
        for i, (client, content) in enumerate(entries):
            try:
                node = _client_data(cfg, client)
                key = (node.input_shape, node.num_classes)
                build = models.setdefault(key, _Models(cfg, node))
                job = make(content, cfg, node, build, _WorkerMasks(context, client))
                groups.setdefault((key, *job.group), []).append((i, job))
            except Exception as exc:  # noqa: BLE001 - this client's error reply
                results[i] = _reason(exc)
        for members in groups.values():
            try:
                replies = _train_group([j for _, j in members], cfg, mode)
            except Exception as exc:  # noqa: BLE001 - the group's clients' error replies
                replies = [_reason(exc)] * len(members)
            for (i, _), r in zip(members, replies):
                results[i] = r
    for r in results.values():
        if not isinstance(r, str):
            r[contract.METRICS][contract.PEAK_MEMORY_MB] = peak.rss_mb
            if device.type == "cuda":
                r[contract.METRICS][PEAK_CUDA_MEMORY_MB] = peak.cuda_mb
    return Message(packing.pack([(c, results[i]) for i, (c, _) in enumerate(entries)]),
                   reply_to=msg)
