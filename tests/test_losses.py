"""Losses and penalties against hand computation; the GP through gradcheck in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gantrain.losses import BCELoss, GradientPenalty, WassersteinLoss
from gantrain.models import GAN
from gantrain.models.dcgan import Discriminator, Generator
from gantrain.objectives import GANObjective

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([0.5, -3.0, 1.5])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bce_discriminator_loss_matches_hand_computation():
    # -log sigmoid(r) = softplus(-r);  -log(1 - sigmoid(f)) = softplus(f)
    want = sum(softplus(-r) for r in REAL.tolist()) / 3 + sum(softplus(f) for f in FAKE.tolist()) / 3
    assert BCELoss().d_loss(REAL, FAKE).item() == pytest.approx(want, rel=1e-6)


def test_bce_generator_non_saturating_and_saturating_forms():
    non_sat = sum(softplus(-f) for f in FAKE.tolist()) / 3  # -log D(G(z))
    sat = -sum(softplus(f) for f in FAKE.tolist()) / 3  # log(1 - D(G(z)))
    assert BCELoss().g_loss(FAKE).item() == pytest.approx(non_sat, rel=1e-6)
    assert BCELoss(saturating=True).g_loss(FAKE).item() == pytest.approx(sat, rel=1e-6)


def test_saturating_generator_gradient_vanishes_where_non_saturating_does_not():
    # D confidently rejects the fake (logit -10): minimax G gradient ~ sigmoid(-10)/1, non-saturating ~ 1.
    f = torch.tensor([-10.0], requires_grad=True)
    (g_sat,) = torch.autograd.grad(BCELoss(saturating=True).g_loss(f), f)
    (g_ns,) = torch.autograd.grad(BCELoss().g_loss(f), f)
    assert abs(g_sat.item()) == pytest.approx(1 / (1 + math.exp(10)), rel=1e-4)
    assert abs(g_ns.item()) == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-4)


def test_bce_score_is_probability():
    assert BCELoss().score(torch.tensor([0.0])).item() == 0.5


def test_wasserstein_losses():
    assert WassersteinLoss().d_loss(REAL, FAKE).item() == pytest.approx(FAKE.mean().item() - REAL.mean().item())
    assert WassersteinLoss().g_loss(FAKE).item() == pytest.approx(-FAKE.mean().item())
    assert torch.equal(WassersteinLoss().score(REAL), REAL)


def test_gradient_penalty_of_linear_critic_is_closed_form():
    # D(x) = <w, x> + b has gradient w everywhere: GP = lambda * (||w|| - 1)^2 for any interpolate.
    d = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        d[1].weight.copy_(torch.arange(12.0).reshape(1, 12) / 10)
    w_norm = d[1].weight.norm().item()
    real, fake = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    gp = GradientPenalty(weight=10.0)(d, real, fake)
    assert gp.item() == pytest.approx(10.0 * (w_norm - 1.0) ** 2, rel=1e-5)


def test_gradient_penalty_uses_one_alpha_per_sample():
    d = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    seen = []
    d.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    real, fake = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    GradientPenalty()(d, real, fake)
    x_hat = seen[0]  # (3, 1, 2, 2): alpha * 1 + (1 - alpha) * 0 = alpha, constant within each sample
    per_sample = x_hat.flatten(1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert len(set(per_sample[:, 0].tolist())) == 3


def test_gradient_penalty_passes_gradcheck_float64():
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
    names = [n for n, _ in d.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in d.parameters())
    real = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, 1, 1, 1, dtype=torch.float64)
    gp = GradientPenalty(weight=10.0)

    def f(real, fake, *ps):
        critic = lambda x: functional_call(d, dict(zip(names, ps)), (x,))  # noqa: E731
        return gp(critic, real, fake, alpha=alpha)

    assert torch.autograd.gradcheck(f, (real, fake, *params), eps=1e-6, atol=1e-5)


def _tiny_gan() -> GAN:
    torch.manual_seed(0)
    return GAN(
        Generator(nz=4, ngf=4, channels=1, resolution=8),
        Discriminator(ndf=4, channels=1, resolution=8, norm="none"),
        8,
        1,
    )


def test_gradient_penalty_reaches_d_not_g():
    model = _tiny_gan()
    real = torch.randn(4, 1, 8, 8)

    def d_grads(weight: float) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        objective = GANObjective(WassersteinLoss(), {"gp": GradientPenalty(weight)})
        objective.d_loss(model, real).backward()
        assert all(p.grad is None for p in model.g.parameters()), "the D loss must not reach G"
        return [p.grad.clone() for p in model.d.parameters()]

    without, with_gp = d_grads(0.0), d_grads(10.0)
    assert any(not torch.allclose(a, b) for a, b in zip(without, with_gp)), "the GP must change D's gradient"


def test_objective_reports_terms():
    from gantrain.stats import Collector, collecting

    model = _tiny_gan()
    objective = GANObjective(WassersteinLoss(), {"gp": GradientPenalty(10.0)})
    with collecting(Collector()) as c:
        torch.manual_seed(0)
        total = objective.d_loss(model, torch.randn(4, 1, 8, 8))
        objective.g_loss(model, torch.randn(4, 1, 8, 8))
    stats = c.drain()
    assert {"loss/D", "loss/D/adv", "loss/D/gp", "loss/G", "D(x)", "D(G(z))"} <= stats.keys()
    assert stats["loss/D"] == pytest.approx(total.item())
    assert stats["loss/D"] == pytest.approx(stats["loss/D/adv"] + stats["loss/D/gp"], rel=1e-5)
