"""ELBO terms against hand computation and torch.distributions (float64), and the IWAE estimators on
tiny fake VAEs, including one whose posterior is exact so every importance weight equals log p(x)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Normal, kl_divergence

from gantrain.elbo import (
    bernoulli_log_prob,
    elbo_estimate,
    evaluate_nll,
    free_bits_kl,
    gaussian_kl,
    gaussian_kl_per_dim,
    gaussian_log_prob,
    iwae_bound,
    kl_weight,
    likelihood_fn,
    log_normal_diag,
    log_normal_standard,
    log_weights,
    optimal_log_sigma,
)
from gantrain.errors import ConfigError, GantrainError

D64 = torch.float64
MU = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.3, -0.7]], dtype=D64)
LOGVAR = torch.tensor([[0.0, -0.5, 1.2], [-2.0, 0.4, 0.1]], dtype=D64)


class FakeVAE(nn.Module):
    """Linear encoder/decoder on 6-pixel images (1, 2, 3), the interface gantrain.elbo expects."""

    def __init__(self, latent_dim: int = 2, likelihood: str = "bernoulli", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.enc = nn.Linear(6, 2 * latent_dim).double()
        self.dec = nn.Linear(latent_dim, 6).double()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z).view(-1, 1, 2, 3)


class ExactPosteriorVAE(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(x; z, s^2 I) per pixel, q(z|x) = the exact posterior
    N(x / (1 + s^2), s^2 / (1 + s^2)); so log p(x|z) + log p(z) - log q(z|x) = log N(x; 0, 1 + s^2)."""

    likelihood = "gaussian"

    def __init__(self, s: float):
        super().__init__()
        self.s2 = s * s
        self.latent_dim = 6

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x.flatten(1) / (1 + self.s2)
        return mu, torch.full_like(mu, math.log(self.s2 / (1 + self.s2)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.view(-1, 1, 2, 3)


def images(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 1, 2, 3), generator=g, dtype=D64) * 2 - 1  # [-1, 1]


# ----------------------------------------------------------------------------------------------
# KL


def test_gaussian_kl_matches_formula_and_torch_distributions():
    direct = 0.5 * (LOGVAR.exp() + MU**2 - 1 - LOGVAR).sum(-1)
    torch_kl = kl_divergence(Normal(MU, (0.5 * LOGVAR).exp()), Normal(torch.zeros_like(MU), torch.ones_like(MU))).sum(
        -1
    )
    assert gaussian_kl(MU, LOGVAR).shape == (2,)
    torch.testing.assert_close(gaussian_kl(MU, LOGVAR), direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(gaussian_kl(MU, LOGVAR), torch_kl, rtol=0, atol=1e-10)
    torch.testing.assert_close(gaussian_kl_per_dim(MU, LOGVAR).sum(-1), gaussian_kl(MU, LOGVAR), rtol=0, atol=0)
    # hand: mu=0.5, logvar=0 -> 0.5 * 0.25
    assert gaussian_kl_per_dim(MU, LOGVAR)[0, 0].item() == pytest.approx(0.125, abs=1e-12)
    zeros = torch.zeros(3, 4, dtype=D64)
    assert torch.equal(gaussian_kl(zeros, zeros), torch.zeros(3, dtype=D64))


# ----------------------------------------------------------------------------------------------
# decoder likelihoods


def test_bernoulli_log_prob_matches_torch_on_binary_x():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 1, 2, 3), generator=g, dtype=D64) * 3
    x01 = (torch.rand((4, 1, 2, 3), generator=g, dtype=D64) > 0.5).to(D64)
    want = Bernoulli(logits=logits).log_prob(x01).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_prob(logits, x01), want, rtol=0, atol=1e-10)


def test_bernoulli_log_prob_hand_numbers_and_grey_levels():
    def log_sigmoid(v: float) -> float:
        return -math.log1p(math.exp(-v))

    logits = torch.tensor([[2.0, -1.0]], dtype=D64)
    got = bernoulli_log_prob(logits, torch.tensor([[1.0, 0.0]], dtype=D64)).item()
    assert got == pytest.approx(log_sigmoid(2.0) + log_sigmoid(1.0), abs=1e-12)
    # continuous cross-entropy for non-binary x01
    got = bernoulli_log_prob(logits, torch.tensor([[0.3, 0.8]], dtype=D64)).item()
    want = 0.3 * log_sigmoid(2.0) + 0.7 * log_sigmoid(-2.0) + 0.8 * log_sigmoid(-1.0) + 0.2 * log_sigmoid(1.0)
    assert got == pytest.approx(want, abs=1e-12)


