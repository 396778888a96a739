"""Building blocks shared by the model families: norms, discriminator heads, spectral norm.

Every discriminator ends in a :class:`DiscriminatorHead` (optional minibatch statistics, then one linear unit; for
class-conditional models a projection term and an auxiliary classifier) and can wrap all of its conv/linear/embedding
weights with spectral norm via :func:`apply_spectral_norm`. Conditional generators use :class:`ConditionalBatchNorm`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from gantrain import checks
from gantrain.errors import ConfigError

NORMS = ("batch", "layer", "instance", "none")
NORMS_1D = ("batch", "layer", "none")  # per-feature vectors have no spatial axes to normalise an instance over

SPECTRAL_NORM_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


def norm_layer(norm: str, channels: int, dims: int = 2) -> nn.Module:
    """Normalisation over ``channels`` feature maps (``dims=2``) or features (``dims=1``). ``batch``: BatchNorm2d / 1d.
    ``layer``: GroupNorm(1, C) over (C, H, W), the LayerNorm WGAN-GP recommends for critics / LayerNorm. ``instance``:
    InstanceNorm2d with affine gains (2-D only). ``none``: Identity."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    checks.choice("norm", norm, NORMS if dims == 2 else NORMS_1D)
    if norm == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels) if dims == 2 else nn.LayerNorm(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


# ----------------------------------------------------------------------------- class conditioning
class ConditionalBatchNorm(nn.Module):
    """Class-conditional BatchNorm (de Vries et al. 2017; Miyato & Koyama 2018 for GAN generators): BatchNorm without
    affine (``bn``), then a gain and a bias per class, ``gain(y) * bn(x) + bias(y)``, from ``nn.Embedding(num_classes,
    num_features)`` tables initialised to 1 and 0 (:func:`~gantrain.models.initialize` leaves embeddings alone). With
    one class it computes what ``nn.BatchNorm2d`` / ``1d`` (``dims``) does. ``forward(x, y)``, ``y`` int64 ``(B,)``."""

    def __init__(self, num_features: int, num_classes: int, dims: int = 2):
        super().__init__()
        checks.integer("num_classes", num_classes, 1)
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        self.bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(num_features, affine=False)
        self.gain, self.bias = nn.Embedding(num_classes, num_features), nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)
        self.dims = dims

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)  # per-channel: (B, C, 1, 1) or (B, C)
        return self.gain(y).view(shape) * self.bn(x) + self.bias(y).view(shape)


def norm_or_conditional(norm: str, channels: int, num_classes: int, dims: int = 2) -> nn.Module:
    """:class:`ConditionalBatchNorm` for ``norm=batch`` when ``num_classes`` > 0, else :func:`norm_layer`."""
    if num_classes > 0 and norm == "batch":
        return ConditionalBatchNorm(channels, num_classes, dims)
    return norm_layer(norm, channels, dims)


def label_dim_for(num_classes: int, label_dim: int | None, conditional_norms: bool) -> int:
    """How many label-embedding values a conditional generator concatenates to its noise: ``label_dim`` when given
    (0: none), else none when its norms are conditional and ``min(num_classes, 16)`` when not; 0 without classes."""
    if num_classes == 0:
        return 0
    if label_dim is None:
        return 0 if conditional_norms else min(num_classes, 16)
    return checks.integer("label_dim", label_dim, 0 if conditional_norms else 1)


