"""VAE likelihood terms, the ELBO and importance-weighted NLL estimates, as pure functions.

Conventions: images ``x`` are in the data range [-1, 1], shape ``(B, C, H, W)``; likelihoods are always scored on
``x01 = (x + 1) / 2`` in [0, 1], so that nats compare with the literature's (binarized-)MNIST numbers. Every density
returns one value per sample ``(B,)``, summed over pixels or latent dimensions, in nats. A decoder output ``raw`` is
either Bernoulli logits of ``x01`` or the Gaussian mean of ``x01``.

A VAE here is anything with ``encode(x) -> (mu, logvar)`` (each ``(B, D)``), ``decode(z) -> raw``,
``likelihood in {"bernoulli", "gaussian"}`` and ``latent_dim``; :func:`evaluate_nll` also uses
``nn.Module``'s ``train``/``eval``/``parameters``. A conditional VAE (Sohn et al. 2015; ``num_classes > 0``) has
``encode(x, y)`` and ``decode(z, y)``: the functions below take the labels ``y`` ``(B,)`` and pass them on, and the
ELBO/NLL are then of ``log p(x | y)``.

References (cited by the functions): Kingma & Welling 2014, "Auto-Encoding Variational Bayes"; Burda et al.
2016, "Importance Weighted Autoencoders"; Bowman et al. 2016, "Generating Sentences from a Continuous Space";
Sønderby et al. 2016, "Ladder Variational Autoencoders"; Kingma et al. 2016, "Improved Variational Inference
with Inverse Autoregressive Flow"; Rybkin et al. 2021, "Simple and Effective VAE Training with Calibrated Decoders".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sized

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gantrain import checks
from gantrain.errors import GantrainError

LOG_2PI = math.log(2 * math.pi)

LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``log_likelihood(raw, target) -> (N,)``: log p(target | decoder output ``raw``), summed per sample."""


# ------------------------------------------------------------------------------------ KL terms
def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dimension, ``(B, D)`` (Kingma & Welling 2014, App. B).
    ``0.5 * (exp(logvar) + mu^2 - 1 - logvar)``; >= 0, and 0 exactly at ``mu = 0, logvar = 0``."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample, ``(B,)``: :func:`gaussian_kl_per_dim` summed over D."""
    return gaussian_kl_per_dim(mu, logvar).sum(-1)