def test_bernoulli_log_prob_is_finite_for_large_logits():
    for dtype in (torch.float32, D64):
        logits = torch.tensor([[80.0, -80.0, 80.0, -80.0]], dtype=dtype)
        x01 = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=dtype)  # two confidently wrong, two right
        got = bernoulli_log_prob(logits, x01)
        assert torch.isfinite(got).all()
        assert got.item() == pytest.approx(-160.0, rel=1e-6)


def test_gaussian_log_prob_matches_torch_scalar_and_per_image_sigma():
    g = torch.Generator().manual_seed(0)
    mean = torch.rand((3, 1, 2, 3), generator=g, dtype=D64)
    x01 = torch.rand((3, 1, 2, 3), generator=g, dtype=D64)
    for log_sigma in (-1.3, torch.tensor(0.4, dtype=D64)):
        sigma = math.exp(float(log_sigma))
        want = Normal(mean, torch.tensor(sigma, dtype=D64)).log_prob(x01).flatten(1).sum(1)
        torch.testing.assert_close(gaussian_log_prob(mean, x01, log_sigma), want, rtol=0, atol=1e-10)
    per_image = torch.tensor([-2.0, 0.0, 0.7], dtype=D64).view(3, 1, 1, 1)
    want = Normal(mean, per_image.exp()).log_prob(x01).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(mean, x01, per_image), want, rtol=0, atol=1e-10)


def test_optimal_log_sigma_value_maximises_and_floor():
    x01 = torch.tensor([[0.1, 0.5, 0.9, 0.2, 0.4, 0.6]], dtype=D64).view(1, 1, 2, 3)
    resid = torch.tensor([0.05, -0.1, 0.2, 0.0, -0.3, 0.15], dtype=D64)
    mean = x01 - resid.view(1, 1, 2, 3)
    mse = (resid**2).mean().item()
    ls = optimal_log_sigma(mean, x01)
    assert ls.shape == (1, 1, 1, 1)
    assert ls.item() == pytest.approx(0.5 * math.log(mse), abs=1e-12)
    best = gaussian_log_prob(mean, x01, ls).item()
    assert best == pytest.approx(-3 * (math.log(2 * math.pi) + math.log(mse) + 1), abs=1e-10)  # -P/2 (...)
    for factor in (0.9, 1.1):
        assert gaussian_log_prob(mean, x01, ls + math.log(factor)).item() < best
    # floor: a perfect reconstruction gives min_log_sigma, with a finite (zero) gradient
    m = x01.clone().requires_grad_(True)
    floored = optimal_log_sigma(m, x01, min_log_sigma=-4.0)
    assert floored.item() == -4.0
    (grad,) = torch.autograd.grad(floored.sum(), m)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_optimal_log_sigma_gradient_flows_and_equals_fixed_sigma_gradient():
    g = torch.Generator().manual_seed(3)
    x01 = torch.rand((2, 1, 2, 3), generator=g, dtype=D64)
    mean = torch.rand((2, 1, 2, 3), generator=g, dtype=D64).requires_grad_(True)
    ls = optimal_log_sigma(mean, x01)
    assert ls.requires_grad
    (through,) = torch.autograd.grad(gaussian_log_prob(mean, x01, ls).sum(), mean)
    (fixed,) = torch.autograd.grad(gaussian_log_prob(mean, x01, ls.detach()).sum(), mean)
    torch.testing.assert_close(through, fixed, rtol=1e-9, atol=1e-9)  # sigma* is stationary


