"""`Batch`, what the data stream yields and every phase loss receives, and `Latents`, what a model's prior draws.
Both carry optional labels, so a label travels with its image (or noise); unconditional models ignore ``y``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """``x``: images ``(B, C, H, W)`` in [-1, 1] or 2-D points ``(B, dim)``; ``y``: their int64 class labels
    ``(B,)`` in ``[0, data.num_classes)``, None where the data has none. ``len(batch)`` is B."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        y = None if self.y is None else self.y.to(device, non_blocking=non_blocking)
        return Batch(self.x.to(device, non_blocking=non_blocking), y)


@dataclass
class Latents:
    """What ``GenerativeModel.prior`` draws: noise ``z`` ``(B, *g.latent_shape)`` and the labels to generate
    ``y`` ``(B,)`` (None: unconditional; a class-conditional prior will draw them here, beside ``z``)."""

    z: torch.Tensor
    y: torch.Tensor | None = None
