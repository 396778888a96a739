"""Training-time pictures: sample grids, VAE reconstructions and interpolations, and image tensors as uint8.

No Hydra, no checkpoint files: the objectives and data options draw with these (the command-line and
Python-API sampling, :mod:`gantrain.sampling`, writes its PNGs with them too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def sample_grid(images: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(3, H', W')`` grid in [0, 1], ``ceil(sqrt(N))`` images per row. The one
    layout for every sample grid: the Trainer's periodic grids and ``sample.py --out x.png``."""
    from torchvision.utils import make_grid  # imported when used: torchvision takes ~1.5 s to import

    return make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), normalize=True, value_range=(-1, 1))


@torch.no_grad()
def reconstruction_grid(vae: nn.Module, x: torch.Tensor, per_row: int = 4) -> torch.Tensor:
    """Inputs beside their reconstructions (posterior mean, decoded): ``(3, H', W')`` in [0, 1]. ``x`` ``(N, C, H, W)``
    in [-1, 1]; each row holds ``per_row`` (input, reconstruction) pairs."""
    pairs = torch.stack([x, vae.reconstruct(x).to(x.dtype)], dim=1).flatten(0, 1)  # (2N, C, H, W): x0, r0, x1, ...
    from torchvision.utils import make_grid

    return make_grid(pairs.float().cpu(), nrow=2 * per_row, normalize=True, value_range=(-1, 1))


@torch.no_grad()
def interpolation_strip(vae: nn.Module, x: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoded straight lines between the posterior means of consecutive pairs of ``x``: one row per pair. ``x``
    ``(2P, C, H, W)`` in [-1, 1] -> ``(3, H', W')`` in [0, 1]; row ``p``: image ``2p`` to ``2p + 1`` in ``steps``."""
    mu, _ = vae.encode(x)
    start, end = mu[0::2], mu[1::2]  # (P, D)
    t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype).view(1, steps, 1)
    z = (start[:, None] + t * (end - start)[:, None]).flatten(0, 1)  # (P * steps, D)
    from torchvision.utils import make_grid

    return make_grid(vae(z).float().cpu(), nrow=steps, normalize=True, value_range=(-1, 1))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8, ``round((x + 1) / 2 * 255)`` after clamping."""
    return unit_to_uint8((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)


def unit_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, H, W, C)`` uint8, rounding half up as ``torchvision.utils.save_image``."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