def test_likelihood_fn_picks_the_function():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand((2, 1, 2, 3), generator=g, dtype=D64)
    x01 = torch.rand((2, 1, 2, 3), generator=g, dtype=D64)
    assert torch.equal(likelihood_fn("bernoulli")(raw, x01), bernoulli_log_prob(raw, x01))
    assert torch.equal(likelihood_fn("gaussian", 0.3)(raw, x01), gaussian_log_prob(raw, x01, math.log(0.3)))
    want = gaussian_log_prob(raw, x01, optimal_log_sigma(raw, x01))
    assert torch.equal(likelihood_fn("gaussian", None)(raw, x01), want)
    with pytest.raises(ConfigError, match=r"^likelihood='laplace': must be one of bernoulli, gaussian$"):
        likelihood_fn("laplace")
    with pytest.raises(ConfigError, match=r"^sigma=0\.0: must be > 0 \(or null for the per-image optimal sigma\)$"):
        likelihood_fn("gaussian", 0.0)
    with pytest.raises(ConfigError, match=r"^sigma=0\.5: must be null \(only a gaussian likelihood has a sigma\)$"):
        likelihood_fn("bernoulli", 0.5)


# ----------------------------------------------------------------------------------------------
# latent densities


def test_log_normal_densities_match_torch():
    z = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.5, -0.4]], dtype=D64)
    torch.testing.assert_close(
        log_normal_standard(z), Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1), rtol=0, atol=1e-12
    )
    want = Normal(MU, (0.5 * LOGVAR).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal_diag(z, MU, LOGVAR), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z)), log_normal_standard(z))


# ----------------------------------------------------------------------------------------------
# KL weight and free bits


def test_kl_weight_pinned_values():
    got = [kl_weight(s, beta=0.5, warmup_steps=10) for s in (0, 1, 5, 10, 20)]
    assert got == pytest.approx([0.0, 0.05, 0.25, 0.5, 0.5], abs=1e-15)
    assert kl_weight(0, beta=0.5) == 0.5 and kl_weight(1000, beta=2.0, warmup_steps=0) == 2.0
    assert isinstance(kl_weight(3, 1.0, 10), float)
    with pytest.raises(ConfigError, match=r"^beta=-1: must be >= 0$"):
        kl_weight(0, beta=-1)
    with pytest.raises(ConfigError, match=r"^kl_warmup_steps=-5: must be >= 0 \(0 = no warm-up\)$"):
        kl_weight(0, warmup_steps=-5)
    with pytest.raises(GantrainError, match="step=-1"):
        kl_weight(-1)


def test_free_bits_kl_hand_matrix():
    kl = torch.tensor([[0.1, 1.0, 0.3], [0.3, 2.0, 0.5]], dtype=D64, requires_grad=True)
    # batch means 0.2, 1.5, 0.4 -> max(0.5, .) = 0.5, 1.5, 0.5
    got = free_bits_kl(kl, 0.5)
    assert got.dim() == 0 and got.item() == pytest.approx(2.5, abs=1e-12)
    (grad,) = torch.autograd.grad(got, kl)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.5, 0.0]] * 2, dtype=D64))  # clamped dims: no gradient
    assert free_bits_kl(kl, 0.0).item() == pytest.approx((1.4 + 2.8) / 2, abs=1e-12)
    with pytest.raises(ConfigError, match=r"^free_bits=-0\.1: must be >= 0 \(nats per latent dimension; 0 = off\)$"):
        free_bits_kl(kl, -0.1)


# ----------------------------------------------------------------------------------------------
# importance sampling


def test_log_weights_shape_and_gradient():
    vae, x = FakeVAE(), images(4)
    log_w = log_weights(vae, x, 3, bernoulli_log_prob, generator=torch.Generator().manual_seed(0))
    assert log_w.shape == (3, 4) and torch.isfinite(log_w).all()
    iwae_bound(log_w).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    with pytest.raises(GantrainError, match=r"^k=0: must be >= 1 \(number of importance samples\)$"):
        log_weights(vae, x, 0, bernoulli_log_prob)
    with pytest.raises(GantrainError, match=r"^chunk=0: must be >= 1 or None"):
        log_weights(vae, x, 2, bernoulli_log_prob, chunk=0)


