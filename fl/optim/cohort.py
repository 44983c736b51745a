"""CohortSGD and CohortAdamW: K clients' masked optimizers over one stacked ``[K, size]``
buffer, one fused launch per step (fl/optim/__init__.py; used by fl/cohort.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fl.kernels import BACKENDS, masked_adamw_step, masked_sgd_step, quantile, use_triton
from fl.optim.flat import padded
from fl.optim.hyper import check_adamw, check_sgd

__all__ = ["CohortAdamW", "CohortOptimizer", "CohortSGD"]


class CohortOptimizer:
    """Shared machinery of the cohort optimizers: ``[K, size]`` buffers whose rows are
    laid out as a single-client ``FlatBuffers`` (same order, same padding), masks, anchors,
    clipping and the per-client ``active`` flags.

    Not a ``torch.optim.Optimizer``: its parameters are stacked tensors that belong to
    no module, and its gradients come from ``torch.func`` rather than ``.grad``
    (:meth:`set_grads`).
    """

    _state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float | Sequence[float],
        prox_mu: float,
        clip_value: float | Sequence[float] | None,
        clip_quantile: float | None,
        masks: Sequence[torch.Tensor | None] | None,
        backend: str,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        params = list(params)
        if not params:
            raise ValueError("params: expected at least one stacked [K, *shape] tensor")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or p.dim() < 1:
                raise ValueError(f"params: entry {i} is not a stacked [K, *shape] tensor")
            if p.dtype != torch.float32:
                raise ValueError(f"params: expected float32 parameters, got {p.dtype} for "
                                 f"parameter {i}")  # fmt: skip
            if p.shape[0] != params[0].shape[0] or p.device != params[0].device:
                raise ValueError(
                    f"params: entry {i} is {tuple(p.shape)} on {p.device}; every entry needs "
                    f"the same leading client axis ({params[0].shape[0]}) and device"
                )
        self.rows = int(params[0].shape[0])
        if self.rows == 0:
            raise ValueError("params: the leading client axis is empty (no clients)")
        self.device = params[0].device
        self.shapes = [tuple(p.shape[1:]) for p in params]
        bounds = [0]
        for p in params:
            bounds.append(bounds[-1] + p[0].numel())
        self.bounds = bounds
        self.n = bounds[-1]
        self.size = padded(self.n)
        self.lr = self._per_client("lr", lr)
        if not all(v >= 0 for v in self.lr):
            raise ValueError(f"lr: expected non-negative floats, got {self.lr!r}")
        if not isinstance(prox_mu, int | float) or prox_mu < 0:
            raise ValueError(f"prox_mu: expected a non-negative float, got {prox_mu!r}")
        if clip_value is not None and clip_quantile is not None:
            raise ValueError("clip_quantile: give clip_value or clip_quantile, not both")
        self.clip_value = None if clip_value is None else self._per_client("clip_value", clip_value)
        if self.clip_value is not None and not all(c > 0 for c in self.clip_value):
            raise ValueError(f"clip_value: expected positive floats, got {clip_value!r}")
        if clip_quantile is not None and not (
            isinstance(clip_quantile, int | float) and 0 < clip_quantile <= 1
        ):
            raise ValueError(f"clip_quantile: expected a float in (0, 1], got {clip_quantile!r}")
        self.prox_mu = float(prox_mu)
        self.clip_quantile = clip_quantile
        self.backend = backend
        self.triton = use_triton(backend, self.device)
        self.param = self._zeros()
        self.grad = self._zeros()
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.view(self.param, i)
                view.copy_(p)
                p.data = view
        self.params = params  #: the stacked parameters, now views of :attr:`param`
        self.mask: torch.Tensor | None = None
        # FedProx anchor: the weights the round started from (before masking, as MaskedSGD)
        self.anchor: torch.Tensor | None = self.param.clone() if self.prox_mu != 0 else None
        self.state: dict[str, torch.Tensor] = {k: self._zeros() for k in self._state_keys}
        self._workspace: torch.Tensor | None = None
        if masks is not None:
            self.set_masks(masks)

    def _per_client(self, name: str, value: object) -> list[float]:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a float or {self.rows} floats, got {value!r}")
        if isinstance(value, int | float):
            return [float(value)] * self.rows
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if not isinstance(value, Sequence) or len(value) != self.rows or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{name}: expected a float or {self.rows} floats (one per client), "
                             f"got {value!r}")  # fmt: skip
        return [float(v) for v in value]

    def _zeros(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(self.rows, self.size, dtype=dtype, device=self.device)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s ``[K, *shape]`` view of a ``[K, size]`` buffer."""
        return flat[:, self.bounds[i] : self.bounds[i + 1]].view(self.rows, *self.shapes[i])

    def _check_per_param(self, name: str, items: object) -> list:
        count = len(self.shapes)
        if items is None or isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
            raise ValueError(f"{name}: expected a sequence with one entry per parameter ({count})")
        if len(items) != count:
            raise ValueError(f"{name}: expected {count} entries (one per parameter), "
                             f"got {len(items)}")  # fmt: skip
        for i, t in enumerate(items):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: entry {i} is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) not in (self.shapes[i], (self.rows, *self.shapes[i])):
                raise ValueError(
                    f"{name}: entry {i} has shape {tuple(t.shape)}; allowed: "
                    f"{(self.rows, *self.shapes[i])} (one per client) or {self.shapes[i]} (shared)"
                )
            if t.device != self.device:
                raise ValueError(f"{name}: entry {i} is on {t.device}, parameters on {self.device}")
        return list(items)

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """One mask per parameter: ``[K, *shape]`` (one per client), ``[*shape]`` (shared)
        or None (dense); bool or 0/1. Pruned entries and their state are zeroed now and
        stay 0."""
        masks = self._check_per_param("masks", masks)
        for i, m in enumerate(masks):
            if m is not None and m.dtype != torch.bool:
                bad = int(((m != 0) & (m != 1)).sum())
                if bad:
                    raise ValueError(f"masks: entry {i} has {bad} entries that are not 0 or 1")
        if all(m is None for m in masks) and self.mask is None:
            return
        if self.mask is None:
            self.mask = self._zeros(torch.uint8 if self.triton else torch.float32)
            self.mask[:, : self.n] = 1  # the padding stays masked
        for i, m in enumerate(masks):
            view = self.view(self.mask, i)
            if m is None:
                view.fill_(1)
            else:
                view.copy_(m.expand_as(view))
        keep = self.mask if self.mask.dtype == torch.float32 else self.mask.float()
        self.param.mul_(keep)
        for buf in self.state.values():
            buf.mul_(keep)

    @torch.no_grad()
    def set_anchor(self, tensors: Sequence[torch.Tensor]) -> None:
        """The FedProx anchors ``w_global``: per parameter ``[K, *shape]`` or shared."""
        tensors = self._check_per_param("tensors", tensors)
        if any(t is None for t in tensors):
            raise ValueError("tensors: every parameter needs an anchor (got None)")
        if self.anchor is None:
            self.anchor = self._zeros()
        for i, t in enumerate(tensors):
            view = self.view(self.anchor, i)
            view.copy_(t.expand_as(view))

    @torch.no_grad()
    def set_grads(self, grads: Sequence[torch.Tensor], rows: torch.Tensor | None = None) -> None:
        """Write stacked gradients (one ``[K, *shape]`` or, with ``rows``, ``[len(rows),
        *shape]`` tensor per parameter) into the flat gradient buffer in one copy."""
        count = rows.numel() if rows is not None else self.rows
        parts = [g.reshape(count, -1) for g in grads]
        if self.size > self.n:
            parts.append(torch.zeros(count, self.size - self.n, dtype=torch.float32,
                                     device=self.device))  # fmt: skip
        if rows is None:
            torch.cat(parts, dim=1, out=self.grad)
        else:
            self.grad.index_copy_(0, rows, torch.cat(parts, dim=1))

    def zero_grad(self) -> None:
        self.grad.zero_()

    def _active(self, active: Sequence[bool] | torch.Tensor | None) -> list[bool] | None:
        if active is None:
            return None
        flags = active.tolist() if isinstance(active, torch.Tensor) else list(active)
        if len(flags) != self.rows:
            raise ValueError(f"active: expected {self.rows} flags (one per client), "
                             f"got {len(flags)}")  # fmt: skip
        return [bool(a) for a in flags]

    def _clip(self, active: list[bool] | None) -> list | None:
        """Per-client clip bounds: the values given, or each active client's
        ``clip_quantile``-quantile of ``|g|`` over its kept entries (as MaskedSGD)."""
        if self.clip_value is not None:
            return self.clip_value
        if self.clip_quantile is None:
            return None
        bounds: list = []
        for r in range(self.rows):
            if active is not None and not active[r]:
                bounds.append(0.0)
                continue
            g = self.grad[r, : self.n].abs()
            if self.mask is not None:
                g = g.masked_select(self.mask[r, : self.n] != 0)
            bounds.append(quantile(g, float(self.clip_quantile), backend=self.backend)
                          if g.numel() else 0.0)  # fmt: skip
        if any(isinstance(b, torch.Tensor) for b in bounds):
            return torch.stack([torch.as_tensor(b, dtype=torch.float32, device=self.device)
                                for b in bounds])  # fmt: skip
        return bounds

    def _scratch(self, rows: int) -> torch.Tensor:
        if self._workspace is None or self._workspace.shape[0] < rows:
            self._workspace = torch.empty(rows, self.size, dtype=torch.float32,
                                          device=self.device)  # fmt: skip
        return self._workspace

    def row_state(self, k: int) -> list[dict[str, torch.Tensor]]:
        """Client ``k``'s per-parameter state, torch.optim's keys (views)."""
        return [{key: self.view(buf, i)[k] for key, buf in self.state.items()}
                for i in range(len(self.shapes))]  # fmt: skip


