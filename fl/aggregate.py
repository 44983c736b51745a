"""Pure aggregation rules on tensors: weighted mean, server momentum, FedLD principal gradient.

Every function here takes and returns plain ``torch.Tensor`` dictionaries keyed by parameter
name; nothing knows about Flower. Strategies call :func:`validate_update` on each reply, drop
the malformed ones with the returned reason logged, aggregate the rest with
:func:`weighted_mean` or :func:`fedld_aggregate`, optionally pass the result through
:class:`ServerMomentum`, and apply it with :func:`apply_update`.

References
----------
Zeng, Guo, Wang, Wang, Zhou and Qu, "Tackling Data Heterogeneity in Federated Learning via
Loss Decomposition", MICCAI 2024, arXiv:2408.12300 (FedLD; reference code Zeng-Shuang/FedLD).
Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, 2019 (FedAvgM).
McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017 (FedAvg).

Why one module of this length: every rule the server applies to client updates,
as pure tensor functions sharing their input checks; FedLD's aggregation is
:func:`fedld_aggregate` over :func:`principal_gradient`, with the per-client form it
is tested and timed against (:func:`principal_gradient_loop`) beside it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ServerMomentum",
    "apply_update",
    "fedld_aggregate",
    "principal_gradient",
    "principal_gradient_loop",
    "validate_update",
    "weighted_mean",
]

# Columns per block when the m x d update matrix is streamed in float64 (see
# `principal_gradient`); a block of m = 12 rows is 6 MiB. Measured with 1 thread on a shared
# 2-core AMD EPYC (torch 2.13 CPU), m = 12, d = 11M float32, Gram pass in units of the weighted
# mean's time: 3.3x with 2**16 columns, 4.3x with 2**15, 5.9x with a column-major (B x m)
# block; 2**14 and 2**18 were slower too. Stacking all of G and converting it to float64 at
# once was ~2x slower than streaming (2 threads) and costs 12 m d bytes.
BLOCK_COLUMNS = 1 << 16


# --------------------------------------------------------------------------------------------
# helpers


def _normalised_weights(weights: Sequence[float], count: int) -> list[float]:
    """Return ``weights / sum(weights)`` as Python floats after checking them."""
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"weights: expected {count} entries (one per update), got {len(values)}")
    if any(not math.isfinite(w) or w < 0.0 for w in values):
        raise ValueError(f"weights: expected finite non-negative numbers, got {values}")
    total = math.fsum(values)
    if total <= 0.0:
        raise ValueError("weights: their sum must be positive (got all zeros)")
    return [w / total for w in values]


def _check_same_keys(updates: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if len(updates) == 0:
        raise ValueError("updates: expected at least one update, got none")
    keys = list(updates[0].keys())
    expected = set(keys)
    for index, update in enumerate(updates[1:], start=1):
        if set(update.keys()) != expected:
            missing = sorted(expected - set(update.keys()))
            extra = sorted(set(update.keys()) - expected)
            raise ValueError(
                f"updates: update {index} has different keys from update 0 "
                f"(missing {missing}, extra {extra}); validate replies with validate_update first"
            )
    return keys


def _check_same_shapes(tensors: Sequence[Tensor], label: str) -> torch.Size:
    shape = tensors[0].shape
    for index, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != shape:
            raise ValueError(
                f"updates: {label} of update {index} has shape {tuple(tensor.shape)}, "
                f"update 0 has {tuple(shape)}"
            )
    return shape


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float64 stays float64; every other floating type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted_sum(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``sum_i coefficients[i] * tensors[i]`` in the accumulation dtype, cast back.

    Integer and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) are summed in
    float64 and rounded to the nearest value of their dtype (for bool: a weighted majority).
    """
    dtype = tensors[0].dtype
    if dtype.is_floating_point:
        acc_dtype = _accumulation_dtype(dtype)
    elif dtype.is_complex:
        raise ValueError(f"updates: complex tensors ({dtype}) are not supported")
    else:
        acc_dtype = torch.float64
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    for tensor, coefficient in zip(tensors, coefficients, strict=True):
        if coefficient != 0.0:
            acc.add_(tensor.to(acc_dtype), alpha=coefficient)
    if dtype.is_floating_point:
        return acc if acc_dtype == dtype else acc.to(dtype)
    if dtype == torch.bool:
        return acc >= 0.5
    return torch.round(acc).to(dtype)


