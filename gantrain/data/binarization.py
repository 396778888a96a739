"""Stochastic binarization (`data.binarize`): pixels in [-1, 1] become -1 or +1."""

from __future__ import annotations

import torch

from gantrain.data.common import derive_seed

MODES = ("none", "static", "dynamic")
# The constant behind data.binarize=static and heldout(): every run, whatever its seed, sees the
# same binarized images, so held-out NLLs of different runs are comparable.
STATIC_SEED = 0


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic binarization (Salakhutdinov & Murray 2008) of images in [-1, 1]. Pixel x becomes +1 with probability
    (x + 1) / 2, else -1 (black and white stay). The uniforms come from `generator` alone (on `images`' device), never
    from the global RNG."""
    u = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)  # [0, 1)
    return (u < (images + 1) / 2).to(images.dtype).mul_(2).sub_(1)


def static_binarized(images: torch.Tensor, first_index: int) -> torch.Tensor:
    """The fixed binarization of dataset items first_index, first_index + 1, ... (stacked in `images`).

    Item i gets the CPU uniforms of `Generator().manual_seed(derive_seed("binarize/static", STATIC_SEED, i))`:
    only the image and its index matter (not holdout, batch size, seed, device or load order).
    """
    out = torch.empty_like(images)
    gen = torch.Generator()
    for k in range(images.shape[0]):
        gen.manual_seed(derive_seed("binarize/static", STATIC_SEED, first_index + k))
        out[k] = binarize(images[k].cpu(), gen)
    return out
