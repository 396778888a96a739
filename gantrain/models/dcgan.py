"""DCGAN (Radford et al. 2016): transposed-conv generator and strided-conv discriminator.

At 32 px the generator goes 1 -> 4 -> 8 -> 16 -> 32 with widths 4*ngf, 2*ngf, ngf (256, 128, 64); each extra doubling of
the resolution adds one layer in front (64 px: 512, 256, 128, 64). The discriminator mirrors it. Kernel 4, stride 2,
padding 1 throughout. The discriminator's last layer is a :class:`~gantrain.models.layers.DiscriminatorHead` on the
flattened ``(4ndf, 4, 4)`` map (a Linear on the 4x4 map computes the same functions as the paper's final 4x4 conv).
Class-conditional (``num_classes`` > 0): G's BatchNorms become :class:`~gantrain.models.layers.ConditionalBatchNorm`,
D gets a projection term and/or an auxiliary classifier in its head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gantrain import checks
from gantrain.models.layers import (
    NORMS,
    DiscriminatorHead,
    HeadedDiscriminator,
    apply_spectral_norm,
    check_labels,
    label_dim_for,
    norm_layer,
    norm_or_conditional,
    run,
)

D_NORMS = NORMS
G_NORMS = ("batch", "none")


MAX_RESOLUTION = 256  # G's first layer is 32*ngf wide there, and each doubling doubles it (8192 px: 1024*ngf)


def _n_doublings(resolution: int) -> int:
    ok = isinstance(resolution, int) and not isinstance(resolution, bool) and 8 <= resolution <= MAX_RESOLUTION
    if not ok or resolution & (resolution - 1):
        checks.fail("resolution", resolution, f"a power of two from 8 to {MAX_RESOLUTION}", "32 and 64 are the usual")
    return int(math.log2(resolution)) - 2


class Generator(nn.Module):
    """DCGAN generator: ``(B, nz, 1, 1)`` noise -> ``(B, channels, R, R)`` images in [-1, 1] (Tanh). ``dropout`` > 0
    adds ``Dropout2d(dropout)`` after every hidden ReLU (active in train mode only). ``num_classes`` > 0:
    ``forward(z, y)`` takes int64 labels ``(B,)``; with ``norm=batch`` and ``conditional_norm`` every BatchNorm is
    class-conditional; a learned label embedding of ``label_dim`` values is concatenated to the noise (the cGAN of
    Mirza & Osindero 2014, and how ACGAN feeds its label) when ``label_dim`` > 0, or when it is None and the norms
    are not conditional (then ``min(num_classes, 16)`` values)."""

    def __init__(
        self,
        nz: int = 100,
        ngf: int = 64,
        channels: int = 3,
        resolution: int = 32,
        norm: str = "batch",
        dropout: float = 0.0,
        num_classes: int = 0,
        conditional_norm: bool = True,
        label_dim: int | None = None,
    ):
        super().__init__()
        for key, value in (("nz", nz), ("ngf", ngf), ("channels", channels)):
            checks.integer(key, value, at_least=1)
        checks.choice("norm", norm, G_NORMS)
        self.num_classes = checks.integer("num_classes", num_classes, 0)
        norm_classes = num_classes if conditional_norm and norm == "batch" else 0  # conditional BatchNorms
        label_dim = label_dim_for(num_classes, label_dim, norm_classes > 0)
        checks.number("dropout", dropout, ge=0, lt=1, hint="0 turns dropout off")
        n = _n_doublings(resolution)
        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]  # e.g. [256, 128, 64] at 32 px
        bias = norm == "none"  # a bias right before a norm layer is redundant

        def act() -> list[nn.Module]:
            return [nn.ReLU(True)] + ([nn.Dropout2d(dropout)] if dropout > 0 else [])

        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz + label_dim, widths[0], 4, 1, 0, bias=bias),
            norm_or_conditional(norm, widths[0], norm_classes),
            *act(),
        ]  # (B, 4ngf, 4, 4)
        for c_in, c_out in zip(widths, widths[1:]):
            cbn = norm_or_conditional(norm, c_out, norm_classes)
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias), cbn]
            layers += act()
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]  # (B, C, R, R)
        self.net = nn.Sequential(*layers)
        self.nz, self.channels, self.resolution = nz, channels, resolution
        self.latent_shape = (nz, 1, 1)
        self.embed = nn.Embedding(num_classes, label_dim) if label_dim else None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels("this generator", self.num_classes, y)
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)[:, :, None, None]], dim=1)  # (B, nz + label_dim, 1, 1)
        return run(self.net, z, y)


class Discriminator(HeadedDiscriminator):
    """DCGAN discriminator: ``(B, channels, R, R)`` -> ``(B,)`` logits (no sigmoid: losses take logits). ``norm``: the
    hidden layers' (not the first's, as in the paper); WGAN-GP critics must not use ``batch`` (the penalty is per
    sample). ``features(x)``: the last hidden activation ``(B, 4ndf, 4, 4)``; ``forward(x) == head(features(x))``.
    ``spectral_norm`` wraps every conv/linear/embedding weight; ``minibatch_*``: the head's statistics. ``num_classes``,
    ``projection``, ``aux_classifier``: the head's class conditioning (``forward(x, y)``, ``classify(h)``)."""

    def __init__(
        self,
        ndf: int = 64,
        channels: int = 3,
        resolution: int = 32,
        norm: str = "batch",
        spectral_norm: bool = False,
        minibatch_std: int = 0,
        minibatch_kernels: int = 0,
        minibatch_kernel_dim: int = 16,
        num_classes: int = 0,
        projection: bool = True,
        aux_classifier: bool = False,
    ):
        super().__init__()
        checks.integer("ndf", ndf, at_least=1)
        checks.integer("channels", channels, at_least=1)
        checks.choice("norm", norm, D_NORMS)
        n = _n_doublings(resolution)
        widths = [ndf * 2**i for i in range(n)]  # e.g. [64, 128, 256] at 32 px
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=bias), norm_layer(norm, c_out), nn.LeakyReLU(0.2, True)]
        self.body = nn.Sequential(*layers)  # (B, 4ndf, 4, 4)
        self.head = DiscriminatorHead(
            (widths[-1], 4, 4),
            minibatch_std,
            minibatch_kernels,
            minibatch_kernel_dim,
            num_classes,
            projection,
            aux_classifier,
        )
        self.channels, self.resolution = channels, resolution
        if spectral_norm:
            apply_spectral_norm(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
