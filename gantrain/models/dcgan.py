"""DCGAN (Radford et al. 2016): transposed-conv generator and strided-conv discriminator.

At 32 px the generator goes 1 -> 4 -> 8 -> 16 -> 32 with widths 4*ngf, 2*ngf, ngf (256, 128, 64);
each extra doubling of the resolution adds one layer in front (64 px: 512, 256, 128, 64).
The discriminator mirrors it. Kernel 4, stride 2, padding 1 throughout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gantrain.errors import ConfigError

D_NORMS = ("batch", "layer", "instance", "none")
G_NORMS = ("batch", "none")


def _n_doublings(resolution: int) -> int:
    n = math.log2(resolution) - 2
    if resolution < 8 or n != int(n):
        raise ConfigError(f"model.resolution={resolution}: DCGAN needs a power of two >= 8 (32 and 64 are the usual)")
    return int(n)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":  # LayerNorm over (C, H, W), as WGAN-GP recommends for critics
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class Generator(nn.Module):
    """DCGAN generator: ``(B, nz, 1, 1)`` noise -> ``(B, channels, R, R)`` images in [-1, 1] (Tanh)."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3, resolution: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in G_NORMS:
            raise ConfigError(f"model.g.norm={norm!r}; allowed: {', '.join(G_NORMS)}")
        n = _n_doublings(resolution)
        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]  # e.g. [256, 128, 64] at 32 px
        bias = norm == "none"  # a bias right before a norm layer is redundant
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=bias),
            _norm(norm, widths[0]),
            nn.ReLU(True),
        ]  # (B, 4ngf, 4, 4)
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias), _norm(norm, c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # (B, C, R, R)
        self.net = nn.Sequential(*layers)
        self.nz, self.channels, self.resolution = nz, channels, resolution
        self.latent_shape = (nz, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """DCGAN discriminator: ``(B, channels, R, R)`` -> ``(B,)`` logits (no sigmoid: losses take logits).

    ``norm`` picks the hidden-layer normalisation; WGAN-GP critics must not use ``batch`` (the
    penalty is per sample, BatchNorm mixes samples). The first layer has no norm, as in the paper.
    ``features(x)`` returns the last hidden activation ``(B, 4ndf, 4, 4)`` for feature-matching losses.
    """

    def __init__(self, ndf: int = 64, channels: int = 3, resolution: int = 32, norm: str = "batch"):
        super().__init__()
        if norm not in D_NORMS:
            raise ConfigError(f"model.d.norm={norm!r}; allowed: {', '.join(D_NORMS)}")
        n = _n_doublings(resolution)
        widths = [ndf * 2**i for i in range(n)]  # e.g. [64, 128, 256] at 32 px
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=bias), _norm(norm, c_out), nn.LeakyReLU(0.2, True)]
        self.body = nn.Sequential(*layers)  # (B, 4ndf, 4, 4)
        self.head = nn.Conv2d(widths[-1], 1, 4, 1, 0)  # (B, 1, 1, 1)
        self.channels, self.resolution = channels, resolution

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten()  # (B,)
