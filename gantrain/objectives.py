"""Objectives turn a model into training phases. The Trainer runs phases; it never sees loss types.

A GAN objective supplies a D phase (every iteration) and a G phase (every ``n_critic``
iterations, the phase that counts as a training step).
"""

from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from torch.optim import Optimizer

from gantrain.errors import ConfigError
from gantrain.losses import AdversarialLoss, GradientPenalty
from gantrain.models import GAN
from gantrain.stats import report
from gantrain.trainer import Phase


class GANObjective:
    """An adversarial loss plus named penalties on D (e.g. ``{"gp": GradientPenalty(10)}``).

    Reports ``loss/D`` (total), ``loss/D/<penalty>``, ``loss/G``, ``D(x)`` and ``D(G(z))``.
    """

    def __init__(self, adversarial: AdversarialLoss, penalties: Mapping[str, GradientPenalty] | None = None):
        self.adversarial = adversarial
        self.penalties = dict(penalties or {})

    def phases(self, model: GAN, optimizers: Mapping[str, Optimizer], n_critic: int = 1) -> list[Phase]:
        """D phase then G phase; G runs every ``n_critic``-th iteration (after the critic's updates)."""
        if n_critic < 1:
            raise ConfigError(f"trainer.n_critic={n_critic}: must be >= 1 (discriminator steps per generator step)")
        missing = {"g", "d"} - set(optimizers)
        if missing:
            raise ConfigError(f"optim: a GAN needs optimizers 'g' and 'd'; missing {sorted(missing)}")
        return [
            Phase("D", model.d, optimizers["d"], partial(self.d_loss, model), interval=1),
            Phase("G", model.g, optimizers["g"], partial(self.g_loss, model), interval=n_critic, counts_as_step=True),
        ]

    def d_loss(self, model: GAN, real: torch.Tensor) -> torch.Tensor:
        d = model.d
        fake = model.g(model.noise(real.shape[0], real.device)).detach()  # no gradient may reach G
        real_out, fake_out = d(real), d(fake)
        loss = self.adversarial.d_loss(real_out, fake_out)
        report("loss/D/adv", loss)
        for name, penalty in self.penalties.items():
            term = penalty(d, real, fake)
            report(f"loss/D/{name}", term)
            loss = loss + term
        report("loss/D", loss)
        report("D(x)", self.adversarial.score(real_out))
        report("D(G(z))", self.adversarial.score(fake_out))
        return loss

    def g_loss(self, model: GAN, real: torch.Tensor) -> torch.Tensor:
        fake_out = model.d(model.g(model.noise(real.shape[0], real.device)))
        loss = self.adversarial.g_loss(fake_out)
        report("loss/G", loss)
        return loss
