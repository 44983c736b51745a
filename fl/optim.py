"""Masked optimizers on flat buffers: MaskedSGD and MaskedAdamW.

AutoFLIP's local training is masked (ALGORITHMS.md 1.3): a pruned entry stays
exactly 0, and neither its gradient nor its optimizer state moves it. Both
optimizers here are ``torch.optim.Optimizer`` subclasses usable in plain
PyTorch code. At construction every parameter, its gradient, its optimizer
state and its mask become views into one contiguous fp32 buffer per (param
group, device), so a step is one fused Triton launch on CUDA
(fl/kernels/sgd.py, fl/kernels/adamw.py) or a few vectorised torch ops on
the whole model on CPU.

What the flat buffers change for the caller:

- ``p.data`` is re-pointed into the flat buffer (in-place writes such as
  ``load_state_dict`` on the model land there; moving the model to another
  device after building the optimizer is not supported, as with torch).
- ``p.grad`` is a view into the flat gradient buffer and ``zero_grad`` zeroes
  it in place (``set_to_none`` is accepted and ignored). A gradient replaced
  by other code (e.g. ``model.zero_grad()`` then ``backward``) is copied
  back into the buffer at the next step; a parameter whose gradient is None
  is stepped with a zero gradient (decay and momentum still act on it),
  where torch would skip it.
- Pruned entries stay 0 because ``set_masks`` zeroes them and their state,
  and the fused step multiplies the update direction by the mask.

With masks all ones (or None) and the options off, a CPU step matches
torch.optim.SGD bitwise, and torch.optim.AdamW to about an ulp per step (the
reference runs torch's fused AdamW kernel on the flat buffer; where that
kernel is missing it runs torch's single-tensor op sequence, bitwise equal to
AdamW(foreach=False)). See tests/test_optim.py for the tolerances and why.

CohortSGD and CohortAdamW are the same optimizers for a cohort of K clients
trained together (fl/cohort.py): every parameter is a stacked ``[K, *shape]``
tensor, the buffers are ``[K, size]`` (the same padding to 16 entries per row),
and one step is one stacked fused launch (fl/kernels: per-client learning rate,
mask, anchor, clip bound and step count; clients whose ``active`` flag is off
keep their parameters and state exactly). Row ``k`` equals what MaskedSGD /
MaskedAdamW would hold after the same gradients: bitwise with the reference
backend, and with Triton as well (tests/test_cohort_optim.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fl.kernels._dispatch import BACKENDS, use_triton
from fl.kernels.adamw import (
    masked_adamw_step,
    masked_adamw_step_reference,
    masked_adamw_step_triton,
)
from fl.kernels.select import quantile
from fl.kernels.sgd import masked_sgd_step, masked_sgd_step_reference, masked_sgd_step_triton

__all__ = ["CohortAdamW", "CohortSGD", "MaskedAdamW", "MaskedSGD"]


class _Flat:
    """The flat buffers of the parameters of one param group on one device."""

    def __init__(self, group_index: int, params: list[torch.Tensor], backend: str) -> None:
        self.group_index = group_index  # groups are replaced by load_state_dict: look up
        self.params = params
        self.device = params[0].device
        self.triton = use_triton(backend, self.device)
        self.numels = [p.numel() for p in params]
        bounds = [0]
        for k in self.numels:
            bounds.append(bounds[-1] + k)
        self.bounds = bounds
        self.n = bounds[-1]  # entries that belong to parameters
        # Every buffer is padded with zeros (mask 0) to a multiple of 16 entries: Triton
        # vectorises the bounds-checked loads of a kernel only when the length is such a
        # multiple (the SGD step over 50M entries on an H200: 79% of copy bandwidth with
        # n % 16 = 14, 96% with 0; benchmarks/kernels.py --sweep-launch). A zero entry
        # with no gradient stays zero under every option of both optimizers.
        self.size = -(-self.n // 16) * 16
        self.param = self.zeros()
        self.grad = self.zeros()
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.view(self.param, i)
                view.copy_(p)
                p.data = view
                if p.grad is not None:
                    self.view(self.grad, i).copy_(p.grad)
                p.grad = self.view(self.grad, i)
        self.mask: torch.Tensor | None = None
        self.anchor: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.workspace: torch.Tensor | None = None

    def zeros(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zero flat buffer of the padded size."""
        return torch.zeros(self.size, dtype=dtype, device=self.device)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.bounds[i] : self.bounds[i + 1]].view(self.params[i].shape)

    def sync_grads(self) -> None:
        """Make every ``p.grad`` a view of the flat gradient again (copying if replaced)."""
        base = self.grad.data_ptr()
        for i, p in enumerate(self.params):
            g = p.grad
            if g is not None and g.data_ptr() == base + 4 * self.bounds[i] and g.is_contiguous():
                continue
            view = self.view(self.grad, i)
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view

    def ensure_state(self, keys: Sequence[str]) -> None:
        for key in keys:
            if key not in self.state:
                self.state[key] = self.zeros()

    def scratch(self, rows: int) -> torch.Tensor:
        if self.workspace is None or self.workspace.shape[0] < rows:
            self.workspace = torch.empty(rows, self.size, dtype=torch.float32, device=self.device)
        return self.workspace

    def apply_mask(self) -> None:
        """Zero the pruned entries of the parameters and of every state buffer."""
        if self.mask is None:
            return
        keep = self.mask if self.mask.dtype == torch.float32 else self.mask.float()
        self.param.mul_(keep)
        for buf in self.state.values():
            buf.mul_(keep)


