"""MaskedSGD and MaskedAdamW: torch optimizers whose step is one fused masked pass over a
flat buffer (fl/optim/__init__.py says what the flat buffers change for the caller).

Why one module of this length: two thin subclasses (a constructor and a fused step
each) of the base that holds everything they share (flat buffers, masks, the FedProx
anchor, clipping, state round trips); fl/optim/cohort.py has the same layout for the
stacked buffers of a cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fl.kernels import BACKENDS, masked_adamw_step, masked_sgd_step, quantile
from fl.optim.flat import FlatBuffers, check_masks_arg
from fl.optim.hyper import check_adamw, check_sgd

__all__ = ["MaskedAdamW", "MaskedOptimizer", "MaskedSGD"]


class MaskedOptimizer(torch.optim.Optimizer):
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
        self._flats: list[FlatBuffers] = []
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
            self._flats.append(FlatBuffers(len(self.param_groups) - 1, params, self._backend))

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

    def _locate(self) -> dict[int, tuple[FlatBuffers, int]]:
        return {id(p): (flat, i) for flat in self._flats for i, p in enumerate(flat.params)}

    # --- masks and anchor -------------------------------------------------------

    @torch.no_grad()
    def set_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Set one mask per parameter (bool or 0/1 tensor shaped like it, or None = dense).

        Pruned parameters and their optimizer state are zeroed now and stay 0.
        """
        params = self._all_params()
        masks = check_masks_arg("masks", masks, len(params))
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
        tensors = check_masks_arg("tensors", tensors, len(params))
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

    @property
    def backends(self) -> list[str]:
        """What each flat buffer's step dispatches to (``"triton"`` or ``"torch"``, the
        reference), one entry per param group and device."""
        return [flat.backend for flat in self._flats]

    # --- gradients ----------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers in place (gradients stay views; see module doc)."""
        del set_to_none
        for flat in self._flats:
            flat.grad.zero_()
            flat.sync_grads()

    def _clip_bound(self, flat: FlatBuffers) -> float | torch.Tensor | None:
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

    def _anchor(self, flat: FlatBuffers) -> torch.Tensor | None:
        if self.param_groups[flat.group_index]["prox_mu"] == 0:
            return None
        if flat.anchor is None:
            raise ValueError("prox_mu: > 0 needs an anchor; call set_anchor(global_weights)")
        return flat.anchor

    # --- state round trip -----------------------------------------------------------

    def _publish_state(self, flat: FlatBuffers) -> None:
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

    def _load_extra(self, flat: FlatBuffers, loaded: list[dict[str, Any]]) -> None:
        """Restore state that is not a flat buffer (AdamW's step count)."""

    def _closure(self, closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class MaskedSGD(MaskedOptimizer):
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
        check_sgd(momentum, nesterov, weight_decay)
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
            ws = None if flat.triton else flat.scratch(2 if group["prox_mu"] != 0 else 1)
            masked_sgd_step(flat.param, flat.grad, buf, flat.mask, anchor, workspace=ws,
                            backend=flat.backend, check_mask_values=False, **kwargs)
        return loss


class MaskedAdamW(MaskedOptimizer):
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
        betas = check_adamw(betas, eps, weight_decay)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, prox_mu=prox_mu,
            clip_value=clip_value, clip_quantile=clip_quantile,
        )  # fmt: skip
        self._steps: dict[int, torch.Tensor] = {}
        super().__init__(params, defaults, masks, backend)

    def _publish_state(self, flat: FlatBuffers) -> None:
        super()._publish_state(flat)
        step = self._steps.setdefault(id(flat), torch.tensor(0.0))
        for p in flat.params:
            self.state[p]["step"] = step  # one shared count: the whole buffer steps together

    def _load_extra(self, flat: FlatBuffers, loaded: list[dict[str, Any]]) -> None:
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
            ws = None if flat.triton else flat.scratch(3 if group["prox_mu"] != 0 else 2)
            masked_adamw_step(*args, workspace=ws, backend=flat.backend,
                              check_mask_values=False, **kwargs)
        return loss
