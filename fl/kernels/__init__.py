"""Bonsai's kernels: fused Triton kernels, each with a pure-PyTorch reference.

Every public function dispatches on its inputs: CUDA tensors run the Triton
kernel, CPU tensors the vectorised reference (``<name>_reference``, same
signature, same module). ``backend="triton"`` forces the kernel (the tests
run it on CPU tensors under ``TRITON_INTERPRET=1``) and raises if Triton is
missing; ``backend="torch"`` forces the reference. Importing this package
never requires Triton.

The optimizer steps (``masked_sgd_step``, ``masked_adamw_step``) also take a
stacked ``[rows, n]`` buffer, one row per client of a cohort (fl/cohort.py):
one launch, per-row learning rates, masks, anchors, clip bounds, step counts
and ``active`` flags; a 1-D buffer is the single-client call.

Bad input raises ``ValueError`` naming the argument.
"""

from fl.kernels._dispatch import BACKENDS, use_triton
from fl.kernels._optim_common import OPTIM_GPU_BLOCK
from fl.kernels._triton import HAS_TRITON
from fl.kernels.adamw import masked_adamw_step, masked_adamw_step_reference
from fl.kernels.bitpack import pack_bits, pack_bits_reference, unpack_bits, unpack_bits_reference
from fl.kernels.compact import (
    gather_kept,
    gather_kept_reference,
    scatter_kept,
    scatter_kept_reference,
)
from fl.kernels.quant import (
    dequantize_int8_blocks,
    dequantize_int8_blocks_reference,
    quantize_int8_blocks,
    quantize_int8_blocks_reference,
)
from fl.kernels.segment import segment_minmax_normalize, segment_minmax_normalize_reference
from fl.kernels.select import (
    kth_value,
    kth_value_reference,
    quantile,
    quantile_reference,
    threshold_mask,
    threshold_mask_reference,
)
from fl.kernels.sgd import masked_sgd_step, masked_sgd_step_reference
from fl.kernels.sqdev import sq_dev_accumulate, sq_dev_accumulate_reference

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "OPTIM_GPU_BLOCK",
    "dequantize_int8_blocks",
    "dequantize_int8_blocks_reference",
    "gather_kept",
    "gather_kept_reference",
    "kth_value",
    "kth_value_reference",
    "masked_adamw_step",
    "masked_adamw_step_reference",
    "masked_sgd_step",
    "masked_sgd_step_reference",
    "pack_bits",
    "pack_bits_reference",
    "quantile",
    "quantile_reference",
    "quantize_int8_blocks",
    "quantize_int8_blocks_reference",
    "scatter_kept",
    "scatter_kept_reference",
    "segment_minmax_normalize",
    "segment_minmax_normalize_reference",
    "sq_dev_accumulate",
    "sq_dev_accumulate_reference",
    "threshold_mask",
    "threshold_mask_reference",
    "use_triton",
    "unpack_bits",
    "unpack_bits_reference",
]
