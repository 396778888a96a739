"""Relativistic losses (RaGAN, RpGAN), R2 and the ACGAN auxiliary classifier's losses against hand computation; R2
through gradcheck in float64; the G phase reads D's real outputs without a graph."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from gantrain.losses import AuxiliaryClassifier, R1Penalty, R2Penalty, RelativisticAverageLoss, RelativisticPairingLoss
from tests.test_losses import _functional_critic

approx = partial(pytest.approx, rel=1e-6, abs=1e-7)
REAL = [2.0, -1.0, 0.5]
FAKE = [0.5, -3.0, 1.5]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_ragan_losses_match_hand_computation():
    loss = RelativisticAverageLoss()
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    mr, mf = mean(REAL), mean(FAKE)
    # D: real more realistic than the average fake, fake less realistic than the average real; halved
    d = 0.5 * (-mean(log_sigmoid(r - mf) for r in REAL) - mean(log_sigmoid(-(f - mr)) for f in FAKE))
    g = 0.5 * (-mean(log_sigmoid(f - mr) for f in FAKE) - mean(log_sigmoid(-(r - mf)) for r in REAL))
    assert loss.d_loss(real, fake).item() == approx(d)
    assert loss.g_loss(fake, real).item() == approx(g)
    assert loss.g_reads_real


def test_rpgan_losses_pair_by_position_and_match_hand_computation():
    loss = RelativisticPairingLoss()
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    d = mean(math.log1p(math.exp(f - r)) for r, f in zip(REAL, FAKE))
    g = mean(math.log1p(math.exp(r - f)) for r, f in zip(REAL, FAKE))
    assert loss.d_loss(real, fake).item() == approx(d)
    assert loss.g_loss(fake, real).item() == approx(g)
    # pairing, not averaging: permuting the fakes changes the loss
    assert loss.d_loss(real, fake.flip(0)).item() != approx(d)


def test_r2_is_r1_on_the_fakes_and_passes_gradcheck_float64():
    critic, params = _functional_critic()
    real = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    r1, r2 = R1Penalty(gamma=10.0), R2Penalty(gamma=10.0)
    d = critic(params)
    assert r2(d, real, fake).item() == r1(d, fake, real).item()
    assert r2(d, real, fake).item() != r1(d, real, fake).item()
    assert R2Penalty.labels == "fake" and R1Penalty.labels == "real"

    def f(fake, *ps):
        return r2(critic(ps), real.detach(), fake)

    assert torch.autograd.gradcheck(f, (fake, *params), eps=1e-6, atol=1e-5)


def test_r2_by_hand_on_a_linear_critic():
    w = torch.tensor([[1.0, -2.0, 0.5]])
    fake = torch.randn(4, 3)
    d = lambda x: x @ w.T  # noqa: E731  grad_x = w for every sample
    assert R2Penalty(gamma=4.0)(d, torch.zeros(4, 3), fake).item() == approx(0.5 * 4.0 * (1 + 4 + 0.25))


def test_aux_classifier_losses_match_hand_computation():
    aux = AuxiliaryClassifier(weight=0.5)
    real_logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    fake_logits = torch.tensor([[0.0, 1.0, 0.0], [-1.0, -1.0, 3.0]])
    real_y, fake_y = torch.tensor([0, 2]), torch.tensor([1, 0])

    def ce(logits, y):
        return mean(math.log(sum(math.exp(v) for v in row)) - row[k] for row, k in zip(logits.tolist(), y.tolist()))

    d = 0.5 * (ce(real_logits, real_y) + ce(fake_logits, fake_y))
    assert aux.d_loss(real_logits, real_y, fake_logits, fake_y).item() == approx(d)
    assert aux.g_loss(fake_logits, fake_y).item() == approx(0.5 * ce(fake_logits, fake_y))
    assert not AuxiliaryClassifier(0.0).active
    reals_only = AuxiliaryClassifier(weight=0.5, d_on_fakes=False)  # D's classifier learns the real classes alone
    assert reals_only.d_loss(real_logits, real_y, fake_logits, fake_y).item() == approx(0.5 * ce(real_logits, real_y))
    assert reals_only.g_loss(fake_logits, fake_y).item() == approx(0.5 * ce(fake_logits, fake_y))
