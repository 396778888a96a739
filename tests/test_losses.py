"""Losses and penalties against hand computation; the GP through gradcheck in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gantrain.batch import Batch
from gantrain.errors import ConfigError
from gantrain.losses import (
    BCELoss,
    FeatureMatching,
    GradientPenalty,
    HingeLoss,
    LeastSquaresLoss,
    R1Penalty,
    WassersteinLoss,
    WeightClip,
)
from gantrain.models import GenerativeModel
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


def _functional_critic():
    """A small float64 conv critic as a function of its parameters: ``(critic(params), params)`` for gradcheck."""
    torch.manual_seed(0)
    d = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 1)).double()
    names = [n for n, _ in d.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in d.parameters())
    return (lambda ps: lambda x: functional_call(d, dict(zip(names, ps)), (x,))), params


def test_gradient_penalty_passes_gradcheck_float64():
    critic, params = _functional_critic()
    real = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(3, 1, 1, 1, dtype=torch.float64)
    gp = GradientPenalty(weight=10.0)

    def f(real, fake, *ps):
        return gp(critic(ps), real, fake, alpha=alpha)

    assert torch.autograd.gradcheck(f, (real, fake, *params), eps=1e-6, atol=1e-5)


def _tiny_gan() -> GenerativeModel:
    torch.manual_seed(0)
    return GenerativeModel(
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
        objective = GANObjective(WassersteinLoss(), gp=GradientPenalty(weight))
        objective.d_loss(model, Batch(real)).backward()
        assert all(p.grad is None for p in model.g.parameters()), "the D loss must not reach G"
        return [p.grad.clone() for p in model.d.parameters()]

    without, with_gp = d_grads(0.0), d_grads(10.0)
    assert any(not torch.allclose(a, b) for a, b in zip(without, with_gp)), "the GP must change D's gradient"


def test_objective_reports_terms():
    from gantrain.stats import Collector, collecting

    model = _tiny_gan()
    objective = GANObjective(WassersteinLoss(), gp=GradientPenalty(10.0))
    with collecting(Collector()) as c:
        torch.manual_seed(0)
        total = objective.d_loss(model, Batch(torch.randn(4, 1, 8, 8)))
        objective.g_loss(model, Batch(torch.randn(4, 1, 8, 8)))
    stats = c.drain()
    assert {"loss/D", "loss/D/adv", "loss/D/gp", "loss/G", "D(x)", "D(G(z))"} <= stats.keys()
    assert stats["loss/D"] == pytest.approx(total.item())
    assert stats["loss/D"] == pytest.approx(stats["loss/D/adv"] + stats["loss/D/gp"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- issue 3 losses
def test_hinge_losses_match_hand_computation():
    # D: mean(relu(1 - r)) + mean(relu(1 + f)); REAL = [2, -1, 0.5], FAKE = [0.5, -3, 1.5]
    d_want = (0 + 2 + 0.5) / 3 + (1.5 + 0 + 2.5) / 3
    assert HingeLoss().d_loss(REAL, FAKE).item() == pytest.approx(d_want, rel=1e-6)
    assert HingeLoss().g_loss(FAKE).item() == pytest.approx(-(0.5 - 3 + 1.5) / 3, rel=1e-6)


def test_least_squares_losses_match_hand_computation():
    a, b, c = -1.0, 1.0, 0.0
    loss = LeastSquaresLoss(a=a, b=b, c=c)
    d_want = 0.5 * sum((r - b) ** 2 for r in REAL.tolist()) / 3 + 0.5 * sum((f - a) ** 2 for f in FAKE.tolist()) / 3
    g_want = 0.5 * sum((f - c) ** 2 for f in FAKE.tolist()) / 3
    assert loss.d_loss(REAL, FAKE).item() == pytest.approx(d_want, rel=1e-6)
    assert loss.g_loss(FAKE).item() == pytest.approx(g_want, rel=1e-6)
    # default 0-1 coding: a=0, b=c=1
    assert LeastSquaresLoss().g_loss(FAKE).item() == pytest.approx(0.5 * (0.25 + 16 + 0.25) / 3, rel=1e-6)


def test_bce_one_sided_label_smoothing():
    # reals target 0.9: BCE(r, 0.9) = 0.9 * softplus(-r) + 0.1 * softplus(r); fakes keep target 0.
    want = sum(0.9 * softplus(-r) + 0.1 * softplus(r) for r in REAL.tolist()) / 3
    want += sum(softplus(f) for f in FAKE.tolist()) / 3
    assert BCELoss(label_smoothing=0.1).d_loss(REAL, FAKE).item() == pytest.approx(want, rel=1e-6)
    assert BCELoss(label_smoothing=0.1).g_loss(FAKE).item() == pytest.approx(BCELoss().g_loss(FAKE).item())


def test_bce_instance_noise_has_the_configured_std():
    x = torch.zeros(200_000)
    assert torch.equal(BCELoss().d_input(x), x)
    noisy = BCELoss(instance_noise=0.3).d_input(x)
    assert noisy.std().item() == pytest.approx(0.3, rel=0.02) and abs(noisy.mean().item()) < 0.01


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BCELoss(label_smoothing=1.0), r"^label_smoothing=1.0: must be >= 0 and < 1$"),
        (lambda: BCELoss(instance_noise=-1), r"^instance_noise=-1: must be >= 0 \(a std\)$"),
        (lambda: GradientPenalty(every=0), r"^every=0: must be an integer >= 1 \(1 = every D step"),
        (lambda: R1Penalty(gamma=-1), r"^gamma=-1: must be >= 0 \(0 = off"),
        (lambda: WeightClip(clip=-0.1), r"^clip=-0.1: must be >= 0 \(0 = off"),
        (lambda: FeatureMatching(weight=-1), r"^weight=-1: must be >= 0 \(0 = off\)$"),
    ],
)
def test_bad_term_arguments_name_the_key(make, match):
    """Each term names its own argument; the entry point puts ``loss.<term>.`` in front (tests/test_structure.py)."""
    with pytest.raises(ConfigError, match=match) as err:
        make()
    assert str(err.value.within("loss.x")).startswith("loss.x." + match.lstrip("^").split("=")[0])


def test_r1_of_linear_critic_is_closed_form():
    # D(x) = <w, x> + b: grad_x D = w for every sample, R1 = gamma / 2 * ||w||^2.
    d = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        d[1].weight.copy_(torch.arange(12.0).reshape(1, 12) / 10)
    sq = d[1].weight.pow(2).sum().item()
    real = torch.randn(5, 3, 2, 2)
    assert R1Penalty(gamma=4.0)(d, real, torch.randn(5, 3, 2, 2)).item() == pytest.approx(2.0 * sq, rel=1e-5)
    assert not real.requires_grad  # the caller's batch is not modified


def test_r1_of_quadratic_critic_is_closed_form():
    # D(x) = sum(x^2): grad = 2x, R1 = gamma / 2 * mean_i ||2 x_i||^2.
    d = lambda x: (x**2).flatten(1).sum(1)  # noqa: E731
    real = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    want = 0.5 * 10.0 * ((4 + 16) + (0 + 4)) / 2
    assert R1Penalty(gamma=10.0)(d, real, real).item() == pytest.approx(want)


def test_r1_passes_gradcheck_float64():
    critic, params = _functional_critic()
    real = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    r1 = R1Penalty(gamma=10.0)

    def f(real, *ps):
        return r1(critic(ps), real, real)

    assert torch.autograd.gradcheck(f, (real, *params), eps=1e-6, atol=1e-5)


def test_weight_clip_clamps_d_after_its_step_only(tmp_path):
    from gantrain.build import build
    from tests.conftest import make_cfg

    cfg = make_cfg("+experiment=wgan", "trainer.max_steps=1", "optim.d.lr=0.5", "optim.g.lr=0.5")
    trainer = build(cfg, tmp_path)
    model = trainer.model
    assert max(p.abs().max().item() for p in model.d.parameters()) > 0.01  # N(0, 0.02) init exceeds the clip
    d_phase = trainer.phases[0]
    trainer.run_phase(d_phase)
    d_max = max(p.abs().max().item() for p in model.d.parameters())
    assert d_max == pytest.approx(0.01)  # lr 0.5 pushes weights past the bound; clamped back
    g_before = [p.detach().clone() for p in model.g.parameters()]
    trainer.run_phase(trainer.phases[1])
    assert any(not torch.equal(a, p) for a, p in zip(g_before, model.g.parameters()))
    assert max(p.abs().max().item() for p in model.g.parameters()) > 0.01  # G is never clipped


class _CountingPenalty(GradientPenalty):
    def __init__(self, every):
        super().__init__(weight=1.0, every=every)
        self.calls = 0

    def __call__(self, d, real, fake, alpha=None):
        self.calls += 1
        return torch.tensor(2.0)


def test_lazy_penalty_runs_every_k_steps_with_weight_times_k():
    from gantrain.stats import Collector, collecting

    model = _tiny_gan()
    pen = _CountingPenalty(every=4)
    objective = GANObjective(WassersteinLoss(), gp=pen)
    real = torch.randn(4, 1, 8, 8)
    totals = []
    with collecting(Collector()):
        for step in range(8):
            torch.manual_seed(0)
            totals.append(objective.d_loss(model, Batch(real), step).item())
    assert pen.calls == 2  # steps 0 and 4
    adv = totals[1]
    assert totals[0] == pytest.approx(adv + 4 * 2.0) and totals[4] == pytest.approx(adv + 8.0)
    assert all(t == pytest.approx(adv) for i, t in enumerate(totals) if i % 4)


def _g_step_changes(model, objective, real):
    """Run G's loss backward with D frozen (as the Trainer does); return D/G grads."""
    model.zero_grad(set_to_none=True)
    model.d.requires_grad_(False)
    try:
        objective.g_loss(model, Batch(real)).backward()
    finally:
        model.d.requires_grad_(True)
    return model