def call(layer: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``layer(x, y)`` for a :class:`ConditionalBatchNorm`, ``layer(x)`` for any other layer."""
    return layer(x, y) if isinstance(layer, ConditionalBatchNorm) else layer(x)


def run(layers: nn.Sequential, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``layers(x)``, passing labels ``y`` to its conditional norms (the unconditional path is ``nn.Sequential``'s)."""
    for layer in layers:
        x = call(layer, x, y)
    return x


def check_labels(who: str, num_classes: int, y: torch.Tensor | None, needed: bool = True) -> None:
    """ValueError in one line when a conditional network (``needed``) gets no labels, or an unconditional one gets
    some."""
    if num_classes > 0 and needed and y is None:
        raise ValueError(f"{who} is conditional on {num_classes} classes: call it with labels y (int64, shape (B,))")
    if num_classes == 0 and y is not None:
        raise ValueError(f"{who} is unconditional (num_classes=0): it takes no labels y")


# ----------------------------------------------------------------------------- minibatch statistics
def _group_size(batch: int, wanted: int) -> int:
    """The largest divisor of ``batch`` that is <= ``wanted``."""
    for g in range(min(wanted, batch), 0, -1):
        if batch % g == 0:
            return g
    return 1


class MinibatchStdDev(nn.Module):
    """Minibatch standard deviation (Karras et al. 2018, ProGAN, section 3). The batch is cut into consecutive groups of
    ``G`` samples, ``G`` the largest divisor of the batch size <= ``group_size``. Per group, the (biased) standard
    deviation of every feature over the group, averaged over the features, is appended to each of its samples as one
    constant feature map ``(B, C, H, W) -> (B, C+1, H, W)`` or one feature ``(B, F) -> (B, F+1)``."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = checks.integer("minibatch_std", group_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4):
            raise ValueError(f"MinibatchStdDev takes (B, F) or (B, C, H, W), got shape {tuple(x.shape)}")
        b = x.shape[0]
        g = _group_size(b, self.group_size)
        y = x.reshape(b // g, g, -1)  # (groups, G, features)
        var = (y - y.mean(dim=1, keepdim=True)).pow(2).mean(dim=1)  # (groups, features), biased
        stat = torch.sqrt(var + 1e-8).mean(dim=1)  # (groups,)
        stat = stat.repeat_interleave(g)  # (B,), one value per sample
        if x.dim() == 2:
            return torch.cat([x, stat[:, None]], dim=1)
        extra = stat.view(b, 1, 1, 1).expand(b, 1, x.shape[2], x.shape[3])
        return torch.cat([x, extra], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, section 3.2).

    ``M = x @ T`` is read as ``kernels`` rows of ``kernel_dim`` values per sample; for each kernel
    ``b``, ``c_b(i, j) = exp(-||M_i,b - M_j,b||_1)`` and ``o(x_i)_b = sum_{j != i} c_b(i, j)``.
    Returns ``cat([x, o], 1)``: ``(B, in_features) -> (B, in_features + kernels)``.

    ``T`` ~ N(0, s), ``s = 1 / (kernel_dim * sqrt(in_features))``: for unit-scale inputs the L1 distances start
    near 1, where ``exp(-d)`` has a gradient (a fixed 0.1 gives ``c`` ~ 0 for wide inputs). Neither
    :func:`gantrain.models.initialize` nor spectral norm touches ``T``.
    """

    def __init__(self, in_features: int, kernels: int, kernel_dim: int = 16):
        super().__init__()
        self.in_features = checks.integer("in_features", in_features, 1)
        self.kernels = checks.integer("minibatch_kernels", kernels, 1)
        self.kernel_dim = checks.integer("minibatch_kernel_dim", kernel_dim, 1)
        self.T = nn.Parameter(torch.empty(in_features, kernels * kernel_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.T, 0.0, 1.0 / (self.kernel_dim * math.sqrt(self.in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        m = (x @ self.T).view(b, self.kernels, self.kernel_dim)  # (B, K, D)
        dist = (m[:, None] - m[None]).abs().sum(dim=-1)  # (B, B, K): L1 distance per kernel
        c = torch.exp(-dist)
        eye = torch.eye(b, dtype=torch.bool, device=x.device)[:, :, None]
        o = c.masked_fill(eye, 0.0).sum(dim=1)  # (B, K), j != i
        return torch.cat([x, o], dim=1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kernels={self.kernels}, kernel_dim={self.kernel_dim}"


class DiscriminatorHead(nn.Module):
    """The last layers of every discriminator: ``h (B, *in_shape) -> (B,)`` logits. :class:`MinibatchStdDev` (if
    ``minibatch_std`` > 0, its group size) as ``mbstd``, flatten, :class:`MinibatchDiscrimination` (if
    ``minibatch_kernels`` > 0) as ``mbdisc`` (None when off), ``linear``.

    Class-conditional (``num_classes`` > 0): ``projection`` adds the projection discriminator's term (Miyato & Koyama
    2018, eq. 3) ``<embed(y), h.flatten(1)>`` on the features before minibatch statistics, ``embed`` an
    ``nn.Embedding(num_classes, prod(in_shape))`` (Glorot-uniform, as in their code); ``aux_classifier`` adds ACGAN's
    (Odena et al. 2017) ``classifier``, ``nn.Linear(prod(in_shape), num_classes)``, read by :meth:`classify`."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        minibatch_std: int = 0,
        minibatch_kernels: int = 0,
        kernel_dim: int = 16,
        num_classes: int = 0,
        projection: bool = True,
        aux_classifier: bool = False,
    ):
        super().__init__()
        checks.integer("minibatch_std", minibatch_std, 0)
        checks.integer("minibatch_kernels", minibatch_kernels, 0)
        self.num_classes = checks.integer("num_classes", num_classes, 0)
        if aux_classifier and num_classes == 0:
            raise ConfigError(
                "aux_classifier=true needs class labels: set model.conditional=true", key="aux_classifier"
            )
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) not in (1, 3):
            raise ValueError(f"DiscriminatorHead takes (F,) or (C, H, W) shapes, got {self.in_shape}")
        shape = list(self.in_shape)
        self.mbstd = MinibatchStdDev(minibatch_std) if minibatch_std > 0 else None
        if self.mbstd is not None:
            shape[0] += 1
        n = math.prod(shape)
        self.mbdisc = MinibatchDiscrimination(n, minibatch_kernels, kernel_dim) if minibatch_kernels > 0 else None
        if self.mbdisc is not None:
            n += minibatch_kernels
        self.linear = nn.Linear(n, 1)
        features = math.prod(self.in_shape)
        self.projection = bool(projection) and num_classes > 0
        if self.projection:
            self.embed = nn.Embedding(num_classes, features)
            nn.init.xavier_uniform_(self.embed.weight)
        self.classifier = nn.Linear(features, num_classes) if aux_classifier else None

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_labels("this discriminator", self.num_classes, y, needed=self.projection)
        h0 = h
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = h.flatten(1)
        if self.mbdisc is not None:
            h = self.mbdisc(h)
        out = self.linear(h).view(-1)  # (B,)
        if self.projection:
            out = out + (self.embed(y) * h0.flatten(1)).sum(dim=1)
        return out

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """ACGAN's class logits ``(B, num_classes)`` from features ``h``."""
        if self.classifier is None:
            raise ValueError("this discriminator has no auxiliary classifier: build it with aux_classifier=true")
        return self.classifier(h.flatten(1))


class HeadedDiscriminator(nn.Module):
    """What every discriminator exposes: ``features(x)`` (subclasses), ``head`` (a :class:`DiscriminatorHead`),
    ``forward(x, y=None) == head(features(x), y)``, ``classify(h)`` (ACGAN logits) and ``num_classes``."""

    head: DiscriminatorHead

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def classifier(self) -> nn.Module | None:
        """ACGAN's auxiliary classifier (None: built without ``aux_classifier``)."""
        return self.head.classifier

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.classify(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x), y)  # (B,)


# ----------------------------------------------------------------------------- spectral norm
def apply_spectral_norm(module: nn.Module) -> list[nn.Module]:
    """Spectrally normalise (Miyato et al. 2018) the ``weight`` of every Conv2d, ConvTranspose2d, Linear and Embedding
    (the projection discriminator's, as in Miyato & Koyama 2018) in ``module`` (torch's parametrization API, trainable
    tensor ``m.parametrizations.weight.original``); returns the modules it wrapped. Modules already
    parametrized on ``weight`` are skipped (calling it twice wraps nothing new).
    """
    targets = [
        m
        for m in module.modules()
        if isinstance(m, SPECTRAL_NORM_TYPES) and not parametrize.is_parametrized(m, "weight")
    ]
    for m in targets:
        spectral_norm(m, name="weight")
    return targets
