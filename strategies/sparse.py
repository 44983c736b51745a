"""A strategy that owns the global model and speaks Bonsai's wire format.

FedLD, AutoFLIP and the pruning baselines share it:

- the server keeps the full model theta_g (zeros where pruned), the mask
  (kept units + unstructured zeros) and its version;
- each sampled client receives the physically smaller model as the values of
  its kept entries (fl/wire), the mask only when its copy is stale;
- clients reply with their update Delta_k on kept entries only;
- the server decodes and validates every reply (a bad one is dropped with the
  reason logged), expands updates to full shapes, aggregates them with the
  configured rule (weighted mean or FedLD's principal gradient), applies
  server momentum and learning rate, and re-applies the mask;
- an optional :class:`~strategies.mask_policy.MaskPolicy` recomputes the mask
  on its schedule (AutoFLIP: from the guidance; baselines: |w| or random).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fl import contract as k
from fl import wire
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
from strategies.mask_policy import AutoFLIPPolicy, MaskPolicy
from strategies.seeded import Population

_EXPLORE_SALT = 2


class SparseStrategy(Population, Strategy):
    """Server-side model, masks and wire format; see the module docstring.

    Parameters
    ----------
    model_name, input_shape, num_classes : the registry model (fl.models)
    initial_state : theta_0 as a state dict
    aggregation : "mean" | "fedld"
    server_lr, server_momentum : theta <- theta + lr * (momentum-smoothed aggregate)
    k_proportion, eigen_eps : FedLD principal-gradient settings (ALGORITHMS.md 2.3)
    policy : a MaskPolicy, or None for an unpruned model (FedLD)
    quantize : send kept values as per-block int8 (fl/wire)
    proximal_mu : sent to clients (FedProx term), 0 = off
    explore_fraction, explore_epochs : AutoFLIP's exploration phase
    min_train_nodes, seed, sample_fraction : seeded sampling (strategies.seeded)
    """

    def __init__(
        self, *, model_name: str, input_shape: tuple[int, ...], num_classes: int,
        initial_state: Mapping[str, torch.Tensor], aggregation: str = "mean",
        server_lr: float = 1.0, server_momentum: float = 0.0, k_proportion: float = 0.8,
        eigen_eps: float = 1e-8, policy: MaskPolicy | None = None, quantize: bool = False,
        proximal_mu: float = 0.0, explore_fraction: float = 1.0, explore_epochs: int = 1,
        min_train_nodes: int = 2, seed: int = 0, sample_fraction: float = 1.0,
        evaluate_fraction: float = 0.0,
    ) -> None:
        super().__init__(seed=seed, sample_fraction=sample_fraction,
                         evaluate_fraction=evaluate_fraction)
        if aggregation not in ("mean", "fedld"):
            raise ValueError(f"aggregation: got {aggregation!r}; allowed: mean, fedld")
        self.min_train_nodes = min_train_nodes
        self.model_name, self.input_shape, self.num_classes = model_name, input_shape, num_classes
        self.theta = {n: t.detach().clone() for n, t in initial_state.items()}
        model = build_model(model_name, input_shape, num_classes)
        self.buffer_names = {n for n, _ in model.named_buffers()}
        self.prunable = prunable_names(model)
        self.groups = groups_for(model_name, input_shape, num_classes) if policy else []
        self.aggregation, self.server_lr = aggregation, server_lr
        self.k_proportion, self.eigen_eps = k_proportion, eigen_eps
        self.momentum = ServerMomentum(server_momentum)
        self.policy, self.quantize, self.proximal_mu = policy, quantize, proximal_mu
        self.explore_fraction, self.explore_epochs = explore_fraction, explore_epochs
        # the current view: structure (kept units), masks (full shapes), version
        self.structure = full_structure(self.groups)
        self.masks: dict[str, torch.Tensor] = {}
        self.weight_masks: dict[str, torch.Tensor] = {}
        self.mask_version = 0
        #: mask version each node holds: set from a valid reply, dropped on a failed one
        self.node_version: dict[int, int] = {}
        self._sent: dict[int, int] = {}  # this round's nodes -> mask version sent
        self._view: dict[str, Any] = {}
        self._last_round: tuple[dict[str, torch.Tensor], list[tuple[int, dict]]] | None = None
        self.keep_client_states = False  # set by the server for the loss decomposition
        self._refresh_view()

    # --- the view the clients train ---------------------------------------------------
    def _refresh_view(self) -> None:
        """Recompute the small model's state, masks, payloads and FLOPs after a change."""
        small = shrink_state(self.theta, self.groups, self.structure) if self.groups else {
            n: t.clone() for n, t in self.theta.items()}
        small_masks = (shrink_state(self.weight_masks, self.groups, self.structure)
                       if self.weight_masks else {})
        model = (shrink_model(self.model_name, self.input_shape, self.num_classes,
                              self.structure) if self.groups
                 else build_model(self.model_name, self.input_shape, self.num_classes))
        self._view = {
            "small_shapes": {n: tuple(t.shape) for n, t in small.items()},
            "small_masks": small_masks,
            "model": model,
            "flops": count_flops(model, self.input_shape),
            "sparse_flops": (sparse_flops(model, small_masks, self.input_shape)
                             if small_masks else None),
        }

    def _payload(self, send_mask: bool) -> bytes:
        """The current small model on the wire: with the mask, or against the mask the
        node already holds (the same bytes when nothing is masked)."""
        small = (shrink_state(self.theta, self.groups, self.structure) if self.groups
                 else self.theta)
        return wire.encode(small, masks=self._view["small_masks"] or None,
                           mask_version=self.mask_version, send_mask=send_mask,
                           quantize=self.quantize)

    def _recompute_mask(self, server_round: int) -> None:
        assert self.policy is not None
        s_ratio, u_ratio = self.policy.targets(server_round)
        plan = plan_masks(self.policy.scores(self.theta, server_round), self.groups, self.theta,
                          structured_ratio=s_ratio, unstructured_ratio=u_ratio,
                          min_units=self.policy.cfg.min_units, previous=self.structure)
        self.structure, self.masks, self.weight_masks = (plan.structure, plan.masks,
                                                         plan.weight_masks)
        self.mask_version += 1
        self._apply_mask()
        self._refresh_view()
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

    # --- exploration (AutoFLIP) -----------------------------------------------------
    def prepare(self, grid: Grid, timeout: float) -> dict[str, Any]:
        """Run the exploration phase when the policy needs one; returns its cost."""
        if not (isinstance(self.policy, AutoFLIPPolicy) and self.policy.guidance is None):
            return {}
        nodes = self._sample_explorers()
        payload = self._payload(send_mask=True)
        config = ConfigRecord({k.PHASE: k.PHASE_EXPLORE, k.LOCAL_EPOCHS: self.explore_epochs,
                               k.SERVER_ROUND: 0})
        content = RecordDict({k.PAYLOAD: wire.to_record(payload), k.CONFIG: config})
        msgs = [Message(content, dst_node_id=n,
                        message_type=f"{MessageType.TRAIN}.{k.EXPLORE_ACTION}") for n in nodes]
        replies = self.order(grid.send_and_receive(msgs, timeout=timeout))
        down = wire.message_nbytes(content) * len(msgs)
        up = sum(wire.message_nbytes(r.content) for r in replies if not r.has_error())
        deviations, counts, flops = [], [], 0
        shapes = {n: tuple(self.theta[n].shape) for n in self.prunable}
        for r in replies:
            dev, reason = self._decode(r, shapes, known=None)
            if dev is None:
                log(WARNING, "exploration reply from node %d rejected: %s",
                    r.metadata.src_node_id, reason)
                continue
            deviations.append(dev)
            counts.append(int(r.content[k.METRICS][k.NUM_EXAMPLES]))
            flops += int(r.content[k.METRICS].get(k.TRAIN_FLOPS, 0))
        if not deviations:
            raise RuntimeError("AutoFLIP exploration: no explorer replied with a valid update")
        self.policy.start(deviations, counts)
        log(INFO, "exploration: %d explorers, guidance built", len(deviations))
        return {"explorers": len(deviations), "train_flops": flops, "bytes_down": down,
                "bytes_up": up}

    def _sample_explorers(self) -> list[int]:
        from fl.sampling import sample_clients

        return sample_clients(self.population, self.explore_fraction, 1, self.seed, 0,
                              _EXPLORE_SALT)

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
            conf = ConfigRecord({**dict(config), k.SERVER_ROUND: server_round,
                                 k.PHASE: k.PHASE_TRAIN, k.MASK_VERSION: self.mask_version,
                                 k.PROXIMAL_MU: self.proximal_mu})
            if fresh and self.groups:
                conf[k.STRUCTURE] = structure_to_json(self.structure)
            records[fresh] = RecordDict({
                k.PAYLOAD: wire.to_record(self._payload(send_mask=fresh)), k.CONFIG: conf})
        msgs = []
        for n in nodes:
            fresh = self.node_version.get(n) != self.mask_version
            msgs.append(Message(records[fresh], dst_node_id=n, message_type=MessageType.TRAIN))
        # a node holds this version once it has replied with an update against it: one
        # that stalled, crashed or restarted gets the mask again (aggregate_train)
        self._sent = {n: self.mask_version for n in nodes}
        return msgs

    def _decode(self, reply: Message, shapes: Mapping[str, tuple[int, ...]],
                known: Mapping[str, torch.Tensor] | None
                ) -> tuple[dict[str, torch.Tensor] | None, str]:
        """A reply's update (decoded, checked), or None and the reason."""
        if reply.has_error():
            return None, f"client error: {reply.error.reason}"
        try:
            if k.METRICS not in reply.content or k.NUM_EXAMPLES not in reply.content[k.METRICS]:
                return None, f"no {k.NUM_EXAMPLES} metric"
            data = wire.from_record(reply.content[k.PAYLOAD])
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
        shapes = self._view["small_shapes"]
        known = self._view["small_masks"] or None
        updates, counts, losses, nodes = [], [], [], []
        for r in self.order(replies):
            upd, reason = self._decode(r, shapes, known)
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
            counts.append(int(r.content[k.METRICS][k.NUM_EXAMPLES]))
            losses.append(float(r.content[k.METRICS].get(k.TRAIN_LOSS, float("nan"))))
        for n in set(self._sent) - set(nodes):  # no valid reply: what it holds is unknown
            self.node_version.pop(n, None)
        self._sent = {}
        if len(updates) < self.min_train_nodes:
            log(WARNING, "round %d: %d valid replies, fewer than strategy.min_train_clients=%d; "
                "the global model is unchanged", server_round, len(updates),
                self.min_train_nodes)
            return None, None
        if self.aggregation == "fedld":
            agg = fedld_aggregate(updates, counts, first_round=server_round == 1,
                                  buffer_names=self.buffer_names, k_proportion=self.k_proportion,
                                  eps=self.eigen_eps)
        else:
            agg = mean_rule(updates, counts)
        if self.keep_client_states:  # theta_k = theta_g + Delta_k, for the diagnostic
            self._last_round = (self.theta, list(zip(nodes, updates)))
        step = self.momentum.step(agg, skip=self.buffer_names)
        self.theta = apply_update(self.theta, step, self.server_lr,
                                  buffer_names=self.buffer_names)
        self._apply_mask()
        if self.policy is not None:
            self.policy.observe(updates, counts)
        total = sum(counts)
        metrics = MetricRecord({
            k.NUM_EXAMPLES: total,
            k.TRAIN_LOSS: sum(l_ * c for l_, c in zip(losses, counts)) / total,
        })
        return ArrayRecord(self.theta), metrics

    def client_states(self, replies: Iterable[Message]) -> list[tuple[int, dict]]:
        """(node id, full model state) of the last round's accepted clients."""
        if self._last_round is None:
            return []
        theta, updates = self._last_round
        return [(n, apply_update(theta, u, 1.0, buffer_names=self.buffer_names))
                for n, u in updates]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.evaluate_fraction <= 0.0:
            return []
        content = RecordDict({k.ARRAYS: arrays, k.CONFIG: config})
        return [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in self.sample(server_round, salt=1)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None
        total = sum(int(r.content[k.METRICS][k.NUM_EXAMPLES]) for r in ok)
        acc = sum(float(r.content[k.METRICS][k.EVAL_ACCURACY])
                  * int(r.content[k.METRICS][k.NUM_EXAMPLES]) for r in ok) / max(1, total)
        return MetricRecord({k.EVAL_ACCURACY: acc, k.NUM_EXAMPLES: total})

    def round_info(self) -> dict[str, Any]:
        """What the round record shows beside accuracy: density, units, FLOPs."""
        info: dict[str, Any] = {"density": round(self.density(), 6),
                                "mask_version": self.mask_version,
                                "flops_per_example": self._view["flops"]}
        if self._view["sparse_flops"] is not None:
            info["sparse_flops_per_example"] = self._view["sparse_flops"]
        if self.groups:
            info["kept_units"] = " ".join(f"{g.name}:{len(self.structure[g.name])}/{g.n_units}"
                                          for g in self.groups)
        return info

    def summary(self) -> None:
        log(INFO, "\t├──> %s: aggregation %s, server lr %s, momentum %s, policy %s",
            type(self).__name__, self.aggregation, self.server_lr, self.momentum.beta,
            self.policy.name if self.policy else "none")

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (checkpoints): model, masks, momentum, policy.

        Which mask each node holds is not saved: a resumed federation starts
        with fresh node state, so every node receives the mask again.
        """
        return {"theta": self.theta, "masks": self.masks, "weight_masks": self.weight_masks,
                "structure": self.structure, "mask_version": self.mask_version,
                "momentum": self.momentum.state_dict(),
                "policy": self.policy.state_dict() if self.policy else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = dict(state["theta"])
        self.masks, self.weight_masks = dict(state["masks"]), dict(state["weight_masks"])
        self.structure, self.mask_version = dict(state["structure"]), int(state["mask_version"])
        self.momentum.load_state_dict(state["momentum"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.node_version = {}
        self._refresh_view()

    def structure_json(self) -> str:
        """The kept units (what `bonsai export` needs to rebuild the small model)."""
        return structure_to_json(self.structure)
