"""A small fixed feature network for the evaluation tests: what a user's own extractor (``_target_``) is."""

from __future__ import annotations

import torch
from torch import nn


class TinyFeatures(nn.Module):
    """Images ``(B, C, H, W)`` in [-1, 1] -> ``(B, dim)``: 4x4 average-pooled grey levels through a fixed random
    projection and a tanh (weights from its own generator: building it leaves the global RNG alone)."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.weight = nn.Parameter(torch.randn(16, dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pool(images.mean(1, keepdim=True)).flatten(1) @ self.weight)
