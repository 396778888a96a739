"""The container of a run's networks: a generator (or VAE) ``g`` and an optional discriminator ``d``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gantrain import checks
from gantrain.batch import Latents
from gantrain.errors import ConfigError
from gantrain.models.init import initialize
from gantrain.models.vae import VAE

FAKE_LABELS = ("uniform", "data")


def _same(samples: torch.Tensor) -> torch.Tensor:
    return samples


class GenerativeModel(nn.Module):
    """A generator ``g`` and a discriminator/critic ``d`` that agree on one sample shape.

    Args:
        g: maps noise ``(B, *g.latent_shape)`` to images ``(B, channels, resolution, resolution)`` (MLP models:
            vectors ``(B, dim)``).
        d: one logit/score per sample ``(B,)``; None for a VAE trained alone (``g``, a
            :class:`gantrain.models.vae.VAE`).
        resolution, channels: the image shape both networks were built for, checked here so that a mismatched
            override fails at construction, not mid-step.
        init: weight init applied to both networks, see :data:`gantrain.models.INIT_SCHEMES`.
        dim: the vector size of non-image samples (MLP models), checked against ``g.dim`` and ``d.dim``.
        latent_dim: the VAE's latent size, checked against ``g.latent_shape``.

    ``None`` for ``resolution``, ``channels``, ``dim`` or ``latent_dim`` skips that check.

    Class-conditional (``conditional=True``): G and D take the data's labels, ``num_classes`` of them (filled from
    ``data.num_classes`` by the build; each network declares its own ``num_classes``, checked here). Fakes are
    generated for labels drawn uniformly (``fake_labels=uniform``), or with the data's class frequencies
    (``fake_labels=data``).

    ``encodes``: ``g`` is a :class:`~gantrain.models.vae.VAE` (held-out images have an ELBO).
    """

    def __init__(
        self,
        g: nn.Module,
        d: nn.Module | None = None,
        resolution: int | None = None,
        channels: int | None = None,
        init: str = "normal_0.02",
        dim: int | None = None,
        latent_dim: int | None = None,
        conditional: bool = False,
        num_classes: int = 0,
        fake_labels: str = "uniform",
    ):
        super().__init__()
        checks.integer("num_classes", num_classes, at_least=0)
        checks.choice("fake_labels", fake_labels, FAKE_LABELS)
        if conditional and num_classes < 1:
            raise ConfigError(
                "model.conditional=true needs a data option with class labels (data.num_classes > 0): digits, mnist, "
                "fashion_mnist, cifar10, ring8, grid25, or a folder with one subfolder per class",
                key="conditional",
            )
        num_classes = num_classes if conditional else 0
        for name, net in (("g", g), ("d", d)):
            have = getattr(net, "num_classes", 0) if net is not None else num_classes
            if have != num_classes:
                raise ConfigError(
                    f"{name} is built for {have} classes but the model for {num_classes} (model.conditional="
                    f"{str(conditional).lower()}); keep model.{name}.num_classes at its default ${{..num_classes}}",
                    key=name,
                )
        for name, net in (("g", g), ("d", d)):
            if not isinstance(net, nn.Module) and (name == "g" or net is not None):
                raise ConfigError(f"{name}={net!r}: must be a network (a node with its _target_)", key=name)
        if latent_dim is not None and tuple(getattr(g, "latent_shape", (latent_dim,))) != (latent_dim,):
            raise ConfigError(
                f"g draws latents of shape {tuple(g.latent_shape)} but latent_dim={latent_dim}; "
                "keep them equal (they interpolate by default)",
                key="g",
            )
        for name, net in (("g", g), ("d", d)):
            if net is None:  # a VAE alone: the generator is the whole model
                continue
            if resolution is not None or channels is not None:
                want = (resolution, channels)
                got = (getattr(net, "resolution", resolution), getattr(net, "channels", channels))
                if any(w is not None and have != w for have, w in zip(got, want)):
                    raise ConfigError(
                        f"{name} is built for {got[1]}x{got[0]}x{got[0]} images but resolution="
                        f"{resolution}, channels={channels}; keep them equal (they interpolate by default)",
                        key=name,
                    )
            if dim is not None and getattr(net, "dim", dim) != dim:
                raise ConfigError(
                    f"{name} is built for {net.dim}-dimensional samples but dim={dim}; "
                    "keep them equal (they interpolate by default)",
                    key=name,
                )
        self.g, self.d = initialize(g, init), (None if d is None else initialize(d, init))
        self.resolution, self.channels, self.dim = resolution, channels, dim
        self.encodes = isinstance(self.g, VAE)
        self.num_classes, self.fake_labels = num_classes, fake_labels
        # P(class) for fake_labels=data; set with the data's class counts by whoever pairs the model with its data
        self.class_weights: torch.Tensor | None = None
        # What generate() applies to samples that leave gantrain: the data option's to_data_units,
        # set by whoever pairs the model with its data (train.build, sampling.load_model).
        self.to_data_units: Callable[[torch.Tensor], torch.Tensor] = _same

    def noise(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latent batch ``(n, *g.latent_shape)`` from N(0, I); a dedicated ``generator`` leaves the global RNG alone."""
        return torch.randn((n, *self.g.latent_shape), device=device, generator=generator)

    @property
    def conditional(self) -> bool:
        """G and D take class labels (``num_classes`` of them)."""
        return self.num_classes > 0

    def prior(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Latents:
        """What the objectives train on: ``n`` draws of the model's prior, :meth:`noise`, then (conditional) the
        labels to generate: uniform over the classes, or with the data's class frequencies (``fake_labels=data``)."""
        z = self.noise(n, device, generator)
        if not self.conditional:
            return Latents(z)
        if self.fake_labels == "data" and self.class_weights is not None:
            weights = self.class_weights.to(device)
            y = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            y = torch.randint(0, self.num_classes, (n,), device=device, generator=generator)
        return Latents(z, y)

    def balanced_labels(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Labels for ``n`` samples scored as a whole (evaluation): sample ``i`` of class ``i % num_classes``, so
        the classes are equally represented; None for an unconditional model."""
        return torch.arange(n, device=device) % self.num_classes if self.conditional else None

    def labels(self, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The keyword arguments that pass labels ``y`` to a network: ``{"y": y}`` for a conditional model, ``{}``
        otherwise (an unconditional network is called as before, so a user's ``forward(z)`` keeps working)."""
        if not self.conditional:
            return {}
        if y is None:
            raise ValueError(f"this model is conditional on {self.num_classes} classes: give labels y")
        return {"y": y}

    def check_labels(self, y: torch.Tensor | int | list[int] | None, what: str = "class") -> torch.Tensor | None:
        """``y`` as int64 labels, or :class:`ConfigError` in one line when this model cannot take them (a class given
        to an unconditional model, or one out of ``[0, num_classes)``)."""
        if y is None:
            return None
        y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
        if not self.conditional:
            raise ConfigError(f"{what}: this model is unconditional (it was not trained with labels); drop {what}")
        bad = y[(y < 0) | (y >= self.num_classes)]
        if bad.numel():
            raise ConfigError(f"{what}={int(bad[0])}: out of range, this model has classes 0..{self.num_classes - 1}")
        return y

    def generate(self, latents: Latents) -> torch.Tensor:
        """G's output for ``latents`` (train mode, with graph): ``g(z)``, or ``g(z, y=y)`` for a conditional model."""
        return self.g(latents.z, **self.labels(latents.y))

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images for latents ``z`` (and, conditional, labels ``y``) in eval mode (BatchNorm running stats, no state
        change), data range [-1, 1]."""
        was_training = self.g.training
        self.g.eval()
        try:
            return self.g(z, **self.labels(y))
        finally:
            self.g.train(was_training)
