"""ResNet generator and discriminator of SNGAN (Miyato et al. 2018, the CIFAR-10 ResNet of the appendix).

Widths are constant (``ngf`` in G, ``ndf`` in D). Resolutions 32 (the paper's) and 64 are supported:
64 px adds one up-block to G and one down-block to D; anything else raises a ConfigError.

* G: ``Linear(nz -> 4*4*ngf)`` -> n up-blocks (4 -> 8 -> ... -> R) -> BN, ReLU, conv3x3 -> Tanh.
  Up-block: ``BN, ReLU, upsample x2 (nearest), conv3x3, BN, ReLU, conv3x3`` + shortcut ``upsample, conv1x1``.
* D: "optimized" first block ``conv3x3, ReLU, conv3x3, avgpool`` + shortcut ``avgpool, conv1x1`` (R -> R/2);
  down-blocks ``ReLU, conv3x3, ReLU, conv3x3, avgpool`` + shortcut ``conv1x1, avgpool`` down to 8x8; two
  blocks at 8x8 with identity shortcuts; ReLU; sum over H, W -> ``features (B, ndf)`` -> head.
* Class-conditional (``num_classes`` > 0), as in Miyato & Koyama 2018: every BN of G is a
  :class:`~gantrain.models.layers.ConditionalBatchNorm`; D's head adds the projection term (and/or an ACGAN classifier).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gantrain import checks
from gantrain.models.layers import (
    NORMS,
    DiscriminatorHead,
    HeadedDiscriminator,
    apply_spectral_norm,
    call,
    check_labels,
    label_dim_for,
    norm_layer,
    norm_or_conditional,
    run,
)

RESOLUTIONS = (32, 64)


def _n_up(resolution: int) -> int:
    return {32: 3, 64: 4}[checks.choice("resolution", resolution, RESOLUTIONS)]


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GBlock(nn.Module):
    """Residual up-block: ``(B, c_in, H, W) -> (B, c_out, 2H, 2W)``; conditional BNs when ``num_classes`` > 0."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        self.bn1, self.conv1 = norm_or_conditional("batch", c_in, num_classes), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2, self.conv2 = norm_or_conditional("batch", c_out, num_classes), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(_up(self.drop(F.relu(call(self.bn1, x, y)))))
        h = self.conv2(self.drop(F.relu(call(self.bn2, h, y))))
        return h + self.shortcut(_up(x))


class DBlock(nn.Module):
    """Residual block ``[norm], ReLU, conv3x3, [norm], ReLU, conv3x3, [avgpool]``. ``optimized``: the first block of D,
    which sees raw images: ``conv3x3, [norm], ReLU, conv3x3, avgpool`` with shortcut ``avgpool, conv1x1``. Otherwise the
    shortcut is ``conv1x1, avgpool`` when the block downsamples or changes width, and the identity when it does
    neither."""

    def __init__(self, c_in: int, c_out: int, norm: str = "none", down: bool = True, optimized: bool = False):
        super().__init__()
        self.down, self.optimized = down or optimized, optimized
        self.norm1 = nn.Identity() if optimized else norm_layer(norm, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        learnable = self.down or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0) if learnable else None

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x if self.optimized else F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return F.avg_pool2d(h, 2) if self.down else h

    def _skip(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x
        if self.optimized:
            return self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        return F.avg_pool2d(s, 2) if self.down else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x) + self._skip(x)


class Generator(nn.Module):
    """SNGAN ResNet generator: ``(B, nz)`` noise -> ``(B, channels, R, R)`` images in [-1, 1] (Tanh). ``dropout`` > 0
    adds ``Dropout2d(dropout)`` after every hidden ReLU (blocks and final), in train mode only. ``num_classes`` > 0:
    ``forward(z, y)`` with int64 labels ``(B,)``; conditional BatchNorms (``conditional_norm``) and/or a learned label
    embedding of ``label_dim`` values concatenated to the noise (None: none with conditional norms, else
    ``min(num_classes, 16)``)."""

    def __init__(
        self,
        nz: int = 128,
        ngf: int = 128,
        channels: int = 3,
        resolution: int = 32,
        dropout: float = 0.0,
        num_classes: int = 0,
        conditional_norm: bool = True,
        label_dim: int | None = None,
    ):
        super().__init__()
        checks.integer("nz", nz, 1)
        checks.integer("ngf", ngf, 1)
        self.num_classes = checks.integer("num_classes", num_classes, 0)
        norm_classes = num_classes if conditional_norm else 0
        label_dim = label_dim_for(num_classes, label_dim, norm_classes > 0)
        checks.number("dropout", dropout, ge=0, lt=1, hint="0 turns dropout off")
        n = _n_up(resolution)
        self.ngf = ngf
        self.linear = nn.Linear(nz + label_dim, 4 * 4 * ngf)
        self.blocks = nn.Sequential(*(GBlock(ngf, ngf, dropout, norm_classes) for _ in range(n)))
        self.out = nn.Sequential(
            norm_or_conditional("batch", ngf, norm_classes),
            nn.ReLU(),
            *([nn.Dropout2d(dropout)] if dropout > 0 else []),
            nn.Conv2d(ngf, channels, 3, 1, 1),
            nn.Tanh(),
        )
        self.nz, self.channels, self.resolution = nz, channels, resolution
        self.latent_shape = (nz,)
        self.embed = nn.Embedding(num_classes, label_dim) if label_dim else None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels("this generator", self.num_classes, y)
        z = z.flatten(1) if self.embed is None else torch.cat([z.flatten(1), self.embed(y)], dim=1)
        h = self.linear(z).view(-1, self.ngf, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return run(self.out, h, y)


class Discriminator(HeadedDiscriminator):
    """SNGAN ResNet discriminator: ``(B, channels, R, R)`` -> ``(B,)`` logits. ``features(x)``: the sum-pooled last
    activation ``(B, ndf)``; ``forward(x) == head(features(x))``. ``norm`` (default none, as in SNGAN) goes before every
    ReLU in the blocks (WGAN-GP critics: not ``batch``); ``spectral_norm`` wraps every conv/linear/embedding weight,
    head included. ``num_classes``, ``projection``, ``aux_classifier``: the head's class conditioning (``forward(x,
    y)``, ``classify(h)``; SNGAN-projection is ``spectral_norm`` with ``projection``)."""

    def __init__(
        self,
        ndf: int = 128,
        channels: int = 3,
        resolution: int = 32,
        norm: str = "none",
        spectral_norm: bool = False,
        minibatch_std: int = 0,
        minibatch_kernels: int = 0,
        minibatch_kernel_dim: int = 16,
        num_classes: int = 0,
        projection: bool = True,
        aux_classifier: bool = False,
    ):
        super().__init__()
        checks.choice("norm", norm, NORMS)
        checks.integer("ndf", ndf, 1)
        n = _n_up(resolution)
        blocks = [DBlock(channels, ndf, norm, optimized=True)]  # R -> R/2
        blocks += [DBlock(ndf, ndf, norm, down=True) for _ in range(n - 2)]  # ... -> 8
        blocks += [DBlock(ndf, ndf, norm, down=False) for _ in range(2)]
        self.blocks = nn.Sequential(*blocks)
        self.head = DiscriminatorHead(
            (ndf,), minibatch_std, minibatch_kernels, minibatch_kernel_dim, num_classes, projection, aux_classifier
        )
        self.ndf, self.channels, self.resolution = ndf, channels, resolution
        if spectral_norm:
            apply_spectral_norm(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(x)).sum(dim=(2, 3))  # (B, ndf)
