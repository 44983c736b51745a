"""Client-side training objectives: FedLD margin control and the FedProx proximal term.

References
----------
Zeng, Guo, Wang, Wang, Zhou and Qu, "Tackling Data Heterogeneity in Federated Learning via
Loss Decomposition", MICCAI 2024, arXiv:2408.12300 (margin control, docs/ALGORITHMS.md §2.2).
Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv:1812.06127 (FedProx).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["margin_loss", "proximal_term"]


def margin_loss(logits: Tensor, targets: Tensor, margin_lambda: float) -> Tensor:
    r"""Cross-entropy with FedLD margin control (Zeng et al., MICCAI 2024, docs/ALGORITHMS.md §2.2).

    .. math::

        \mathcal{L} = \operatorname{CE}(z, y)
            + \lambda \log\bigl(1 + \lVert \operatorname{softmax}(z) \rVert_F^2\bigr)

    where :math:`z` is the ``N x C`` logits of the whole batch, CE is the batch mean, and the
    Frobenius norm is taken over the batch's whole probability matrix: one scalar per batch,
    as in the reference code (Zeng-Shuang/FedLD). The term targets the distribution-shift part
    of the loss decomposition (:mod:`fl.decomposition`).

    Parameters
    ----------
    logits
        ``(N, C)`` floating-point logits.
    targets
        ``(N,)`` integer class indices.
    margin_lambda
        :math:`\lambda \ge 0` (``margin-lambda``, default 0.1 in the config); 0 returns plain
        cross-entropy exactly.

    Returns
    -------
    Tensor
        A scalar loss. The probabilities are computed in at least float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected shape (N, C), got {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets: expected shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(targets.shape)}"
        )
    if not (math.isfinite(float(margin_lambda)) and float(margin_lambda) >= 0.0):
        raise ValueError(f"margin_lambda: expected a finite value >= 0, got {margin_lambda}")
    ce = F.cross_entropy(logits, targets)
    if float(margin_lambda) == 0.0:
        return ce
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probabilities = torch.softmax(logits.to(compute_dtype), dim=1)
    squared_norm = probabilities.pow(2).sum()
    return ce + float(margin_lambda) * torch.log1p(squared_norm).to(ce.dtype)


def proximal_term(
    params: Iterable[Tensor] | Mapping[str, Tensor],
    anchor: Iterable[Tensor] | Mapping[str, Tensor],
    mu: float,
) -> Tensor:
    r"""FedProx proximal term (Li et al., MLSys 2020, Eq. 2).

    .. math:: \frac{\mu}{2} \sum_t \lVert w_t - w_{g,t} \rVert^2

    For clients whose optimizer does not apply the proximal gradient itself (the fused masked
    optimizers can): add the result to the loss. The anchor is detached.

    Parameters
    ----------
    params
        The local tensors :math:`w` (e.g. ``model.parameters()``), or a name-to-tensor mapping.
    anchor
        The global tensors :math:`w_g` in the same order, or a mapping with the same names.
    mu
        :math:`\mu \ge 0` (``proximal-mu``); 0 gives a zero scalar.

    Returns
    -------
    Tensor
        A scalar (float32, or float64 when the parameters are float64) on the parameters'
        device, differentiable with respect to ``params``.
    """
    if not (math.isfinite(float(mu)) and float(mu) >= 0.0):
        raise ValueError(f"mu: expected a finite value >= 0, got {mu}")
    if isinstance(params, Mapping) != isinstance(anchor, Mapping):
        raise ValueError("params, anchor: pass both as mappings or both as sequences")
    if isinstance(params, Mapping) and isinstance(anchor, Mapping):
        if set(params) != set(anchor):
            raise ValueError(
                f"anchor: names differ from params (missing {sorted(set(params) - set(anchor))}, "
                f"extra {sorted(set(anchor) - set(params))})"
            )
        pairs = [(params[name], anchor[name]) for name in params]
    else:
        local, reference = list(params), list(anchor)
        if len(local) != len(reference):
            raise ValueError(
                f"anchor: expected {len(local)} tensors to match params, got {len(reference)}"
            )
        pairs = list(zip(local, reference, strict=True))
    if not pairs:
        return torch.zeros(())
    dtype = torch.float64 if any(p.dtype == torch.float64 for p, _ in pairs) else torch.float32
    device = pairs[0][0].device
    total = torch.zeros((), dtype=dtype, device=device)
    for index, (w, w_g) in enumerate(pairs):
        if w.shape != w_g.shape:
            raise ValueError(
                f"anchor: tensor {index} has shape {tuple(w_g.shape)}, params has {tuple(w.shape)}"
            )
        total = total + (w.to(dtype) - w_g.detach().to(dtype)).pow(2).sum()
    return total * (float(mu) / 2.0)
