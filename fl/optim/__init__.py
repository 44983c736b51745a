"""Masked optimizers on flat buffers: MaskedSGD and MaskedAdamW.

AutoFLIP's local training is masked (docs/ALGORITHMS.md §1.3): a pruned entry stays
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

from fl.optim.cohort import CohortAdamW, CohortSGD
from fl.optim.masked import MaskedAdamW, MaskedSGD

__all__ = ["CohortAdamW", "CohortSGD", "MaskedAdamW", "MaskedSGD"]