def _check_masks_arg(name: str, items: Sequence[Any] | None, count: int) -> Sequence[Any]:
    if items is None or isinstance(items, torch.Tensor) or not isinstance(items, Sequence):
        raise ValueError(f"{name}: expected a sequence with one entry per parameter ({count})")
    if len(items) != count:
        raise ValueError(f"{name}: expected {count} entries (one per parameter), got {len(items)}")
    return items


class _MaskedOptimizer(torch.optim.Optimizer):
    """Shared machinery: flat buffers, masks, anchor, clipping, state round trips."""

    _state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        masks: Sequence[torch.Tensor | None] | None,
        backend: str,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self._backend = backend
        self._flats: list[_Flat] = []
        super().__init__(params, defaults)
        for flat in self._flats:  # FedProx anchor: the weights the round started from
            if self.param_groups[flat.group_index]["prox_mu"] != 0:
                flat.anchor = flat.param.clone()
        if masks is not None:
            self.set_masks(masks)

    # --- construction ----------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            if p.dtype != torch.float32:
                raise ValueError(
                    f"params: expected float32 parameters, got {p.dtype} for parameter {i} "
                    "(fp32 master weights are required; fp16/bf16 gradients are accepted)"
                )
            if p.is_sparse:
                raise ValueError(f"params: parameter {i} is sparse")
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in group["params"]:
            by_device.setdefault(p.device, []).append(p)
        for params in by_device.values():
            self._flats.append(_Flat(len(self.param_groups) - 1, params, self._backend))

    def _check_group(self, group: dict[str, Any]) -> None:
        merged = {**self.defaults, **group}
        for key in ("lr", "weight_decay", "prox_mu"):
            value = merged.get(key)
            if isinstance(value, torch.Tensor):
                value = float(value)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key}: expected a non-negative float, got {value!r}")
        clip_value, clip_q = merged.get("clip_value"), merged.get("clip_quantile")
        if clip_value is not None and clip_q is not None:
            raise ValueError("clip_quantile: give clip_value or clip_quantile, not both")
        if clip_value is not None and not (isinstance(clip_value, int | float) and clip_value > 0):
            raise ValueError(f"clip_value: expected a positive float, got {clip_value!r}")
        if clip_q is not None and not (isinstance(clip_q, int | float) and 0 < clip_q <= 1):
            raise ValueError(f"clip_quantile: expected a float in (0, 1], got {clip_q!r}")

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _locate(self) -> dict[int, tuple[_Flat, int]]:
        return {id(p): (flat, i) for flat in self._flats for i, p in enumerate(flat.params)}

    # --- masks and anchor -------------------------------------------------------

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Set one mask per parameter (bool or 0/1 tensor shaped like it, or None = dense).

        Pruned parameters and their optimizer state are zeroed now and stay 0.
        """
        params = self._all_params()
        masks = _check_masks_arg("masks", masks, len(params))
        for i, (p, m) in enumerate(zip(params, masks, strict=True)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor):
                raise ValueError(f"masks: entry {i} is a {type(m).__name__}, not a tensor or None")
            if m.shape != p.shape:
                raise ValueError(
                    f"masks: entry {i} has shape {tuple(m.shape)}, parameter {tuple(p.shape)}"
                )
            if m.device != p.device:
                raise ValueError(f"masks: entry {i} is on {m.device}, parameter on {p.device}")
            if m.dtype != torch.bool:
                bad = int(((m != 0) & (m != 1)).sum())
                if bad:
                    raise ValueError(f"masks: entry {i} has {bad} entries that are not 0 or 1")
        where = self._locate()
        touched: set[int] = set()
        for p, m in zip(params, masks, strict=True):
            flat, i = where[id(p)]
            if m is None and flat.mask is None:
                continue
            if flat.mask is None:
                dtype = torch.uint8 if flat.triton else torch.float32
                flat.mask = flat.zeros(dtype)
                flat.mask[: flat.n] = 1  # the padding stays masked
            view = flat.view(flat.mask, i)
            if m is None:
                view.fill_(1)
            else:
                view.copy_(m)
            touched.add(id(flat))
        for flat in self._flats:
            if id(flat) in touched:
                flat.apply_mask()

    @torch.no_grad()
    def set_anchor(self, tensors: Sequence[torch.Tensor]) -> None:
        """Set the FedProx anchor ``w_global``, one tensor per parameter (same shape)."""
        params = self._all_params()
        tensors = _check_masks_arg("tensors", tensors, len(params))
        where = self._locate()
        for i, (p, t) in enumerate(zip(params, tensors, strict=True)):
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"tensors: entry {i} is {shape}, parameter {tuple(p.shape)}")
            if t.device != p.device:
                raise ValueError(f"tensors: entry {i} is on {t.device}, parameter on {p.device}")
        for p, t in zip(params, tensors, strict=True):
            flat, i = where[id(p)]
            if flat.anchor is None:
                flat.anchor = flat.zeros()
            flat.view(flat.anchor, i).copy_(t)

    # --- gradients ----------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers in place (gradients stay views; see module doc)."""
        del set_to_none
        for flat in self._flats:
            flat.grad.zero_()
            flat.sync_grads()

    def _clip_bound(self, flat: _Flat) -> float | torch.Tensor | None:
        group = self.param_groups[flat.group_index]
        if group["clip_value"] is not None:
            return float(group["clip_value"])
        if group["clip_quantile"] is None:
            return None
        g = flat.grad[: flat.n].abs()
        if flat.mask is not None:
            g = g.masked_select(flat.mask[: flat.n] != 0)
        if g.numel() == 0:
            return 0.0
        return quantile(g, float(group["clip_quantile"]), backend=self._backend)

    def _anchor(self, flat: _Flat) -> torch.Tensor | None:
        if self.param_groups[flat.group_index]["prox_mu"] == 0:
            return None
        if flat.anchor is None:
            raise ValueError("prox_mu: > 0 needs an anchor; call set_anchor(global_weights)")
        return flat.anchor

    # --- state round trip -----------------------------------------------------------

    def _publish_state(self, flat: _Flat) -> None:
        """Expose per-parameter state as views of the flat state (torch's layout and keys)."""
        for i, p in enumerate(flat.params):
            st = self.state[p]
            for key in self._state_keys:
                st[key] = flat.view(flat.state[key], i)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (ours or torch.optim.SGD's / AdamW's) into the flat buffers."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch.optim state dict lacks our options
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        with torch.no_grad():
            for flat in self._flats:
                loaded = [self.state.get(p, {}) for p in flat.params]
                if not any(st.get(self._state_keys[0]) is not None for st in loaded):
                    continue
                flat.ensure_state(self._state_keys)
                for i, st in enumerate(loaded):
                    for key in self._state_keys:
                        if st.get(key) is not None:
                            flat.view(flat.state[key], i).copy_(st[key])
                        else:
                            flat.view(flat.state[key], i).zero_()
                self._load_extra(flat, loaded)
                self._publish_state(flat)
                flat.apply_mask()

    def _load_extra(self, flat: _Flat, loaded: list[dict[str, Any]]) -> None:
        """Restore state that is not a flat buffer (AdamW's step count)."""

    def _closure(self, closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class MaskedSGD(_MaskedOptimizer):
    """SGD with masks, FedProx and coordinate-wise clipping in one fused pass.

    Per entry: ``d = clamp(g, -c, c) + prox_mu (w - w_global) + weight_decay w``,
    masked; ``buf = momentum buf + d``; ``w -= lr (d + momentum buf)`` (Nesterov)
    or ``lr buf``. With masks all ones and options off it is torch.optim.SGD.

    Parameters
    ----------
    params : iterable of fp32 tensors or param-group dicts
    lr : float
    momentum : float, default 0.0
    weight_decay : float, default 0.0 (coupled, as torch.optim.SGD)
    nesterov : bool, default False
    prox_mu : float, default 0.0
        FedProx mu; the anchor ``w_global`` is the parameters at construction
        unless :meth:`set_anchor` gives it.
    clip_value : float or None, default None
        Clamp every gradient coordinate to ``[-clip_value, clip_value]``.
    clip_quantile : float or None, default None
        Clamp to the exact ``clip_quantile``-quantile of ``|g|`` over the kept
        entries, recomputed every step (an extra pass or four; off by default).
    masks : sequence of (bool/0-1 tensor or None), one per parameter, default None
    backend : "auto" | "torch" | "triton", default "auto"
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        prox_mu: float = 0.0,
        clip_value: float | None = None,
        clip_quantile: float | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        if not isinstance(momentum, int | float) or momentum < 0:
            raise ValueError(f"momentum: expected a non-negative float, got {momentum!r}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov: requires momentum > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            prox_mu=prox_mu, clip_value=clip_value, clip_quantile=clip_quantile,
        )  # fmt: skip
        super().__init__(params, defaults, masks, backend)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One fused masked step over every flat buffer."""
        loss = self._closure(closure)
        for flat in self._flats:
            group = self.param_groups[flat.group_index]
            flat.sync_grads()
            momentum = group["momentum"]
            if momentum != 0 and "momentum_buffer" not in flat.state:
                flat.ensure_state(self._state_keys)
                self._publish_state(flat)
            kwargs = dict(
                lr=float(group["lr"]), momentum=momentum, weight_decay=group["weight_decay"],
                nesterov=group["nesterov"], prox_mu=group["prox_mu"],
                clip=self._clip_bound(flat),
            )  # fmt: skip
            buf = flat.state.get("momentum_buffer")
            anchor = self._anchor(flat)
            if flat.triton:
                masked_sgd_step_triton(flat.param, flat.grad, buf, flat.mask, anchor, **kwargs)
            else:
                ws = flat.scratch(2 if group["prox_mu"] != 0 else 1)
                masked_sgd_step_reference(
                    flat.param, flat.grad, buf, flat.mask, anchor, workspace=ws, **kwargs
                )
        return loss


class MaskedAdamW(_MaskedOptimizer):
    """AdamW with masks, FedProx and coordinate-wise clipping in one fused pass.

    Per entry: ``d = clamp(g, -c, c) + prox_mu (w - w_global)``, masked; then
    torch.optim.AdamW's decoupled decay, moments and bias-corrected update.
    Moments of pruned entries stay 0. With masks all ones and options off it
    is torch.optim.AdamW (to an ulp per step; see the module docstring).

    Parameters
    ----------
    params : iterable of fp32 tensors or param-group dicts
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
    prox_mu, clip_value, clip_quantile, masks, backend : as :class:`MaskedSGD`
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        prox_mu: float = 0.0,
        clip_value: float | None = None,
        clip_quantile: float | None = None,
        masks: Sequence[torch.Tensor | None] | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"betas: expected two floats in [0, 1), got {betas!r}")
        if not isinstance(eps, int | float) or eps < 0:
            raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, prox_mu=prox_mu,
            clip_value=clip_value, clip_quantile=clip_quantile,
        )  # fmt: skip
        self._steps: dict[int, torch.Tensor] = {}
        super().__init__(params, defaults, masks, backend)

    def _publish_state(self, flat: _Flat) -> None:
        super()._publish_state(flat)
        step = self._steps.setdefault(id(flat), torch.tensor(0.0))
        for p in flat.params:
            self.state[p]["step"] = step  # one shared count: the whole buffer steps together

    def _load_extra(self, flat: _Flat, loaded: list[dict[str, Any]]) -> None:
        steps = [float(st["step"]) for st in loaded if "step" in st]
        self._steps[id(flat)] = torch.tensor(max(steps) if steps else 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One fused masked step over every flat buffer."""
        loss = self._closure(closure)
        for flat in self._flats:
            group = self.param_groups[flat.group_index]
            flat.sync_grads()
            if "exp_avg" not in flat.state:
                flat.ensure_state(self._state_keys)
                self._publish_state(flat)
            step_t = self._steps[id(flat)]
            step_t += 1
            beta1, beta2 = group["betas"]
            kwargs = dict(
                step=int(step_t.item()), lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                eps=group["eps"], weight_decay=group["weight_decay"],
                prox_mu=group["prox_mu"], clip=self._clip_bound(flat),
            )  # fmt: skip
            args = (
                flat.param, flat.grad, flat.state["exp_avg"], flat.state["exp_avg_sq"],
                flat.mask, self._anchor(flat),
            )  # fmt: skip
            if flat.triton:
                masked_adamw_step_triton(*args, **kwargs)
            else:
                ws = flat.scratch(3 if group["prox_mu"] != 0 else 2)
                masked_adamw_step_reference(*args, workspace=ws, **kwargs)
        return loss


# --- cohorts: K clients' optimizers over one stacked buffer ---------------------------


def _padded(n: int) -> int:
    """Flat buffers are padded to a multiple of 16 entries (see ``_Flat``)."""
    return -(-n // 16) * 16


class _CohortOptimizer:
    """Shared machinery of the cohort optimizers: ``[K, size]`` buffers whose rows are
    laid out as a single-client ``_Flat`` (same order, same padding), masks, anchors,
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
        self.size = _padded(self.n)
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


class CohortSGD(_CohortOptimizer):
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
        if not isinstance(momentum, int | float) or momentum < 0:
            raise ValueError(f"momentum: expected a non-negative float, got {momentum!r}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov: requires momentum > 0")
        if not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ValueError(f"weight_decay: expected a non-negative float, got {weight_decay!r}")
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


class CohortAdamW(_CohortOptimizer):
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
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"betas: expected two floats in [0, 1), got {betas!r}")
        if not isinstance(eps, int | float) or eps < 0:
            raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
        if not isinstance(weight_decay, int | float) or weight_decay < 0:
            raise ValueError(f"weight_decay: expected a non-negative float, got {weight_decay!r}")
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
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
