"""FedLD loss decomposition: a diagnostic any strategy can report (docs/ALGORITHMS.md §2.1).

References
----------
Zeng, Guo, Wang, Wang, Zhou and Qu, "Tackling Data Heterogeneity in Federated Learning via
Loss Decomposition", MICCAI 2024, arXiv:2408.12300, Eq. (1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["LossDecomposition", "decompose_loss"]


@dataclass(frozen=True)
class LossDecomposition:
    r"""The three terms of the FedLD loss decomposition; they sum to ``global_loss``.

    Attributes
    ----------
    global_loss
        :math:`L(\theta_g)`, the global model's loss over the federation.
    local
        :math:`\sum_i p_i L_i(\theta_i)`: each client model on its own data.
    distribution_shift
        :math:`\sum_i p_i [L(\theta_i) - L_i(\theta_i)]`: each client model on everyone's data
        minus on its own.
    aggregation
        :math:`L(\theta_g) - \sum_i p_i L(\theta_i)`: what aggregation loses (or gains, when
        negative) against the client models.
    """

    global_loss: float
    local: float
    distribution_shift: float
    aggregation: float

    def as_dict(self) -> dict[str, float]:
        """The terms by field name (for metric records)."""
        return asdict(self)


def decompose_loss(
    loss_matrix: ArrayLike,
    global_losses: ArrayLike,
    weights: Sequence[float] | None = None,
) -> LossDecomposition:
    r"""Split the global model's loss into local, distribution-shift and aggregation terms.

    docs/ALGORITHMS.md §2.1 (Zeng et al., MICCAI 2024, arXiv:2408.12300, Eq. 1), with
    :math:`L(w) = \sum_j p_j L_j(w)`:

    .. math::

        L(\theta_g) = \underbrace{\sum_i p_i L_i(\theta_i)}_{\text{local}}
            + \underbrace{\sum_i p_i [L(\theta_i) - L_i(\theta_i)]}_{\text{distribution shift}}
            + \underbrace{\Bigl[L(\theta_g) - \sum_i p_i L(\theta_i)\Bigr]}_{\text{aggregation}}

    The identity is exact for any weights; the paper uses :math:`p_i = 1/K`, the default.
    Everything is computed in float64 and the terms sum to ``global_loss`` up to rounding.
    Measuring the inputs costs :math:`K^2` model evaluations: an opt-in diagnostic for small K.

    Parameters
    ----------
    loss_matrix
        ``K x K`` array with ``loss_matrix[j, i]`` = :math:`L_j(\theta_i)`, the loss of
        client ``i``'s model on client ``j``'s data (rows: data, columns: models).
    global_losses
        ``K`` values, ``global_losses[j]`` = :math:`L_j(\theta_g)`.
    weights
        Optional non-negative client weights :math:`p` (normalised here); uniform by default.

    Returns
    -------
    LossDecomposition
    """
    matrix = _as_float64(loss_matrix, "loss_matrix")
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"loss_matrix: expected a non-empty K x K array, got {matrix.shape}")
    k = matrix.shape[0]
    global_vector = _as_float64(global_losses, "global_losses")
    if global_vector.shape != (k,):
        raise ValueError(f"global_losses: expected shape ({k},), got {global_vector.shape}")
    if weights is None:
        p = np.full(k, 1.0 / k)
    else:
        p = _as_float64(weights, "weights")
        if p.shape != (k,) or bool((p < 0).any()) or not float(p.sum()) > 0.0:
            raise ValueError(f"weights: expected {k} non-negative numbers with a positive sum")
        p = p / p.sum()

    own = np.diagonal(matrix)  # L_i(theta_i)
    federated = p @ matrix  # L(theta_i) = sum_j p_j L_j(theta_i), one per model i
    global_loss = float(p @ global_vector)
    local = float(p @ own)
    mean_federated = float(p @ federated)
    return LossDecomposition(
        global_loss=global_loss,
        local=local,
        distribution_shift=mean_federated - local,
        aggregation=global_loss - mean_federated,
    )


def _as_float64(values: ArrayLike, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().double().numpy()  # type: ignore[union-attr]
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: expected numbers, got {type(values).__name__}") from error
    if not bool(np.isfinite(array).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return array
