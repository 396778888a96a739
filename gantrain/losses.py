"""Adversarial losses and discriminator penalties, as small classes the objective composes.

Every loss works on raw discriminator outputs ``(B,)``: logits for BCE, critic scores for the
Wasserstein loss. ``score`` maps them to what people plot as ``D(x)`` / ``D(G(z))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdversarialLoss:
    """Base: the discriminator's loss on (real, fake) outputs and the generator's loss on fake outputs."""

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """What to report as D(x) / D(G(z)) for these outputs."""
        return out


class BCELoss(AdversarialLoss):
    """Goodfellow et al. 2014, from logits with ``binary_cross_entropy_with_logits``.

    D minimises ``-log D(x) - log(1 - D(G(z)))``. The generator uses the non-saturating
    ``-log D(G(z))`` by default; ``saturating=True`` gives the original minimax ``log(1 - D(G(z)))``,
    whose gradient vanishes when D confidently rejects fakes.
    """

    def __init__(self, saturating: bool = False):
        self.saturating = saturating

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
            fake, torch.zeros_like(fake)
        )

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        if self.saturating:
            # log(1 - sigmoid(f)) = -BCE(f, 0)
            return -F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    def score(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class WassersteinLoss(AdversarialLoss):
    """Arjovsky et al. 2017: the critic maximises E[D(x)] - E[D(G(z))]; needs a Lipschitz constraint
    (e.g. :class:`GradientPenalty`)."""

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return fake.mean() - real.mean()

    def g_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return -fake.mean()


class GradientPenalty:
    """WGAN-GP (Gulrajani et al. 2017): ``weight * E[(||grad_x D(x_hat)||_2 - center)^2]``.

    ``x_hat = a * real + (1 - a) * fake`` with one ``a ~ U(0, 1)`` per sample. The gradient is
    taken with ``create_graph=True`` so the penalty itself is differentiable w.r.t. D's weights.
    """

    def __init__(self, weight: float = 10.0, center: float = 1.0):
        self.weight, self.center = weight, center

    def __call__(
        self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Penalty for critic ``d``; ``alpha`` ``(B, 1, ..., 1)`` is drawn per sample unless given (tests)."""
        if alpha is None:
            alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)  # (B, C, H, W)
        (grad,) = torch.autograd.grad(d(x_hat).sum(), x_hat, create_graph=True)
        norms = grad.flatten(1).norm(2, dim=1)  # (B,)
        return self.weight * ((norms - self.center) ** 2).mean()
