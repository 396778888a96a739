"""Objectives turn a model into training phases. The Trainer runs phases; it never sees loss types.

A GAN objective supplies a D phase (every iteration) and a G phase (every ``n_critic``
iterations, the phase that counts as a training step).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from gantrain.errors import ConfigError
from gantrain.losses import (
    AdversarialLoss,
    FeatureMatching,
    GeneratorTerm,
    GradientPenalty,
    Penalty,
    R1Penalty,
    WeightClip,
)
from gantrain.models import GenerativeModel
from gantrain.phase import Phase, Update
from gantrain.stats import report

Pictures = dict[str, torch.Tensor]  # name -> (3, H, W) picture in [0, 1]; logged under its name


class GANObjective(nn.Module):
    """An adversarial loss plus named terms, each a :class:`Penalty` on D or a :class:`GeneratorTerm` on G.

    ``GANObjective(HingeLoss(), r1=R1Penalty(10), fm=FeatureMatching(1.0))``: the keyword is the
    term's name in the logs (``loss/D/r1``, ``loss/G/fm``) and its config key (``loss.r1.gamma``).
    Inactive terms (weight 0) and ``None`` are dropped, so a config can list every term switched off.

    Reports ``loss/D`` (total), ``loss/D/adv``, ``loss/D/<penalty>``, ``loss/G`` (total),
    ``loss/G/adv``, ``loss/G/<term>``, ``D(x)`` and ``D(G(z))``.
    """

    networks = ("g", "d")  # the model's networks this objective trains (each gets optim.<name>)

    def __init__(
        self,
        adversarial: AdversarialLoss,
        gp: GradientPenalty | None = None,
        r1: R1Penalty | None = None,
        weight_clip: WeightClip | None = None,
        fm: FeatureMatching | None = None,
        perceptual: GeneratorTerm | None = None,
        **terms: Penalty | GeneratorTerm | None,
    ):
        super().__init__()
        self.adversarial = adversarial
        self.penalties: dict[str, Penalty] = {}
        g_terms: dict[str, GeneratorTerm] = {}
        terms = dict(gp=gp, r1=r1, weight_clip=weight_clip, fm=fm, perceptual=perceptual, **terms)
        for name, term in terms.items():
            if term is None or not term.active:
                continue
            if isinstance(term, Penalty):
                self.penalties[name] = term
            elif isinstance(term, GeneratorTerm):
                g_terms[name] = term
            else:
                raise ConfigError(f"{name}: {type(term).__name__} is neither a Penalty nor a GeneratorTerm", key=name)
        self.g_terms = nn.ModuleDict(g_terms)  # moves fixed networks (VGG) with .to(device)

    def phases(self, model: GenerativeModel, updates: Mapping[str, Update], n_critic: int = 1) -> list[Phase]:
        """D phase then G phase; G runs every ``n_critic``-th iteration (after the critic's updates).

        ``updates``: each trained network's optimizer, schedule and clipping (from ``optim.<net>``).
        """
        mixing = [type(m).__name__ for m in model.d.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, penalty in self.penalties.items():
            if penalty.per_sample_gradient and mixing:
                raise ConfigError(
                    f"{name}: a gradient penalty needs per-sample critic gradients, but D has {mixing[0]}, "
                    "which mixes the samples of a batch; set model.d.norm=layer, instance or none",
                    key=name,
                )
        if self.g_terms and not (hasattr(model.d, "features") and hasattr(model.d, "head")):
            name = next(iter(self.g_terms))
            raise ConfigError(
                f"{name}: generator terms need a discriminator with features(x) and "
                f"head(h); {type(model.d).__name__} has not",
                key=name,
            )
        return [
            Phase.of(
                "D", model.d, updates["d"], partial(self.d_loss, model), after_step=partial(self.after_d_step, model)
            ),
            Phase.of("G", model.g, updates["g"], partial(self.g_loss, model), interval=n_critic, counts_as_step=True),
        ]

    def sampler(self, model: GenerativeModel, render: Callable, noise: torch.Tensor, data) -> Callable[[], Pictures]:
        """What a run shows at each sample step: ``samples`` of the fixed ``noise``, drawn by ``render``
        (an image grid, a scatter plot). ``data``: the batch stream, for objectives that show real data."""
        return lambda: {"samples": render(model.sample(noise))}

    def d_loss(self, model: GenerativeModel, real: torch.Tensor, step: int = 0) -> torch.Tensor:
        """D's loss on a real batch; ``step`` (D steps so far) schedules lazy penalties."""
        d, x = model.d, self.adversarial.d_input
        fake = model.g(model.noise(real.shape[0], real.device)).detach()  # no gradient may reach G
        real_in, fake_in = x(real), x(fake)
        real_out, fake_out = d(real_in), d(fake_in)
        loss = self.adversarial.d_loss(real_out, fake_out)
        report("loss/D/adv", loss)
        for name, penalty in self.penalties.items():
            if step % penalty.every:
                continue
            term = penalty(d, real_in, fake_in)
            if term is None:  # a constraint (weight clipping), not a loss term
                continue
            report(f"loss/D/{name}", term)
            loss = loss + penalty.every * term
        report("loss/D", loss)
        report("D(x)", self.adversarial.score(real_out))
        report("D(G(z))", self.adversarial.score(fake_out))
        return loss

    def after_d_step(self, model: GenerativeModel) -> None:
        for penalty in self.penalties.values():
            penalty.after_step(model.d)

    def g_loss(self, model: GenerativeModel, real: torch.Tensor, step: int = 0) -> torch.Tensor:
        d = model.d
        fake = model.g(model.noise(real.shape[0], real.device))
        if self.g_terms:  # one D body pass serves the adversarial term and feature matching
            fake_features = d.features(self.adversarial.d_input(fake))
            fake_out = d.head(fake_features)
        else:
            fake_features, fake_out = None, d(self.adversarial.d_input(fake))
        loss = self.adversarial.g_loss(fake_out)
        report("loss/G/adv", loss)
        for name, term in self.g_terms.items():
            value = term(d, real, fake, fake_features)
            report(f"loss/G/{name}", value)
            loss = loss + value
        report("loss/G", loss)
        return loss