# ------------------------------------------------------ decoder likelihoods (on x01 in [0, 1])
def bernoulli_log_prob(logits: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """``sum_pixels x log sigmoid(l) + (1 - x) log sigmoid(-l)``, ``(B,)``, from logits ``(B, ...)``. Through
    ``binary_cross_entropy_with_logits``, so finite for any logit (e.g. ±80). For binary ``x01`` it is the Bernoulli
    log-likelihood; for grey levels in [0, 1] it is the (negative) continuous cross-entropy, which is not a normalised
    density of ``x01``."""
    return -F.binary_cross_entropy_with_logits(logits, x01, reduction="none").flatten(1).sum(1)


def gaussian_log_prob(mean: torch.Tensor, x01: torch.Tensor, log_sigma: float | torch.Tensor) -> torch.Tensor:
    """``sum_pixels log N(x01; mean, sigma^2)``, ``(B,)``, for ``mean``/``x01`` of shape ``(B, C, H, W)``.
    ``log_sigma``: a float, a 0-d tensor (one sigma shared by every pixel) or a per-image tensor broadcastable to
    ``(B, 1, 1, 1)`` (e.g. :func:`optimal_log_sigma`). Working in log sigma keeps small sigmas exact:
    ``-0.5 log 2pi - log sigma - 0.5 (x - mean)^2 exp(-2 log sigma)``."""
    log_sigma = (  # a number is filled on the device: a host tensor copied to a GPU would synchronise
        log_sigma.to(mean.device, mean.dtype)
        if isinstance(log_sigma, torch.Tensor)
        else torch.full((), log_sigma, dtype=mean.dtype, device=mean.device)
    )
    per_pixel = -0.5 * LOG_2PI - log_sigma - 0.5 * (x01 - mean) ** 2 * torch.exp(-2.0 * log_sigma)
    return per_pixel.flatten(1).sum(1)


def optimal_log_sigma(mean: torch.Tensor, x01: torch.Tensor, min_log_sigma: float = -6.0) -> torch.Tensor:
    """Per-image maximum-likelihood ``log sigma`` of sigma-VAE (Rybkin et al. 2021, §4), ``(B, 1, 1, 1)``.

    ``log sqrt(mean_pixels (x01 - mean)^2)``, floored at ``min_log_sigma`` (a perfect reconstruction
    would otherwise give ``-inf``). Plugged into :func:`gaussian_log_prob` it gives the highest
    log-likelihood over all sigmas shared by an image's pixels.

    The gradient flows through sigma, as in the paper (no ``detach``); above the floor d/d mean equals that at a
    fixed sigma = sigma* (a stationary point in sigma: envelope theorem). The floor is applied to the MSE before
    the log, so a zero residual gives a zero gradient, never NaN.
    """
    mse = ((x01 - mean) ** 2).flatten(1).mean(1)  # (B,)
    log_sigma = 0.5 * torch.log(mse.clamp_min(math.exp(2.0 * min_log_sigma)))
    return log_sigma.view(-1, *([1] * (mean.dim() - 1)))


def likelihood_fn(kind: str, sigma: float | None = None) -> LogLikelihood:
    """The decoder log-likelihood ``(raw, x01) -> (B,)`` for ``kind``:

    - ``"bernoulli"``: :func:`bernoulli_log_prob` (``raw`` are logits; ``sigma`` must be None);
    - ``"gaussian"`` with ``sigma`` a float > 0: :func:`gaussian_log_prob` with that fixed sigma;
    - ``"gaussian"`` with ``sigma=None``: per-image :func:`optimal_log_sigma` (sigma-VAE).
    """
    if checks.choice("likelihood", kind, ("bernoulli", "gaussian")) == "bernoulli":
        if sigma is not None:
            checks.fail("sigma", sigma, "null", "only a gaussian likelihood has a sigma")
        return bernoulli_log_prob
    if sigma is None:
        return lambda raw, x01: gaussian_log_prob(raw, x01, optimal_log_sigma(raw, x01))
    if not sigma > 0:
        checks.fail("sigma", sigma, "> 0", "or null for the per-image optimal sigma")
    log_sigma = math.log(sigma)
    return lambda raw, x01: gaussian_log_prob(raw, x01, log_sigma)


# ---------------------------------------------------------------------------- latent densities
def likelihood_of_loss(loss: Mapping) -> LogLikelihood:
    """The log-likelihood of a trained VAE's one likelihood term, from its saved ``loss`` config. ``loss.bce`` ->
    Bernoulli; ``loss.gaussian`` -> Gaussian with its ``sigma``. GantrainError when the run had none (perceptual only,
    or a GAN) or both, since then no NLL is defined."""
    active = [name for name in ("bce", "gaussian") if (loss.get(name) or {}).get("weight", 0) > 0]
    if len(active) != 1:
        raise GantrainError(
            "the checkpoint's loss has "
            + ("no likelihood term (loss.bce or loss.gaussian)" if not active else f"several ({', '.join(active)})")
            + "; the NLL is defined for a VAE trained with exactly one of them"
        )
    if active[0] == "bce":
        return likelihood_fn("bernoulli")
    return likelihood_fn("gaussian", loss["gaussian"].get("sigma"))


def log_normal_standard(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over the last dimension: ``(..., D) -> (...)``, e.g. ``(B, D) -> (B,)``."""
    return -0.5 * (z * z + LOG_2PI).sum(-1)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu, diag exp(logvar))`` summed over the last dimension: ``(..., D) -> (...)`` (broadcasting)."""
    return -0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


# ----------------------------------------------------------------------- training-time weights
def kl_weight(step: int, beta: float = 1.0, warmup_steps: int = 0) -> float:
    """Linear KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): the weight of the KL term.
    ``beta * min(1, step / warmup_steps)`` (0 at step 0, ``beta`` from step ``warmup_steps`` on), or ``beta`` throughout
    when ``warmup_steps == 0``. ``step``: optimizer steps taken before this one (0 for the first)."""
    if beta < 0:
        checks.fail("beta", beta, ">= 0")
    if warmup_steps < 0:  # named as the loss config names it
        checks.fail("kl_warmup_steps", warmup_steps, ">= 0", "0 = no warm-up")
    if step < 0:
        raise GantrainError(f"step={step}: must be >= 0")
    if warmup_steps == 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup_steps)


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Free bits (Kingma et al. 2016, App. C.8), a 0-d tensor: batch-level (the training term), not per sample.
    ``sum_d max(free_bits, mean_batch kl_per_dim[:, d])`` for ``kl_per_dim`` ``(B, D)``, ``free_bits`` in nats per
    latent dimension: a dimension below the threshold contributes the constant ``free_bits`` and gets no gradient, so
    the encoder is not pushed to collapse it onto the prior. ``free_bits == 0``: the batch mean of the summed KL."""
    if free_bits < 0:
        checks.fail("free_bits", free_bits, ">= 0", "nats per latent dimension; 0 = off")
    if free_bits == 0:
        return kl_per_dim.sum(1).mean()
    return kl_per_dim.mean(0).clamp_min(free_bits).sum()


# ------------------------------------------------------------------------- importance sampling
def _check_k_chunk(k: int, chunk: int | None) -> None:
    if k < 1:
        checks.fail("k", k, ">= 1", "number of importance samples")
    if chunk is not None and chunk < 1:
        checks.fail("chunk", chunk, ">= 1 or None", "importance samples per decoder pass")


def _importance_terms(
    vae,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    target: torch.Tensor,
    k: int,
    log_likelihood: LogLikelihood,
    chunk: int | None,
    generator: torch.Generator | None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(target|z_i), log p(z_i) - log q(z_i|x))``, each ``(k, B)``, for ``z_i ~ q(z|x)``. All ``k * B * D``
    standard normals are drawn in one call before any decoding, so the samples (hence the results) do not depend on
    ``chunk``. ``y``: a conditional VAE's labels ``(B,)``, decoded with every sample."""
    b, d = mu.shape
    eps = torch.randn((k, b, d), generator=generator, dtype=mu.dtype, device=mu.device)  # (k, B, D)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps  # (k, B, D), as vae.reparameterize would
    # log q(z|x) with (z - mu) / std == eps exactly: same value and gradient as log_normal_diag(z, mu, logvar).
    log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(-1)  # (k, B)
    log_prior_ratio = log_normal_standard(z) - log_q  # (k, B)
    step = k if chunk is None else chunk
    parts = []
    for start in range(0, k, step):
        zc = z[start : start + step]  # (c, B, D)
        c = zc.shape[0]
        zc = zc.reshape(c * b, d)
        raw = vae.decode(zc) if y is None else vae.decode(zc, y.repeat(c))  # (c*B, C, H, W); y.repeat matches zc
        tgt = target.unsqueeze(0).expand(c, *target.shape).reshape(c * b, *target.shape[1:])
        parts.append(log_likelihood(raw, tgt).view(c, b))
    return torch.cat(parts, 0), log_prior_ratio


def log_weights(
    vae,
    x: torch.Tensor,
    k: int,
    log_likelihood: LogLikelihood,
    chunk: int | None = None,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance log-weights ``log p(t|z_i) + log p(z_i) - log q(z_i|x)``, ``(k, B)``, ``z_i ~ q(z|x)``.

    Args:
        vae: encodes ``x`` once (``vae.encode(x) -> (mu, logvar)``) and decodes every sample.
        x: the encoder's input, ``(B, C, H, W)`` in the data range [-1, 1].
        k: importance samples per image.
        log_likelihood: ``(raw, t) -> (N,)`` scoring the decoder output against the target ``t``
            repeated per sample (``N = samples * B``), e.g. :func:`likelihood_fn`.
        chunk: decode at most ``chunk`` of the k samples per pass; None = all ``k * B`` images in one pass.
        target: what the likelihood scores; default ``x01 = (x + 1) / 2`` (this module's convention);
            ``target=x`` for a model whose likelihood lives on ``x`` itself.
        generator: for the ``k * B * D`` standard normals (default: the global RNG). ``z_i`` is formed here,
            not by ``vae.reparameterize``, so this stream alone fixes the samples, whatever ``chunk``.
        y: a conditional VAE's labels ``(B,)`` (given to ``encode`` and ``decode``); None for an unconditional one.

    Gradients are kept (reparameterised); wrap the call in ``torch.no_grad()`` for evaluation.
    """
    _check_k_chunk(k, chunk)
    if target is None:
        target = (x + 1) / 2
    mu, logvar = vae.encode(x) if y is None else vae.encode(x, y)
    log_lik, log_prior_ratio = _importance_terms(vae, mu, logvar, target, k, log_likelihood, chunk, generator, y)
    return log_lik + log_prior_ratio


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The k-sample importance-weighted bound (Burda et al. 2016, eq. 8), ``(k, B) -> (B,)``.
    ``logsumexp_i log_w_i - log k``: a lower bound on ``log p(x)`` that is non-decreasing in ``k`` in expectation and
    converges to ``log p(x)``; equals :func:`elbo_estimate` at ``k = 1``."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def elbo_estimate(log_w: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo ELBO ``mean_i log_w_i``, ``(k, B) -> (B,)``; <= :func:`iwae_bound` on the same samples (Jensen)."""
    return log_w.mean(0)


@torch.no_grad()
def evaluate_nll(
    vae,
    batches: Iterable[torch.Tensor],
    k: int = 500,
    chunk: int | None = 100,
    log_likelihood: LogLikelihood | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """ELBO and importance-weighted NLL of ``vae`` over every image in ``batches``, in nats per image.

    Args:
        batches: tensors ``(B, C, H, W)`` in [-1, 1] (a ``(x, y)`` tuple/list uses its first item, and its labels
            ``y`` when ``vae`` is conditional, ``vae.num_classes > 0``, which needs them); moved to the device of
            ``vae``'s parameters.
        k, chunk: importance samples per image and samples per decoder pass (:func:`log_weights`).
        log_likelihood: ``(raw, x01) -> (N,)``; default ``likelihood_fn(vae.likelihood)`` (gaussian: per-image
            optimal sigma). A model trained with a fixed or learned sigma must pass its own.
        progress: a tqdm bar over batches (quiet off-terminal); False hides it.
        generator: for all importance noise (default: the global RNG).

    Returns ``{"elbo", "elbo_mc", "nll_iwae", "images"}``:
        elbo: mean of ``log p(x01|z_1) - KL(q(z|x) || p(z))``, z_1 the first importance sample, analytic KL;
        elbo_mc: mean of :func:`elbo_estimate` over the k samples (all terms Monte-Carlo);
        nll_iwae: mean of ``-`` :func:`iwae_bound`, the k-sample NLL estimate (an upper bound in expectation);
            ``nll_iwae <= -elbo_mc`` always;
        images: the number of images.

    Runs under ``torch.no_grad`` in eval mode; the module's previous train/eval mode is restored.
    """
    _check_k_chunk(k, chunk)
    if log_likelihood is None:
        log_likelihood = likelihood_fn(vae.likelihood)
    params = next(iter(vae.parameters()), None)
    device = params.device if params is not None else None
    was_training = vae.training
    vae.eval()
    sums = {"elbo": 0.0, "elbo_mc": 0.0, "nll_iwae": 0.0}
    n = 0
    try:
        total = len(batches) if isinstance(batches, Sized) else None
        for batch in tqdm(
            batches, total=total, desc="evaluating NLL", unit="batch", disable=None if progress else True
        ):
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            if not getattr(vae, "num_classes", 0):
                y = None
            elif y is None:
                raise GantrainError(f"evaluate_nll: the VAE is conditional on {vae.num_classes} classes: give (x, y)")
            if device is not None:
                x, y = x.to(device), None if y is None else y.to(device)
            x01 = (x + 1) / 2
            mu, logvar = vae.encode(x) if y is None else vae.encode(x, y)
            log_lik, log_prior_ratio = _importance_terms(vae, mu, logvar, x01, k, log_likelihood, chunk, generator, y)
            log_w = log_lik + log_prior_ratio  # (k, B)
            sums["elbo"] += (log_lik[0] - gaussian_kl(mu, logvar)).double().sum().item()
            sums["elbo_mc"] += elbo_estimate(log_w).double().sum().item()
            sums["nll_iwae"] -= iwae_bound(log_w).double().sum().item()
            n += x.shape[0]
    finally:
        vae.train(was_training)
    if n == 0:
        raise GantrainError("evaluate_nll: batches yielded no images")
    return {**{key: value / n for key, value in sums.items()}, "images": n}
