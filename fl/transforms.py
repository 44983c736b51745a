"""The per-batch transform between stored examples and the model: one small object.

Images decoded from files or the hub are stored as uint8 (fl.datacache keeps
them memory-mapped) and become float32 only per batch, on the training device:
divided by 255, augmented (training batches only: a random crop after
padding, a random horizontal flip), then normalised per channel with the
training pool's mean and std. Token ids (int64) and data that is already
float32 (digits, synthetic, .npz) pass unchanged unless a key asks otherwise,
so those runs compute exactly what they computed before this object existed.

The random choices come from a ``torch.Generator`` on the CPU that
:meth:`BatchTransform.generator` seeds from the seed the client's batch order
uses (fl.train: ``round_seed(cfg.seed, round, salt=1000 + partition_id)``): the
same client, round and seed give the same augmented batches on any device, so a
rerun reproduces a run. The draws of one batch (:meth:`BatchTransform.draw`) are
separate from applying them (:meth:`BatchTransform.apply`) so that the cohort
trainer can draw per client and transform the whole cohort's batch at once.

Written here rather than with torchvision: torchvision's transforms draw from
the global RNG per image, on the host; this is a batched, seeded version of
``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` + ``Normalize``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.nn import functional as F

from fl.sampling import round_seed

__all__ = ["IDENTITY", "PAD_MODES", "AugmentDraw", "BatchTransform"]

#: how the border of a padded image is filled before the random crop
PAD_MODES = ("zeros", "reflect")
#: salt of the augmentation generator's seed (batches use the seed itself)
_AUGMENT_SALT = 7_001


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for a batch of ``n`` examples: crop offsets (n, 2) into the
    padded image (rows, columns) and horizontal flips (n,), both on the CPU."""

    offsets: torch.Tensor | None
    flips: torch.Tensor | None

    @staticmethod
    def concat(draws: list[AugmentDraw]) -> AugmentDraw:
        """The draws of several batches, in order (the cohort's clients)."""
        offs = [d.offsets for d in draws if d.offsets is not None]
        flips = [d.flips for d in draws if d.flips is not None]
        return AugmentDraw(torch.cat(offs) if offs else None,
                           torch.cat(flips) if flips else None)


@lru_cache(maxsize=16)
def _per_channel(values: tuple[float, ...], device: str) -> torch.Tensor:
    """(1, C, 1, 1) float32 on ``device`` (cached: built once per device)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class BatchTransform:
    """What turns a batch of stored examples into the model's input.

    Parameters
    ----------
    divisor : float or None
        Divide by this after converting to float32 (255 for uint8 images, as
        torchvision's ``ToTensor``); None: the examples are used as stored (float32
        data, token ids).
    mean, std : tuple of float or None
        Per-channel normalisation ``(x - mean[c]) / std[c]`` after scaling.
    crop_padding : int
        Training only: pad each side by this many pixels, then crop a random
        window of the original size (0 = off).
    pad_mode : str
        ``zeros`` (torchvision's ``RandomCrop(padding=...)``) or ``reflect``.
    flip : bool
        Training only: flip each image left-right with probability 1/2.
    """

    divisor: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_padding: int = 0
    pad_mode: str = "zeros"
    flip: bool = False

    @property
    def augments(self) -> bool:
        """Whether training batches draw random choices."""
        return self.crop_padding > 0 or self.flip

    @property
    def identity(self) -> bool:
        """Whether every batch passes unchanged (then nothing is drawn either)."""
        return self.divisor is None and self.mean is None and not self.augments

    def generator(self, seed: int) -> torch.Generator | None:
        """The CPU generator of the augmentation draws, derived from the batch seed;
        None when nothing is drawn."""
        if not self.augments:
            return None
        return torch.Generator().manual_seed(round_seed(seed, 0, salt=_AUGMENT_SALT))

    def draw(self, n: int, generator: torch.Generator | None) -> AugmentDraw | None:
        """The random choices for a training batch of ``n`` examples (None: no
        augmentation). Consumes ``generator`` in a fixed order: offsets, then flips."""
        if not self.augments:
            return None
        if generator is None:
            raise ValueError("generator: augmentation needs one (BatchTransform.generator)")
        offsets = (torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
                   if self.crop_padding else None)
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else None
        return AugmentDraw(offsets, flips)

    def apply(self, xb: torch.Tensor, draw: AugmentDraw | None = None) -> torch.Tensor:
        """``xb`` transformed with the choices ``draw`` (None: no augmentation)."""
        if self.identity or (self.divisor is None and self.mean is None and draw is None):
            return xb
        x = xb.float() if self.divisor is None else xb.float() / self.divisor  # not in place
        if draw is not None:
            if draw.offsets is not None:
                x = self._crop(x, draw.offsets.to(x.device))
            if draw.flips is not None:
                mask = draw.flips.to(x.device).view(-1, *([1] * (x.dim() - 1)))
                x = torch.where(mask, x.flip(-1), x)
        if self.mean is not None and self.std is not None:
            dev = str(x.device)
            x = (x - _per_channel(self.mean, dev)) / _per_channel(self.std, dev)
        return x

    def __call__(self, xb: torch.Tensor, generator: torch.Generator | None,
                 train: bool) -> torch.Tensor:
        """The model's input for the batch ``xb``; a training batch (``train``) is
        augmented with choices drawn from ``generator``."""
        if self.identity:
            return xb
        return self.apply(xb, self.draw(len(xb), generator) if train else None)

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        p = self.crop_padding
        n, _, h, w = x.shape
        mode = "constant" if self.pad_mode == "zeros" else "reflect"
        padded = F.pad(x, (p, p, p, p), mode=mode)
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (n, h)
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # (n, h, w, C): example b's window rows[b] x cols[b], all channels
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


#: the transform of data used as stored
IDENTITY = BatchTransform()
