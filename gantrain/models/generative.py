"""The container of a run's networks: a generator (or VAE) ``g`` and an optional discriminator ``d``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gantrain.batch import Latents
from gantrain.errors import ConfigError
from gantrain.models.init import initialize
from gantrain.models.vae import VAE


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
    ):
        super().__init__()
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
        # What generate() applies to samples that leave gantrain: the data option's to_data_units,
        # set by whoever pairs the model with its data (train.build, sampling.load_model).
        self.to_data_units: Callable[[torch.Tensor], torch.Tensor] = _same

    def noise(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Latent batch ``(n, *g.latent_shape)`` from N(0, I); a dedicated ``generator`` leaves the global RNG alone."""
        return torch.randn((n, *self.g.latent_shape), device=device, generator=generator)

    def prior(self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Latents:
        """What the objectives train on: ``n`` draws of the model's prior, :meth:`noise` and no labels (the
        model is unconditional); a conditional model overrides this to draw its labels with the noise."""
        return Latents(self.noise(n, device, generator))

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images for latents ``z`` in eval mode (BatchNorm running stats, no state change), data range [-1, 1]."""
        was_training = self.g.training
        self.g.eval()
        try:
            return self.g(z)
        finally:
            self.g.train(was_training)