class CohortSGD(CohortOptimizer):
    """MaskedSGD for K clients at once, over stacked ``[K, *shape]`` parameters.

    Parameters
    ----------
    params : sequence of fp32 ``[K, *shape]`` tensors (re-pointed into one ``[K, size]``
        buffer, as MaskedSGD does with a model's parameters)
    lr : float, or K floats (one per client)
    momentum, weight_decay, nesterov, prox_mu, clip_quantile : as :class:`MaskedSGD`
    clip_value : float, K floats, or None
    masks : one entry per parameter, ``[K, *shape]``, ``[*shape]`` (shared) or None
    backend : "auto" | "torch" | "triton"
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float | Sequence[float],
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        prox_mu: float = 0.0,
        clip_value: float | Sequence[float] | None = None,
        clip_quantile: float | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        check_sgd(momentum, nesterov, weight_decay)
        self._state_keys = ("momentum_buffer",) if momentum != 0 else ()
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        super().__init__(params, lr, prox_mu, clip_value, clip_quantile, masks, backend)
        # the kernel reads the rates from the device: copied there once, not every step
        self._lr_dev = torch.tensor(self.lr, device=self.device) if self.triton else None

    @torch.no_grad()
    def step(self, active: Sequence[bool] | torch.Tensor | None = None) -> None:
        """One fused masked step of every client whose ``active`` flag is on (all: None)."""
        flags = self._active(active)
        needs_ws = not self.triton
        masked_sgd_step(
            self.param, self.grad, self.state.get("momentum_buffer"), self.mask, self.anchor,
            lr=self._lr_dev if self._lr_dev is not None else self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, nesterov=self.nesterov, prox_mu=self.prox_mu,
            clip=self._clip(flags), active=flags,
            workspace=self._scratch(2 if self.prox_mu != 0 else 1) if needs_ws else None,
            backend=self.backend, check_mask_values=False,
        )  # fmt: skip


class CohortAdamW(CohortOptimizer):
    """MaskedAdamW for K clients at once, over stacked ``[K, *shape]`` parameters; each
    client keeps its own step count (bias correction), advanced when it is active.

    Parameters: as :class:`CohortSGD`, with ``betas``, ``eps``, ``weight_decay`` as
    :class:`MaskedAdamW`.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float | Sequence[float] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        prox_mu: float = 0.0,
        clip_value: float | Sequence[float] | None = None,
        clip_quantile: float | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        self.betas = check_adamw(betas, eps, weight_decay)
        self.eps, self.weight_decay = eps, weight_decay
        super().__init__(params, lr, prox_mu, clip_value, clip_quantile, masks, backend)
        self.steps = [0] * self.rows  #: each client's step count

    @torch.no_grad()
    def step(self, active: Sequence[bool] | torch.Tensor | None = None) -> None:
        """One fused masked step of every client whose ``active`` flag is on (all: None)."""
        flags = self._active(active)
        for r in range(self.rows):
            if flags is None or flags[r]:
                self.steps[r] += 1
        beta1, beta2 = self.betas
        masked_adamw_step(
            self.param, self.grad, self.state["exp_avg"], self.state["exp_avg_sq"], self.mask,
            self.anchor, step=self.steps, lr=self.lr, beta1=beta1, beta2=beta2, eps=self.eps,
            weight_decay=self.weight_decay, prox_mu=self.prox_mu, clip=self._clip(flags),
            active=flags,
            workspace=None if self.triton else self._scratch(3 if self.prox_mu != 0 else 2),
            backend=self.backend, check_mask_values=False,
        )  # fmt: skip

    def row_state(self, k: int) -> list[dict[str, torch.Tensor]]:
        """Client ``k``'s per-parameter state with torch.optim's keys, ``step`` included."""
        step = torch.tensor(float(self.steps[k]), device="cpu")
        return [{**st, "step": step} for st in super().row_state(k)]