# --------------------------------------------------------------------------------------------
# weighted mean (FedAvg)


def weighted_mean(
    updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    r"""Per-tensor weighted mean of client updates (FedAvg, McMahan et al. 2017).

    .. math:: \bar\Delta_t = \sum_i \frac{w_i}{\sum_l w_l} \Delta_{i,t}

    Parameters
    ----------
    updates
        One mapping per client from tensor name to tensor; all must have the same keys and,
        per key, the same shape.
    weights
        One non-negative weight per client (typically ``num-examples``); normalised here.

    Returns
    -------
    dict[str, Tensor]
        The mean per key, in the input dtype. Floating tensors accumulate in float32 (float64
        stays float64), so half-precision inputs do not lose precision in the sum. Integer
        tensors such as BatchNorm's ``num_batches_tracked`` are averaged in float64 and
        rounded to the nearest integer; boolean tensors take the weighted majority.

    Raises
    ------
    ValueError
        No updates, mismatched keys or shapes, or invalid weights.
    """
    keys = _check_same_keys(updates)
    coefficients = _normalised_weights(weights, len(updates))
    result: dict[str, Tensor] = {}
    for key in keys:
        tensors = [update[key] for update in updates]
        _check_same_shapes(tensors, f"tensor {key!r}")
        result[key] = _weighted_sum(tensors, coefficients)
    return result


# --------------------------------------------------------------------------------------------
# server momentum (FedAvgM)


@dataclass
class ServerMomentum:
    r"""Server-side heavy-ball momentum on the aggregated update (FedAvgM, Hsu et al. 2019).

    .. math:: v \leftarrow \beta v + \bar\Delta, \qquad \theta_g \leftarrow \theta_g + \eta v

    Our updates are ``Delta = theta_k - theta_g`` (a step to *add*), so the returned step is
    added; Hsu et al. write the same rule with the pseudo-gradient ``-Delta`` and a minus sign.
    ``beta = 0`` returns the update itself (plain FedAvg). AutoFLIP's ``server-momentum = 0.9``
    reproduces the reference code's FedAvgM.

    Parameters
    ----------
    beta
        Momentum coefficient in ``[0, 1)``. Default 0.0.
    velocity
        Per-tensor velocity ``v``; starts empty (zero). It is plain state: checkpoint it with
        :meth:`state_dict`. When a tensor's shape changes (structural pruning shrinks a
        layer), the caller must slice or drop ``velocity[name]`` itself; :meth:`step` refuses
        a shape mismatch rather than guess.
    """

    beta: float = 0.0
    velocity: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.beta) < 1.0):
            raise ValueError(f"beta: expected a value in [0, 1), got {self.beta}")

    def step(
        self, update: Mapping[str, Tensor], *, skip: Collection[str] = ()
    ) -> dict[str, Tensor]:
        """Fold ``update`` into the velocity and return the step to apply.

        Parameters
        ----------
        update
            The aggregated update of this round.
        skip
            Names passed through without momentum (buffers such as BatchNorm running
            statistics). Non-floating tensors are always passed through.

        Returns
        -------
        dict[str, Tensor]
            ``beta * v + update`` per floating tensor (a fresh tensor, not the stored state).
        """
        step: dict[str, Tensor] = {}
        for name, delta in update.items():
            if name in skip or not delta.dtype.is_floating_point:
                step[name] = delta.clone()
                continue
            previous = self.velocity.get(name)
            if previous is None or self.beta == 0.0:
                velocity = delta.detach().clone()
            else:
                if previous.shape != delta.shape:
                    raise ValueError(
                        f"update: tensor {name!r} has shape {tuple(delta.shape)} but its velocity "
                        f"has {tuple(previous.shape)}; slice or reset velocity[{name!r}] after "
                        "structural pruning"
                    )
                velocity = previous.to(delta.dtype).mul(self.beta).add_(delta.detach())
            self.velocity[name] = velocity
            step[name] = velocity.clone()
        return step

    def reset(self) -> None:
        """Forget the velocity."""
        self.velocity.clear()

    def state_dict(self) -> dict[str, object]:
        """Serialisable state: ``{"beta": float, "velocity": {name: Tensor}}``."""
        return {
            "beta": float(self.beta),
            "velocity": {k: v.clone() for k, v in self.velocity.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        beta = state.get("beta")
        velocity = state.get("velocity")
        if not isinstance(beta, int | float) or not (0.0 <= float(beta) < 1.0):
            raise ValueError(f"state: 'beta' must be a number in [0, 1), got {beta!r}")
        if not isinstance(velocity, Mapping) or not all(
            isinstance(v, Tensor) for v in velocity.values()
        ):
            raise ValueError("state: 'velocity' must map tensor names to tensors")
        self.beta = float(beta)
        self.velocity = {str(k): v.clone() for k, v in velocity.items()}


# --------------------------------------------------------------------------------------------
# FedLD principal gradient


def principal_gradient(
    updates: Sequence[Tensor], k_proportion: float = 0.8, eps: float = 1e-8
) -> Tensor:
    r"""FedLD principal-gradient aggregate of one parameter tensor (Zeng et al., MICCAI 2024).

    Implements docs/ALGORITHMS.md §2.3 (which overrides the paper, arXiv:2408.12300, Sec. 2.3,
    and the reference code Zeng-Shuang/FedLD). With :math:`G` the :math:`m \times d` matrix
    whose rows are the flattened client updates :math:`\Delta_i`:

    .. math::

        C = G G^\top / m = \sum_j s_j e_j e_j^\top, \quad s_1 \ge \dots \ge s_m \ge 0,
        \qquad u_j = G^\top e_j / \lVert G^\top e_j \rVert,

        g = \sum_{j \le k,\; s_j > \epsilon s_1} \frac{s_j}{\sum_{l=1}^m s_l}\, u_j\,
            \frac{1}{m} \sum_i \operatorname{sign}(\langle \Delta_i, u_j \rangle)
            \lVert \Delta_i \rVert,
        \qquad k = \max(1, \lfloor m \cdot \text{k\_proportion} \rfloor).

    The denominator sums all :math:`m` eigenvalues, as in the reference code. Since
    :math:`\lVert G^\top e_j \rVert^2 = m s_j`, :math:`\langle \Delta_i, u_j \rangle =
    \sqrt{m s_j}\, e_j[i]` and :math:`\lVert \Delta_i \rVert = \sqrt{m C_{ii}}`, this is
    computed in Gram form as :math:`g = a^\top G` with

    .. math::

        a = \sum_j \frac{s_j}{\sum_l s_l}\, c_j\, \frac{e_j}{\sqrt{m s_j}}, \qquad
        c_j = \frac{1}{m} \sum_i \operatorname{sign}(e_j[i])\, \lVert \Delta_i \rVert :

    one Gram product (cost :math:`O(m^2 d)`, in float64) and one weighted sum of the updates;
    no :math:`d \times d` matrix and no direction :math:`u_j` is ever formed. The Gram product
    streams the updates in blocks of columns, so the extra memory is one
    :math:`m \times 65536` float64 block plus the output, never a copy of all of :math:`G`.

    Clients are weighted uniformly, as in the reference code: example counts play no part.

    Cost, measured by ``python benchmarks/aggregation.py --threads 2`` (the 2-core AMD EPYC,
    torch 2.13 CPU, float32 updates, machine otherwise idle): m = 12, d = 11M: 3.75x the
    weighted mean's time, against 44x for the per-client loop form that materialises the
    directions; m = 100: 15x, as the Gram product grows as :math:`m^2 d`. Float32 updates
    give a float32 Gram product per block (accumulated in float64): relative error against
    a float64 evaluation up to 1.4e-4 there, below the loop form's 3.4e-4.

    Parameters
    ----------
    updates
        ``m >= 1`` floating-point tensors of the same shape: the clients' updates
        :math:`\Delta_i = \theta_i - \theta_g` for this parameter tensor.
    k_proportion
        Fraction of the ``m`` directions kept, in ``(0, 1]`` (``k-proportion``, default 0.8).
    eps
        Relative eigenvalue cut-off: directions with :math:`s_j \le \epsilon s_1` are dropped
        (they carry no update; it also guards the division by :math:`\sqrt{m s_j}`).

    Returns
    -------
    Tensor
        :math:`g`, with the shape, dtype and device of the updates. All-zero updates give
        zeros; rank-deficient inputs (duplicate or zero rows) never give NaN.

    Raises
    ------
    ValueError
        No updates, mismatched shapes, non-floating dtype, non-finite values, or
        ``k_proportion``/``eps`` out of range.

    Notes
    -----
    Eigenvectors are defined up to sign. Flipping :math:`e_j \to -e_j` flips every
    :math:`\operatorname{sign}(e_j[i])` and hence :math:`c_j`, so :math:`c_j e_j` and the
    result do not change. Within a repeated eigenvalue the basis is arbitrary and the result
    does depend on it (a property of the method, shared with the reference code).
    A coordinate :math:`e_j[i]` that is zero up to rounding has an arbitrary sign: the method
    is discontinuous there, as the reference code is.
    """
    m = len(updates)
    if m == 0:
        raise ValueError("updates: expected at least one tensor, got none")
    if not (0.0 < float(k_proportion) <= 1.0):
        raise ValueError(f"k_proportion: expected a value in (0, 1], got {k_proportion}")
    if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    shape = _check_same_shapes(updates, "the tensor")
    dtype = updates[0].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"updates: expected floating-point tensors, got {dtype}")
    if any(u.dtype != dtype for u in updates):
        raise ValueError("updates: all tensors must have the same dtype")
    device = updates[0].device
    rows = [u.detach().reshape(-1) for u in updates]
    d = rows[0].numel()

    # C = G G^T / m, streaming blocks of columns through one reusable buffer. Each block's
    # product runs in the updates' precision (float32 for float32 updates: half the time of
    # a float64 product, measured 0.21 s against 0.39 s for m = 12, d = 11M on the 2-core
    # EPYC) and is accumulated in float64 across blocks; the eigensolver runs in float64.
    # Error of the float32 Gram against a float64 one there: 4e-8 of its largest entry.
    gram = torch.zeros((m, m), dtype=torch.float64, device=device)
    block_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    block = torch.empty((m, min(d, BLOCK_COLUMNS)), dtype=block_dtype, device=device)
    for start in range(0, d, BLOCK_COLUMNS):
        stop = min(d, start + BLOCK_COLUMNS)
        view = block[:, : stop - start]
        for i, row in enumerate(rows):
            view[i].copy_(row[start:stop])
        if block_dtype == torch.float64:
            gram.addmm_(view, view.T)
        else:
            gram.add_((view @ view.T).to(torch.float64))
    gram.div_(m)
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("updates: contain NaN or Inf (reject such replies with validate_update)")

    coefficients = _principal_coefficients(gram, k_proportion, eps)
    if coefficients is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return _weighted_sum(rows, coefficients.tolist()).reshape(shape)


def _principal_coefficients(gram: Tensor, k_proportion: float, eps: float) -> Tensor | None:
    """The m-vector ``a`` of ``g = a @ G`` from ``C = G G^T / m`` (None when ``g = 0``)."""
    m = gram.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp_(min=0.0)  # s_1 >= ... >= s_m >= 0
    eigenvectors = eigenvectors.flip(1)  # column j is e_j
    s_1 = float(eigenvalues[0])
    total = float(eigenvalues.sum())
    if not s_1 > 0.0 or not total > 0.0:  # all updates are zero
        return None
    k = max(1, math.floor(m * float(k_proportion)))
    keep = eigenvalues[:k] > eps * s_1
    values = eigenvalues[:k][keep]
    vectors = eigenvectors[:, :k][:, keep]
    if values.numel() == 0:
        return None
    norms = torch.sqrt(torch.clamp(m * torch.diagonal(gram), min=0.0))  # ||Delta_i||
    # c_j = (1/m) sum_i sign(e_j[i]) ||Delta_i||. sign(<Delta_i, u_j>) = sign(e_j[i]) because
    # <Delta_i, u_j> = sqrt(m s_j) e_j[i]. Flipping e_j flips c_j too, so c_j * e_j (and the
    # result) is invariant to the eigensolver's sign choice.
    c = (torch.sign(vectors) * norms[:, None]).sum(dim=0) / m
    scale = (values / total) * c / torch.sqrt(m * values)  # values > 0: no division by zero
    coefficients = vectors @ scale
    if not bool(torch.isfinite(coefficients).all()):  # pragma: no cover - defensive
        return None
    return coefficients


def principal_gradient_loop(
    updates: Sequence[Tensor], k_proportion: float = 0.8, eps: float = 1e-8
) -> Tensor:
    """:func:`principal_gradient` in the reference code's form: materialise each direction
    u_j, project every client on it. Not used by the strategies; the form the Gram form is
    checked against (tests/test_aggregate.py) and timed against (benchmarks/aggregation.py).

    Works in the updates' dtype except for the float64 Gram matrix; no input checks.
    Memory: the stacked m x d matrix, its float64 copy while the Gram matrix is formed, one
    direction and the output.
    """
    m = len(updates)
    flat = [u.reshape(-1) for u in updates]
    G = torch.stack(flat)
    G64 = G.double()
    C = G64 @ G64.T / m
    del G64
    s, e = torch.linalg.eigh(C)
    s, e = s.flip(0).clamp(min=0.0), e.flip(1)
    out = torch.zeros_like(flat[0])
    total = float(s.sum())
    if total <= 0.0:
        return out.reshape(updates[0].shape)
    norms = [float(torch.linalg.vector_norm(f, dtype=torch.float64)) for f in flat]
    for j in range(max(1, math.floor(m * k_proportion))):
        if s[j] <= eps * s[0]:
            continue
        u_j = e[:, j].to(G.dtype) @ G
        u_j /= torch.linalg.vector_norm(u_j)
        rescaled = 0.0
        for i in range(m):  # per client: project on u_j, keep the sign, rescale to ||D_i||
            projection = float(torch.dot(flat[i], u_j))
            rescaled += ((projection > 0) - (projection < 0)) * norms[i]
        out.add_(u_j, alpha=float(s[j]) / total * rescaled / m)
    return out.reshape(updates[0].shape)


def fedld_aggregate(
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    *,
    first_round: bool,
    buffer_names: Collection[str] = frozenset(),
    k_proportion: float = 0.8,
    eps: float = 1e-8,
) -> dict[str, Tensor]:
    """FedLD server aggregation of a whole model update (Zeng et al., MICCAI 2024).

    docs/ALGORITHMS.md §2.3, per tensor: the weighted mean (:func:`weighted_mean`, with
    ``weights``) in the first round, for tensors of at most one entry, for buffers (e.g.
    normalisation running statistics, listed in ``buffer_names``) and for non-floating
    tensors; :func:`principal_gradient` (uniform client weights, as in the reference code)
    otherwise.

    The caller then applies ``theta_g <- theta_g + server_lr * g``, e.g. with
    :func:`apply_update` (``server-lr``, default 1.0).

    Parameters
    ----------
    updates
        One mapping per client from tensor name to update ``theta_k - theta_g``.
    weights
        Per-client weights (``num-examples``) for the weighted-mean tensors.
    first_round
        True in the first federated round, where every tensor takes the weighted mean.
    buffer_names
        Names of buffers, which always take the weighted mean.
    k_proportion, eps
        Passed to :func:`principal_gradient`.

    Returns
    -------
    dict[str, Tensor]
        The aggregate per key, in the keys' order of ``updates[0]``.
    """
    keys = _check_same_keys(updates)
    coefficients = _normalised_weights(weights, len(updates))
    buffers = frozenset(buffer_names)
    result: dict[str, Tensor] = {}
    for key in keys:
        tensors = [update[key] for update in updates]
        _check_same_shapes(tensors, f"tensor {key!r}")
        reference = tensors[0]
        if (
            first_round
            or key in buffers
            or reference.numel() <= 1
            or not reference.dtype.is_floating_point
        ):
            result[key] = _weighted_sum(tensors, coefficients)
        else:
            result[key] = principal_gradient(tensors, k_proportion=k_proportion, eps=eps)
    return result


# --------------------------------------------------------------------------------------------
# applying and validating


def apply_update(
    global_state: Mapping[str, Tensor],
    aggregate: Mapping[str, Tensor],
    server_lr: float = 1.0,
    *,
    buffer_names: Collection[str] = frozenset(),
) -> dict[str, Tensor]:
    r"""Return :math:`\theta_g + \eta\, g` (docs/ALGORITHMS.md §2.3 step 4;
    ``server-lr`` = :math:`\eta`).

    Parameters
    ----------
    global_state
        The current global tensors; not modified.
    aggregate
        The aggregated update per name (a subset of ``global_state``'s keys; missing names are
        left unchanged).
    server_lr
        Server learning rate :math:`\eta`, finite and positive (default 1.0).
    buffer_names
        Buffers take the full step (:math:`\eta = 1`) so running statistics become the
        clients' average whatever the learning rate. Integer tensors add the rounded step;
        boolean tensors (flags have no delta) take the aggregate as their new value.

    Returns
    -------
    dict[str, Tensor]
        New tensors in ``global_state``'s dtypes.
    """
    if not (math.isfinite(float(server_lr)) and float(server_lr) > 0.0):
        raise ValueError(f"server_lr: expected a finite positive number, got {server_lr}")
    unknown = sorted(set(aggregate) - set(global_state))
    if unknown:
        raise ValueError(f"aggregate: names not in global_state: {unknown}")
    buffers = frozenset(buffer_names)
    result: dict[str, Tensor] = {}
    for name, value in global_state.items():
        step = aggregate.get(name)
        if step is None:
            result[name] = value.clone()
            continue
        if step.shape != value.shape:
            raise ValueError(
                f"aggregate: tensor {name!r} has shape {tuple(step.shape)}, the global tensor "
                f"has {tuple(value.shape)}"
            )
        lr = 1.0 if name in buffers else float(server_lr)
        if value.dtype.is_floating_point:
            acc = _accumulation_dtype(value.dtype)
            result[name] = (value.to(acc) + lr * step.to(acc)).to(value.dtype)
        elif value.dtype == torch.bool:  # a flag has no delta: the aggregate is the new value
            result[name] = step.to(torch.bool)
        else:
            increment = torch.round(lr * step.to(torch.float64)).to(value.dtype)
            result[name] = value + increment
    return result


def validate_update(
    update: Mapping[str, object], reference_shapes: Mapping[str, Sequence[int]]
) -> str | None:
    """Check one client reply before aggregation.

    Parameters
    ----------
    update
        The decoded update, name to tensor.
    reference_shapes
        The expected name to shape (``torch.Size`` or any sequence of ints).

    Returns
    -------
    str | None
        ``None`` when the update is well formed, otherwise a short reason for the log: missing
        or extra names, a value that is not a tensor, a shape mismatch, or NaN/Inf entries
        (the first problem found per kind, names sorted).
    """
    missing = sorted(set(reference_shapes) - set(update))
    if missing:
        return f"missing tensors: {_preview(missing)}"
    extra = sorted(set(update) - set(reference_shapes))
    if extra:
        return f"unexpected tensors: {_preview(extra)}"
    tensors: dict[str, Tensor] = {}
    for name in sorted(reference_shapes):
        value = update[name]
        if not isinstance(value, Tensor):
            return f"tensor {name!r} is a {type(value).__name__}, not a tensor"
        expected = tuple(int(n) for n in reference_shapes[name])
        if tuple(value.shape) != expected:
            return f"tensor {name!r} has shape {tuple(value.shape)}, expected {expected}"
        tensors[name] = value
    for name, value in tensors.items():
        if (value.dtype.is_floating_point or value.dtype.is_complex) and not bool(
            torch.isfinite(value).all()
        ):
            bad = int((~torch.isfinite(value)).sum())
            return f"tensor {name!r} has {bad} NaN/Inf entries"
    return None


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