def test_feature_matching_matches_hand_computation_and_reaches_g_only():
    from gantrain.stats import Collector, collecting

    model = _tiny_gan()
    real = torch.randn(6, 1, 8, 8)
    objective = GANObjective(WassersteinLoss(), fm=FeatureMatching(weight=2.0))
    with collecting(Collector()) as c:
        torch.manual_seed(3)
        objective.g_loss(model, Batch(real))
    stats = c.drain()
    torch.manual_seed(3)
    fake = model.g(model.noise(6, "cpu"))
    f_real, f_fake = model.d.features(real).flatten(1), model.d.features(fake).flatten(1)
    want = 2.0 * ((f_real.mean(0) - f_fake.mean(0)) ** 2).sum().item()
    assert stats["loss/G/fm"] == pytest.approx(want, rel=1e-5)
    assert stats["loss/G"] == pytest.approx(stats["loss/G/adv"] + stats["loss/G/fm"], rel=1e-5)
    d_before = [p.detach().clone() for p in model.d.parameters()]
    _g_step_changes(model, objective, real)
    assert all(p.grad is None for p in model.d.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.g.parameters() if p.dim() > 1)
    assert all(torch.equal(a, b) for a, b in zip(d_before, model.d.parameters()))


def test_feature_matching_gradient_is_the_fm_term_alone():
    # With the adversarial term removed (its gradient subtracted), G's gradient equals d(fm)/dG.
    model = _tiny_gan()
    real = torch.randn(6, 1, 8, 8)
    grads = []
    for objective in (GANObjective(WassersteinLoss()), GANObjective(WassersteinLoss(), fm=FeatureMatching(1.0))):
        torch.manual_seed(5)
        _g_step_changes(model, objective, real)
        grads.append([p.grad.clone() for p in model.g.parameters()])
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    fake = model.g(model.noise(6, "cpu"))
    with torch.no_grad():
        f_real = model.d.features(real).flatten(1).mean(0)
    ((f_real - model.d.features(fake).flatten(1).mean(0)) ** 2).sum().backward()
    for adv, both, p in zip(*grads, model.g.parameters()):
        torch.testing.assert_close(both - adv, p.grad, rtol=1e-4, atol=1e-6)


def test_gradient_penalties_refuse_a_batchnorm_critic(tmp_path):
    from gantrain.build import build
    from tests.conftest import make_cfg

    for term in ("loss.gp.weight=10", "loss.r1.gamma=1"):
        with pytest.raises(ConfigError, match=r"per-sample critic gradients, but D has BatchNorm2d.*model.d.norm"):
            build(make_cfg("+experiment=dcgan", term), tmp_path)
    build(make_cfg("+experiment=dcgan", "loss.gp.weight=10", "model.d.norm=layer"), tmp_path)  # fine
