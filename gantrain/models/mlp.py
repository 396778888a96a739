"""Fully connected generator and discriminator for low-dimensional toy data (e.g. 2-D mixtures of Gaussians).

Samples are vectors ``(B, dim)``, not images: the models have ``dim`` instead of ``resolution``/``channels``.
Class-conditional (``num_classes`` > 0): G concatenates a label embedding to its noise (Mirza & Osindero 2014), D's
head adds the projection term and/or an ACGAN classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from gantrain import checks
from gantrain.errors import ConfigError
from gantrain.models.layers import (
    NORMS_1D,
    DiscriminatorHead,
    HeadedDiscriminator,
    apply_spectral_norm,
    check_labels,
    label_dim_for,
    norm_layer,
)


class Generator(nn.Module):
    """``(B, nz)`` noise -> ``(B, out_dim)`` samples. ``depth`` x (Linear, [norm], ReLU[, Dropout]), then Linear.
    ``norm``: batch | layer | none (PacGAN's: batch). ``num_classes`` > 0: ``forward(z, y)`` concatenates ``embed(y)``,
    an ``nn.Embedding(num_classes, label_dim)`` (N(0, 1) like the noise; ``label_dim`` None: ``min(num_classes, 16)``),
    to the noise before the first Linear."""

    def __init__(
        self,
        nz: int = 2,
        width: int = 256,
        depth: int = 3,
        out_dim: int = 2,
        dropout: float = 0.0,
        norm: str = "none",
        num_classes: int = 0,
        label_dim: int | None = None,
    ):
        super().__init__()
        for key, value in (("nz", nz), ("width", width), ("depth", depth), ("out_dim", out_dim)):
            checks.integer(key, value, 1)
        checks.number("dropout", dropout, ge=0, lt=1, hint="0 turns dropout off")
        checks.choice("norm", norm, NORMS_1D)
        self.num_classes = checks.integer("num_classes", num_classes, 0)
        label_dim = label_dim_for(num_classes, label_dim, conditional_norms=False)  # its labels join the noise
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Linear(nz + label_dim if i == 0 else width, width, bias=norm == "none"),
                norm_layer(norm, width, dims=1),
                nn.ReLU(True),
            ]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, label_dim) if num_classes else None
        self.nz, self.dim = nz, out_dim
        self.latent_shape = (nz,)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels("this generator", self.num_classes, y)
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        return self.net(z)


class Discriminator(HeadedDiscriminator):
    """``(B, in_dim)`` -> ``(B,)`` logits: body of ``depth`` x (Linear, [norm], LeakyReLU(0.2)), then the head.
    ``features(x)``: the body's last activation ``(B, width)``; ``forward(x) == head(features(x))``. ``norm``: batch |
    layer | none (a bias before a norm is dropped). ``pack``: PacGAN (Lin et al. 2018): D judges ``pack`` concatenated
    samples at once, outputs ``(B / pack,)`` (B a multiple of ``pack``); losses work unchanged. ``num_classes``,
    ``projection``, ``aux_classifier``: the head's class conditioning (not with ``pack`` > 1: one label per packed
    row is ill-defined)."""

    def __init__(
        self,
        in_dim: int = 2,
        width: int = 256,
        depth: int = 3,
        norm: str = "none",
        spectral_norm: bool = False,
        minibatch_std: int = 0,
        minibatch_kernels: int = 0,
        minibatch_kernel_dim: int = 16,
        pack: int = 1,
        num_classes: int = 0,
        projection: bool = True,
        aux_classifier: bool = False,
    ):
        super().__init__()
        checks.choice("norm", norm, NORMS_1D)
        for key, value in (("in_dim", in_dim), ("pack", pack), ("width", width), ("depth", depth)):
            checks.integer(key, value, 1)
        if num_classes and pack > 1:
            raise ConfigError(
                f"pack={pack}: a class-conditional discriminator judges one labelled sample at a time; use pack=1",
                key="pack",
            )
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Linear(in_dim * pack if i == 0 else width, width, bias=norm == "none"),
                norm_layer(norm, width, dims=1),
                nn.LeakyReLU(0.2, True),
            ]
        self.body = nn.Sequential(*layers)
        self.head = DiscriminatorHead(
            (width,), minibatch_std, minibatch_kernels, minibatch_kernel_dim, num_classes, projection, aux_classifier
        )
        self.dim, self.pack = in_dim, pack
        if spectral_norm:
            apply_spectral_norm(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pack > 1:
            if x.shape[0] % self.pack:
                raise ConfigError(f"model.d.pack={self.pack} needs a batch size divisible by it, got {x.shape[0]}")
            x = x.reshape(x.shape[0] // self.pack, self.pack * x.shape[1])  # (B/pack, pack*dim), consecutive
        return self.body(x)