@torch.no_grad()
def test_log_weights_by_hand_for_one_sample():
    # Same generator -> same eps: rebuild z and every term by hand.
    vae, x = FakeVAE(), images(3)
    log_w = log_weights(vae, x, 1, bernoulli_log_prob, generator=torch.Generator().manual_seed(5))
    mu, logvar = vae.encode(x)
    eps = torch.randn((1, 3, 2), generator=torch.Generator().manual_seed(5), dtype=D64)[0]
    z = mu + (0.5 * logvar).exp() * eps
    want = bernoulli_log_prob(vae.decode(z), (x + 1) / 2) + log_normal_standard(z) - log_normal_diag(z, mu, logvar)
    torch.testing.assert_close(log_w[0], want, rtol=0, atol=1e-10)


@torch.no_grad()
def test_iwae_equals_elbo_at_k1_and_bounds_it_above():
    vae, x = FakeVAE(), images(8)
    log_w = log_weights(vae, x, 1, bernoulli_log_prob, generator=torch.Generator().manual_seed(0))
    assert torch.equal(iwae_bound(log_w), elbo_estimate(log_w))
    for k in (5, 50):
        log_w = log_weights(vae, x, k, bernoulli_log_prob, generator=torch.Generator().manual_seed(k))
        assert (iwae_bound(log_w) >= elbo_estimate(log_w)).all()
        assert (iwae_bound(log_w) > elbo_estimate(log_w)).any()


@torch.no_grad()
def test_iwae_bound_grows_with_k():
    vae, x = FakeVAE(), images(64)
    bounds = {
        k: iwae_bound(log_weights(vae, x, k, bernoulli_log_prob, generator=torch.Generator().manual_seed(1))).mean()
        for k in (1, 50)
    }
    assert bounds[50] - bounds[1] > 0.05  # 0.19 here; 0.09-0.46 over seeds 0-3


@torch.no_grad()
def test_chunking_does_not_change_log_weights():
    vae, x = FakeVAE(), images(5)
    full = log_weights(vae, x, 7, bernoulli_log_prob, generator=torch.Generator().manual_seed(2))
    for chunk in (1, 3, 7, 100):
        got = log_weights(vae, x, 7, bernoulli_log_prob, chunk=chunk, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, full, rtol=0, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 4, 30])
def test_exact_posterior_gives_log_px_for_every_weight(k):
    s = 0.6
    vae, x = ExactPosteriorVAE(s), images(4)
    sigma_ll = lambda raw, t: gaussian_log_prob(raw, t, math.log(s))  # on x itself, not x01
    log_w = log_weights(vae, x, k, sigma_ll, chunk=3, target=x, generator=torch.Generator().manual_seed(k))
    log_px = (
        Normal(torch.tensor(0.0, dtype=D64), torch.tensor(1 + s * s, dtype=D64).sqrt()).log_prob(x).flatten(1).sum(1)
    )  # (B,)
    torch.testing.assert_close(log_w, log_px.expand(k, -1), rtol=0, atol=1e-10)
    torch.testing.assert_close(iwae_bound(log_w), log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(elbo_estimate(log_w), log_px, rtol=0, atol=1e-10)


def test_evaluate_nll_over_batches():
    vae = FakeVAE()
    vae.train()
    batches = [images(4, seed=1), images(3, seed=2), (images(5, seed=3), torch.zeros(5))]
    out = evaluate_nll(vae, batches, k=20, chunk=6, progress=False, generator=torch.Generator().manual_seed(0))
    assert out["images"] == 12
    assert all(math.isfinite(out[key]) for key in ("elbo", "elbo_mc", "nll_iwae"))
    assert out["nll_iwae"] <= -out["elbo_mc"]
    assert vae.training  # mode restored
    vae.eval()
    again = evaluate_nll(vae, batches, k=20, chunk=20, progress=False, generator=torch.Generator().manual_seed(0))
    assert not vae.training
    assert again == pytest.approx(out, rel=1e-12)  # chunk does not matter for the same seed


def test_evaluate_nll_gaussian_default_uses_optimal_sigma():
    vae = FakeVAE(likelihood="gaussian")
    batches = [images(3)]
    out = evaluate_nll(vae, batches, k=4, progress=False, generator=torch.Generator().manual_seed(0))
    ll = likelihood_fn("gaussian", None)
    want = evaluate_nll(
        vae, batches, k=4, log_likelihood=ll, progress=False, generator=torch.Generator().manual_seed(0)
    )
    assert out == want
    with pytest.raises(GantrainError, match="no images"):
        evaluate_nll(vae, [], k=2, progress=False)
