"""Training-time pictures: sample grids, VAE reconstructions and interpolations, and image tensors as uint8.

No Hydra, no checkpoint files: the objectives and data options draw with these (the command-line and
Python-API sampling, :mod:`gantrain.sampling`, writes its PNGs with them too).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn


def sample_grid(images: torch.Tensor, per_row: int | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(3, H', W')`` grid in [0, 1], ``per_row`` images per row (None:
    ``ceil(sqrt(N))``). The one layout for every sample grid: the Trainer's periodic grids and ``sample.py --out
    x.png``; a conditional model's training grid has one row per class (:func:`class_rows`)."""
    from torchvision.utils import make_grid  # imported when used: torchvision takes ~1.5 s to import

    nrow = math.ceil(math.sqrt(images.shape[0])) if per_row is None else per_row
    return make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))


MIN_PER_ROW = 4  # samples of one class in a row of a conditional run's grid, before classes are left out


def class_rows(num_classes: int, num_samples: int) -> tuple[torch.Tensor, int]:
    """(the fixed labels of a conditional model's sample grid, its row length): one row per class shown.

    ``rows = min(num_classes, num_samples // MIN_PER_ROW)`` rows (at least one) of ``per_row = num_samples // rows``
    samples each, so every class gets a row when each row can still show ``MIN_PER_ROW`` samples; the labels
    ``(rows * per_row,)`` int64 are row-major (row ``r``'s class ``per_row`` times), for the first ``rows * per_row`` of
    the fixed noise. When there are more classes than rows, the rows show classes evenly spaced from the first to the
    last: row ``r`` is class ``round(r * (num_classes - 1) / (rows - 1))``. E.g. 10 classes, 64 samples: 10 rows of 6;
    16 samples: 4 rows of 4, classes 0 3 6 9; 25 classes, 64 samples: 16 rows of 4. Deterministic (no RNG)."""
    rows = min(num_classes, num_samples // MIN_PER_ROW) or min(num_classes, num_samples)
    if rows < 1:
        raise ValueError(f"class_rows: no row for {num_classes} classes and {num_samples} samples")
    shown = torch.arange(rows)
    if 1 < rows < num_classes:  # round(r * (K - 1) / (rows - 1)) in integers: half rounds up
        shown = (2 * shown * (num_classes - 1) + rows - 1) // (2 * (rows - 1))
    per_row = num_samples // rows
    return shown.repeat_interleave(per_row), per_row


def samples_picture(model: nn.Module, render: Callable, noise: torch.Tensor) -> torch.Tensor:
    """The training-time picture of a model's samples from the fixed ``noise``: ``render(model.sample(noise))``, or for
    a conditional model one row per class (:func:`class_rows`), drawn with ``render(samples, per_row=...)``."""
    if not model.conditional:
        return render(model.sample(noise))
    labels, per_row = class_rows(model.num_classes, noise.shape[0])
    return render(model.sample(noise[: len(labels)], labels.to(noise.device)), per_row=per_row)


@torch.no_grad()
def reconstruction_grid(
    vae: nn.Module, x: torch.Tensor, per_row: int = 4, y: torch.Tensor | None = None
) -> torch.Tensor:
    """Inputs beside their reconstructions (posterior mean, decoded): ``(3, H', W')`` in [0, 1]. ``x`` ``(N, C, H, W)``
    in [-1, 1] (``y``: their labels, for a conditional VAE); each row holds ``per_row`` (input, reconstruction)
    pairs."""
    recon = vae.reconstruct(x) if y is None else vae.reconstruct(x, y)
    pairs = torch.stack([x, recon.to(x.dtype)], dim=1).flatten(0, 1)  # (2N, C, H, W): x0, r0, x1, ...
    from torchvision.utils import make_grid

    return make_grid(pairs.float().cpu(), nrow=2 * per_row, normalize=True, value_range=(-1, 1))


@torch.no_grad()
def interpolation_strip(
    vae: nn.Module, x: torch.Tensor, steps: int = 10, y: torch.Tensor | None = None
) -> torch.Tensor:
    """Decoded straight lines between the posterior means of consecutive pairs of ``x``: one row per pair. ``x``
    ``(2P, C, H, W)`` in [-1, 1] -> ``(3, H', W')`` in [0, 1]; row ``p``: image ``2p`` to ``2p + 1`` in ``steps``.
    A conditional VAE (``y``: the labels of ``x``) encodes each image with its label and decodes row ``p`` with image
    ``2p``'s label: the strip moves in z with the class held."""
    mu, _ = vae.encode(x) if y is None else vae.encode(x, y)
    start, end = mu[0::2], mu[1::2]  # (P, D)
    t = torch.linspace(0, 1, steps, device=mu.device, dtype=mu.dtype).view(1, steps, 1)
    z = (start[:, None] + t * (end - start)[:, None]).flatten(0, 1)  # (P * steps, D)
    images = vae(z) if y is None else vae(z, y[0::2].repeat_interleave(steps))
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=steps, normalize=True, value_range=(-1, 1))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8, ``round((x + 1) / 2 * 255)`` after clamping."""
    return unit_to_uint8((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)


def unit_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, H, W, C)`` uint8, rounding half up as ``torchvision.utils.save_image``."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
