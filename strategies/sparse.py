"""A strategy that owns the global model and speaks Bonsai's wire format.

FedLD, AutoFLIP and the pruning baselines share it:

- the server keeps the full model theta_g (zeros where pruned), the mask
  (kept units + unstructured zeros) and its version;
- each sampled client receives the physically smaller model as the values of
  its kept entries (fl/wire), the mask only when its copy is stale;
- clients reply with their update Delta_k on kept entries only;
- the server decodes and validates every reply (a bad one is dropped with the
  reason logged), expands updates to full shapes, aggregates them with the
  configured rule (weighted mean or FedLD's principal gradient,
  docs/ALGORITHMS.md §2.3), applies server momentum and learning rate, and
  re-applies the mask (§1.3);
- an optional :class:`~strategies.mask_policy.MaskPolicy` recomputes the mask
  on its schedule (AutoFLIP: from the guidance; baselines: |w| or random).

Why one module of this length: one class, the server's half of the wire protocol:
what it sends (the view, payloads, masks by version) and what it accepts (decoding,
validation, aggregation, re-masking) change together, and its checkpoint state is
exactly that. The mask's schedule and scores are in strategies/mask_policy.py,
AutoFLIP's exploration in strategies/autoflip.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from torch import nn

from fl import contract, wire
from fl.aggregate import ServerMomentum, apply_update, fedld_aggregate, validate_update
from fl.aggregate import weighted_mean as mean_rule
from fl.models import build_model
from fl.pruning import (
    count_flops,
    density,
    expand_state,
    full_structure,
    groups_for,
    plan_masks,
    prunable_names,
    shrink_model,
    shrink_state,
    sparse_flops,
    structure_to_json,
)
from strategies.base import ClientState
from strategies.mask_policy import MaskPolicy
from strategies.seeded import Population

__all__ = ["AGGREGATIONS", "ModelSpec", "ModelView", "ServerRule", "SparseStrategy"]

AGGREGATIONS = ("mean", "fedld")


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Same names and equal tensors (a structure, or a set of masks)."""
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@dataclass(frozen=True)
class ModelSpec:
    """Which registry model (fl.models) the federation trains."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def build(self) -> nn.Module:
        return build_model(self.name, self.input_shape, self.num_classes)


@dataclass(frozen=True)
class ServerRule:
    """How the server turns the round's updates into the next theta_g.

    ``aggregation`` "mean" (weighted by examples) or "fedld" (principal gradient,
    with ``k_proportion`` and ``eigen_eps``); then heavy-ball ``server_momentum``
    and ``server_lr``: theta_g <- theta_g + lr * (beta v + aggregate).
    ``proximal_mu`` is sent to the clients (the FedProx term; 0 = off).
    """

    aggregation: str = "mean"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    k_proportion: float = 0.8
    eigen_eps: float = 1e-8
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: got {self.aggregation!r}; allowed: "
                             f"{', '.join(AGGREGATIONS)}")


@dataclass(frozen=True)
class ModelView:
    """What the clients train now: the small model and its masks, and its cost."""

    small_shapes: dict[str, tuple[int, ...]]
    small_masks: dict[str, torch.Tensor]  #: prunable weights' masks ({} when unmasked)
    model: nn.Module
    flops: int  #: forward FLOPs per example of the small model
    sparse_flops: int | None  #: the same counting only nonzero weights


class SparseStrategy(Population):
    """Server-side model, masks and wire format; see the module docstring.

    Parameters
    ----------
    model : the registry model the clients train (:class:`ModelSpec`)
    initial_state : theta_0 as a state dict
    rule : aggregation, server momentum and learning rate (:class:`ServerRule`)
    policy : a MaskPolicy, or None for an unpruned model (FedLD)
    quantize : send kept values as per-block int8 (fl/wire)
    min_train_nodes, seed, sample_fraction, evaluate_fraction : seeded sampling
        (strategies.seeded)
    """

    def __init__(
        self, *, model: ModelSpec, initial_state: Mapping[str, torch.Tensor],
        rule: ServerRule | None = None, policy: MaskPolicy | None = None,
        quantize: bool = False, min_train_nodes: int = 2, seed: int = 0,
        sample_fraction: float = 1.0, evaluate_fraction: float = 0.0,
    ) -> None:
        super().__init__(seed=seed, sample_fraction=sample_fraction,
                         evaluate_fraction=evaluate_fraction)
        self.min_train_nodes = min_train_nodes
        self.spec, self.policy, self.quantize = model, policy, quantize
        self.rule = rule if rule is not None else ServerRule()
        self.theta = {n: t.detach().clone() for n, t in initial_state.items()}
        full = model.build()
        self.buffer_names = {n for n, _ in full.named_buffers()}
        self.prunable = prunable_names(full)
        self.groups = (groups_for(model.name, model.input_shape, model.num_classes)
                       if policy else [])
        self.momentum = ServerMomentum(self.rule.server_momentum)
        # the current view: structure (kept units), masks (full shapes), version
        self.structure = full_structure(self.groups)
        self.masks: dict[str, torch.Tensor] = {}
        self.weight_masks: dict[str, torch.Tensor] = {}
        self.mask_version = 0
        #: mask version each node holds: set from a valid reply, dropped on a failed one
        self.node_version: dict[int, int] = {}
        self._sent: dict[int, int] = {}  # this round's nodes -> mask version sent
        self.view = self._make_view()

    # --- the view the clients train ---------------------------------------------------
    def _make_view(self) -> ModelView:
        """The small model's shapes, masks and FLOPs for the current structure and masks."""
        small = shrink_state(self.theta, self.groups, self.structure) if self.groups else {
            n: t.clone() for n, t in self.theta.items()}
        small_masks = (shrink_state(self.weight_masks, self.groups, self.structure)
                       if self.weight_masks else {})
        s = self.spec
        model = (shrink_model(s.name, s.input_shape, s.num_classes, self.structure)
                 if self.groups else s.build())
        return ModelView(
            small_shapes={n: tuple(t.shape) for n, t in small.items()},
            small_masks=small_masks, model=model, flops=count_flops(model, s.input_shape),
            sparse_flops=(sparse_flops(model, small_masks, s.input_shape)
                          if small_masks else None))

    def payload(self, send_mask: bool) -> bytes:
        """The current small model on the wire: with the mask, or against the mask the
        node already holds (the same bytes when nothing is masked)."""
        small = (shrink_state(self.theta, self.groups, self.structure) if self.groups
                 else self.theta)
        return wire.encode(small, masks=self.view.small_masks or None,
                           mask_version=self.mask_version, send_mask=send_mask,
                           quantize=self.quantize)

    def _recompute_mask(self, server_round: int) -> None:
        assert self.policy is not None  # only called when a policy is due
        s_ratio, u_ratio = self.policy.targets(server_round)
        plan = plan_masks(self.policy.scores(self.theta, server_round), self.groups, self.theta,
                          structured_ratio=s_ratio, unstructured_ratio=u_ratio,
                          min_units=self.policy.cfg.min_units, previous=self.structure)
        if (_same(plan.structure, self.structure) and self.weight_masks
                and _same(plan.weight_masks, self.weight_masks)):
            return  # nothing changed: no new version, nothing to send again (§1.3)
        self.structure, self.masks, self.weight_masks = (plan.structure, plan.masks,
                                                         plan.weight_masks)
        self.mask_version += 1
        self._apply_mask()
        self.view = self._make_view()
        log(INFO, "mask v%d: structured %.3f, unstructured %.3f, density %.3f",
            self.mask_version, s_ratio, u_ratio, self.density())

    def _apply_mask(self) -> None:
        for name, m in self.masks.items():
            self.theta[name] = self.theta[name] * m.to(self.theta[name].dtype)

    def density(self) -> float:
        """Kept fraction of the prunable weights of the full model."""
        if not self.masks:
            return 1.0
        return density({n: self.masks[n] for n in self.prunable if n in self.masks})

    # --- Flower strategy hooks --------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.policy is not None and self.policy.due(server_round):
            self._recompute_mask(server_round)
        nodes = self.sample(server_round)
        # encode only the variants this round's nodes need (usually one)
        needed = {self.node_version.get(n) != self.mask_version for n in nodes}
        records = {}
        for fresh in needed:
            conf = ConfigRecord({**dict(config), contract.SERVER_ROUND: server_round,
                                 contract.MASK_VERSION: self.mask_version,
                                 contract.PROXIMAL_MU: self.rule.proximal_mu})
            if fresh and self.groups:
                conf[contract.STRUCTURE] = structure_to_json(self.structure)
            records[fresh] = RecordDict({
                contract.PAYLOAD: wire.to_record(self.payload(send_mask=fresh)),
                contract.CONFIG: conf})
        msgs = []
        for n in nodes:
            fresh = self.node_version.get(n) != self.mask_version
            msgs.append(Message(records[fresh], dst_node_id=n, message_type=MessageType.TRAIN))
        # a node holds this version once it has replied with an update against it: one
        # that stalled, crashed or restarted gets the mask again (aggregate_train)
        self._sent = {n: self.mask_version for n in nodes}
        return msgs

    def decode(self, reply: Message, shapes: Mapping[str, tuple[int, ...]],
               known: Mapping[str, torch.Tensor] | None
               ) -> tuple[dict[str, torch.Tensor] | None, str]:
        """A reply's payload (decoded against ``known`` masks, checked against
        ``shapes``), or None and the reason it was rejected."""
        if reply.has_error():
            return None, f"client error: {reply.error.reason}"
        try:
            metrics = reply.content[contract.METRICS] if contract.METRICS in reply.content \
                else None
            if metrics is None or contract.NUM_EXAMPLES not in metrics:
                return None, f"no {contract.NUM_EXAMPLES} metric"
            data = wire.from_record(reply.content[contract.PAYLOAD])
            update, _ = wire.decode(data, known_masks=known,
                                    known_mask_version=self.mask_version if known else None,
                                    max_elements=4 * sum(int(torch.Size(s).numel())
                                                         for s in shapes.values()) + 16)
        except (KeyError, TypeError, ValueError) as e:  # WireError is a ValueError
            return None, str(e)
        reason = validate_update(update, shapes)
        return (None, reason) if reason else (update, "")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shapes = self.view.small_shapes
        known = self.view.small_masks or None
        updates, counts, losses, nodes = [], [], [], []
        for r in self.order(replies):
            upd, reason = self.decode(r, shapes, known)
            if upd is None:
                log(WARNING, "round %d: reply from node %d rejected: %s", server_round,
                    r.metadata.src_node_id, reason)
                continue
            self.node_version[r.metadata.src_node_id] = self._sent.get(r.metadata.src_node_id,
                                                                       self.mask_version)
            full = (expand_state(upd, self.groups, self.structure, self.theta)
                    if self.groups else upd)
            updates.append(full)
            nodes.append(r.metadata.src_node_id)
            metrics = r.content[contract.METRICS]
            counts.append(int(metrics[contract.NUM_EXAMPLES]))
            losses.append(float(metrics.get(contract.TRAIN_LOSS, float("nan"))))
        for n in set(self._sent) - set(nodes):  # no valid reply: what it holds is unknown
            self.node_version.pop(n, None)
        self._sent = {}
        if len(updates) < self.min_train_nodes:
            log(WARNING, "round %d: %d valid replies, fewer than strategy.min_train_clients=%d; "
                "the global model is unchanged", server_round, len(updates),
                self.min_train_nodes)
            return None, None
        if self.rule.aggregation == "fedld":
            agg = fedld_aggregate(updates, counts, first_round=server_round == 1,
                                  buffer_names=self.buffer_names,
                                  k_proportion=self.rule.k_proportion, eps=self.rule.eigen_eps)
        else:
            agg = mean_rule(updates, counts)
        if self.tracks_client_states:  # theta_k = theta_g + Delta_k, for the diagnostic
            self._client_states = [(n, apply_update(self.theta, u, 1.0,
                                                    buffer_names=self.buffer_names))
                                   for n, u in zip(nodes, updates)]
        step = self.momentum.step(agg, skip=self.buffer_names)
        self.theta = apply_update(self.theta, step, self.rule.server_lr,
                                  buffer_names=self.buffer_names)
        self._apply_mask()
        if self.policy is not None:
            self.policy.observe(updates, counts)
        total = sum(counts)
        metrics = MetricRecord({
            contract.NUM_EXAMPLES: total,
            contract.TRAIN_LOSS: sum(l_ * c for l_, c in zip(losses, counts)) / total,
        })
        return ArrayRecord(self.theta), metrics

    def client_states(self) -> list[ClientState]:
        """(node id, full model state) of the last round's accepted clients."""
        return list(self._client_states)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.evaluate_fraction <= 0.0:
            return []
        content = RecordDict({contract.ARRAYS: arrays, contract.CONFIG: config})
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in self.sample(server_round, salt=1)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None
        metrics = [r.content[contract.METRICS] for r in ok]
        total = sum(int(m[contract.NUM_EXAMPLES]) for m in metrics)
        acc = sum(float(m[contract.EVAL_ACCURACY]) * int(m[contract.NUM_EXAMPLES])
                  for m in metrics) / max(1, total)
        return MetricRecord({contract.EVAL_ACCURACY: acc, contract.NUM_EXAMPLES: total})

    def observe_evaluation(self, server_round: int, loss: float, accuracy: float) -> None:
        if self.policy is not None:
            self.policy.observe_evaluation(server_round, loss, accuracy)

    def evaluation_steers_next_round(self) -> bool:
        # only while the schedule waits for the loss to fall (pruning.start_when=improved)
        return self.policy is not None and self.policy.start_round is None

    def clients_keep_state(self) -> bool:
        # a pruned model's clients hold their mask between rounds (wire.decode reads the
        # values against it); without a policy no mask is ever sent (FedLD)
        return self.policy is not None

    def guidance_scores(self) -> dict[str, torch.Tensor] | None:
        return self.policy.guidance_scores() if self.policy is not None else None

    def round_info(self) -> dict[str, Any]:
        """What the round record shows beside accuracy: density, units, FLOPs."""
        info: dict[str, Any] = {"density": round(self.density(), 6),
                                "mask_version": self.mask_version,
                                "flops_per_example": self.view.flops}
        if self.view.sparse_flops is not None:
            info["sparse_flops_per_example"] = self.view.sparse_flops
        if self.groups:
            info["kept_units"] = " ".join(f"{g.name}:{len(self.structure[g.name])}/{g.n_units}"
                                          for g in self.groups)
        return info

    def summary(self) -> None:
        log(INFO, "\t├──> %s: aggregation %s, server lr %s, momentum %s, policy %s",
            type(self).__name__, self.rule.aggregation, self.rule.server_lr,
            self.momentum.beta, self.policy.name if self.policy else "none")

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (checkpoints): model, masks, momentum, policy.

        Which mask each node holds is not saved: a resumed federation starts
        with fresh node state, so every node receives the mask again.
        """
        return {"theta": self.theta, "masks": self.masks, "weight_masks": self.weight_masks,
                "structure": self.structure, "mask_version": self.mask_version,
                "momentum": self.momentum.state_dict(),
                "policy": self.policy.state_dict() if self.policy else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.theta = dict(state["theta"])
        self.masks, self.weight_masks = dict(state["masks"]), dict(state["weight_masks"])
        self.structure, self.mask_version = dict(state["structure"]), int(state["mask_version"])
        self.momentum.load_state_dict(state["momentum"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.node_version = {}
        self.view = self._make_view()

    def structure_json(self) -> str | None:
        """The kept units (what `bonsai export` needs to rebuild the small model)."""
        return structure_to_json(self.structure) if self.groups else None
