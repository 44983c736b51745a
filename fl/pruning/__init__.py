"""AutoFLIP hybrid pruning: guidance -> structured + unstructured masks -> smaller model.

Interno et al., "Federated Hybrid Model Pruning through Loss Landscape
Exploration", arXiv 2405.10271, as specified (and overridden) by docs/ALGORITHMS.md
section 1. One job per module:

- :mod:`~fl.pruning.guidance`: exploration guidance, folding updates, GuidanceState
- :mod:`~fl.pruning.tracing`: the torch-pruning dependency graph, with our LSTM and GroupNorm rules
- :mod:`~fl.pruning.groups`: coupled unit groups (read from that graph)
- :mod:`~fl.pruning.structured`: M_s, the kept units per group (a Structure)
- :mod:`~fl.pruning.unstructured`: M_u, the hybrid mask, random/magnitude baselines
- :mod:`~fl.pruning.shrink`: the physically smaller model and state maps between views
- :mod:`~fl.pruning.flops`: FLOPs per example from the real layer shapes
- :mod:`~fl.pruning.schedule`: cubic sparsity schedule, mask period
"""

from fl.pruning.flops import count_flops, sparse_flops, training_flops_per_example
from fl.pruning.groups import (
    Member,
    UnitGroup,
    build_groups,
    classifier_name,
    groups_for,
    prunable_names,
)
from fl.pruning.guidance import GuidanceState, exploration_guidance, fold_updates
from fl.pruning.plan import MaskPlan, plan_masks
from fl.pruning.schedule import cubic_sparsity
from fl.pruning.shrink import expand_state, shrink_model, shrink_state
from fl.pruning.structured import (
    Structure,
    full_structure,
    select_units,
    structure_from_json,
    structure_to_json,
    structured_mask,
    unit_scores,
    validate_structure,
    zero_units,
)
from fl.pruning.unstructured import (
    density,
    global_threshold_mask,
    hybrid_mask,
    magnitude_mask,
    random_mask,
)

__all__ = [
    "MaskPlan",
    "plan_masks",
    "GuidanceState",
    "Member",
    "Structure",
    "UnitGroup",
    "build_groups",
    "classifier_name",
    "count_flops",
    "cubic_sparsity",
    "density",
    "expand_state",
    "exploration_guidance",
    "fold_updates",
    "full_structure",
    "global_threshold_mask",
    "groups_for",
    "hybrid_mask",
    "magnitude_mask",
    "prunable_names",
    "random_mask",
    "select_units",
    "shrink_model",
    "shrink_state",
    "sparse_flops",
    "structure_from_json",
    "structure_to_json",
    "structured_mask",
    "training_flops_per_example",
    "unit_scores",
    "validate_structure",
    "zero_units",
]
