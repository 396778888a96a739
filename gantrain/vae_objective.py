"""VAE objectives on the same Trainer: one phase for a VAE, the GAN's D/G phases for a VAE-GAN.

The VAE is the container's generator ``g`` (a :class:`gantrain.models.vae.VAE`: encoder, decoder,
``g(z)`` decodes to images), so the optimizer ``optim.g``, the EMA, sample grids and
``scripts/sample.py`` work as for a GAN. Likelihoods are on ``x01 = (x + 1) / 2`` in [0, 1], so
``elbo`` is in nats per image, comparable with the binarized-MNIST literature.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from gantrain import checks, elbo
from gantrain.augment import Augment
from gantrain.batch import Batch
from gantrain.errors import ConfigError
from gantrain.losses import (
    AdversarialLoss,
    FeatureDiscriminator,
    FeatureMatching,
    GeneratorTerm,
    GradientPenalty,
    LeCamPenalty,
    R1Penalty,
    WeightClip,
)
from gantrain.objectives import GANObjective, Pictures
from gantrain.perceptual import VGG16Features
from gantrain.phase import Phase, Update
from gantrain.pictures import interpolation_strip, reconstruction_grid, samples_picture
from gantrain.state import Stateful
from gantrain.stats import report


def _full(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast outputs) -> float32 for the log-likelihood sums; float32/64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# ----------------------------------------------------------------------------- reconstruction terms
class ReconTerm(nn.Module):
    """A per-image reconstruction cost ``(B,)`` of decoder output ``raw`` for images ``x`` in [-1, 1].

    ``likelihood``: the decoder output this term needs (``bernoulli`` logits, ``gaussian`` means), or
    None when it works on images. ``is_likelihood``: the cost is a negative log-likelihood in nats
    (counted in ``elbo``).
    """

    likelihood: str | None = None
    is_likelihood: bool = False

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(checks.number("weight", weight, ge=0, hint="0 = off"))

    @property
    def active(self) -> bool:
        return self.weight > 0


class BernoulliRecon(ReconTerm):
    """``-log p(x01 | z)`` under independent Bernoulli pixels (decoder logits); for binarized data."""

    likelihood, is_likelihood = "bernoulli", True

    def __init__(self, weight: float = 0.0):
        super().__init__(weight)

    def forward(self, vae: nn.Module, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -elbo.bernoulli_log_prob(_full(raw), (_full(x) + 1) / 2)


class GaussianRecon(ReconTerm):
    """``-log N(x01; mean, sigma^2)`` per image; ``sigma`` fixed, or None: the per-image ML sigma (sigma-VAE)."""

    likelihood, is_likelihood = "gaussian", True

    def __init__(self, weight: float = 0.0, sigma: float | None = None):
        super().__init__(weight)
        self.sigma = sigma
        self.log_likelihood = elbo.likelihood_fn("gaussian", sigma)

    def forward(self, vae: nn.Module, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.log_likelihood(_full(raw), (_full(x) + 1) / 2)


class PerceptualRecon(ReconTerm):
    """Mean squared distance of frozen VGG16 features (as ``loss.perceptual`` of the GAN objectives) per image.

    Not a likelihood, so it is not part of ``elbo``. The VGG is frozen, in eval mode and in no optimizer.
    """

    def __init__(
        self, weight: float = 0.0, layer: str = "relu3_3", weights: str = "imagenet", weights_path: str | None = None
    ):
        super().__init__(weight)
        self.vgg = VGG16Features(layer, weights, weights_path) if weight > 0 else None

    def forward(self, vae: nn.Module, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.vgg(x)
        return _full(self.vgg(vae.to_images(raw)) - target).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------- KL
class KLSchedule:
    """``beta`` (beta-VAE, Higgins et al. 2017), linear warm-up over ``kl_warmup_steps``, free bits per latent dim."""

    def __init__(self, beta: float = 1.0, kl_warmup_steps: int = 0, free_bits: float = 0.0):
        elbo.kl_weight(0, beta, kl_warmup_steps)  # validates loss.beta and loss.kl_warmup_steps
        checks.number("free_bits", free_bits, ge=0, hint="nats per latent dimension; 0 = off")
        self.beta, self.kl_warmup_steps, self.free_bits = beta, kl_warmup_steps, free_bits

    def term(self, mu: torch.Tensor, logvar: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted KL term of the loss, the plain mean KL in nats for logging/ELBO)."""
        kl_dims = elbo.gaussian_kl_per_dim(_full(mu), _full(logvar))  # (B, D)
        kl = kl_dims.sum(1).mean()
        trained = elbo.free_bits_kl(kl_dims, self.free_bits) if self.free_bits > 0 else kl
        weight = elbo.kl_weight(step, self.beta, self.kl_warmup_steps)
        report("kl_weight", weight)
        return weight * trained, kl


def _check_likelihood(vae: nn.Module, terms: Mapping[str, ReconTerm]) -> None:
    kind = getattr(vae, "likelihood", None)
    for name, term in terms.items():
        if term.likelihood is not None and term.likelihood != kind:
            raise ConfigError(
                f"{name}: needs a decoder that outputs {term.likelihood} parameters, but "
                f"model.g.likelihood={kind!r}; set model.g.likelihood={term.likelihood} or use another loss",
                key=name,
            )


class VAEObjective(nn.Module):
    """The negative ELBO ``recon + beta * KL`` (Kingma & Welling 2014) as one training phase named ``VAE``.

    ``recon`` is the weighted sum of the active terms (``loss.bce``, ``loss.gaussian``, ``loss.perceptual``).
    Reports ``loss/recon``, ``loss/recon/<term>``, ``loss/kl`` (nats, unweighted), ``loss/VAE``
    (what is minimised) and ``elbo`` (nats per image: minus the likelihood terms minus the KL, when
    there is exactly one likelihood term).
    """

    networks = ("g",)

    def __init__(
        self,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        bce: BernoulliRecon | None = None,
        gaussian: GaussianRecon | None = None,
        perceptual: PerceptualRecon | None = None,
        **terms: ReconTerm | None,
    ):
        super().__init__()
        self.kl = KLSchedule(beta, kl_warmup_steps, free_bits)
        terms = dict(bce=bce, gaussian=gaussian, perceptual=perceptual, **terms)
        active = {name: t for name, t in terms.items() if t is not None and t.active}
        if not active:
            raise ConfigError(
                "loss: every reconstruction term has weight 0; set loss.bce.weight, loss.gaussian.weight "
                "or loss.perceptual.weight > 0"
            )
        self.terms = nn.ModuleDict(active)

    def state_parts(self) -> dict[str, Stateful]:
        """The terms whose state the checkpoint keeps (see :meth:`GANObjective.state_parts`)."""
        return {f"loss.{name}": term for name, term in self.terms.items() if isinstance(term, Stateful)}

    def use_augment(self, augment: Augment) -> None:
        """Refused unless ``augment=none``: a VAE has no discriminator whose inputs could be augmented."""
        if augment.active:
            raise ConfigError(
                f"augment={augment.option}: augments a discriminator's inputs, and {type(self).__name__} has no "
                "discriminator; use augment=none (or a VAE-GAN, loss=vaegan)"
            )

    def double_backward_networks(self) -> dict[str, tuple[str, ...]]:
        """None: the negative ELBO needs no input gradient (see :meth:`GANObjective.double_backward_networks`)."""
        return {}

    def phases(self, model: nn.Module, updates: Mapping[str, Update], n_critic: int = 1) -> list[Phase]:
        _check_likelihood(model.g, self.terms)
        return [Phase.of("VAE", model.g, updates["g"], partial(self.loss, model.g), counts_as_step=True)]

    def sampler(self, model: nn.Module, render: Callable, noise: torch.Tensor, data) -> Callable[[], Pictures]:
        """Prior samples from the fixed ``noise`` (a conditional model's: one row per class, see
        :func:`~gantrain.pictures.class_rows`), the first 16 images beside their reconstructions, interpolations."""
        return partial(vae_pictures, model, render, noise, first_images(data))

    def negative_elbo_parts(
        self, vae: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder output, mu, logvar) for a batch, with one reparameterised sample; ``y``: a conditional VAE's
        labels (Sohn et al. 2015: q(z | x, y), p(x | z, y)), None for an unconditional one."""
        labels = () if y is None else (y,)  # an unconditional VAE's encode/decode are called as before
        mu, logvar = vae.encode(x, *labels)
        return vae.decode(vae.reparameterize(mu, logvar), *labels), mu, logvar

    def loss(self, vae: nn.Module, batch: Batch, step: int = 0) -> torch.Tensor:
        x = batch.x
        raw, mu, logvar = self.negative_elbo_parts(vae, x, vae_labels(vae, batch))
        recon, nll = torch.zeros((), device=x.device), []
        for name, term in self.terms.items():
            cost = term(vae, raw, x)  # (B,)
            report(f"loss/recon/{name}", cost.mean())
            recon = recon + term.weight * cost.mean()
            if term.is_likelihood:
                nll.append(cost.mean())
        kl_term, kl = self.kl.term(mu, logvar, step)
        loss = recon + kl_term
        report("loss/recon", recon)
        report("loss/kl", kl)
        report("loss/VAE", loss)
        if len(nll) == 1:
            report("elbo", -(nll[0] + kl))
        return loss


class VAEGANObjective(GANObjective):
    """VAE-GAN (Larsen et al. 2016): the reconstruction is measured in D's feature space, plus an adversarial term.

    Phases: the GAN objective's own D phase (real images against decoded prior samples, any
    adversarial loss and penalties), then a ``G`` phase updating encoder and decoder together on
    ``feature_weight * ||d.features(x) - d.features(x_rec)||^2 / 2 + KL + adversarial(decoded prior)``.
    The feature distance is the Gaussian log-likelihood of Larsen et al. in D's feature space (the
    "learned similarity metric"); the real features are taken without a graph, so, as in feature
    matching, the gradient reaches the VAE only. Departures from the paper: one optimizer for
    encoder and decoder (the paper has three and weights the decoder's similarity term by gamma),
    and D sees prior samples only, not also the reconstructions. Under ``augment=`` the D phase and the adversarial
    term see augmented images; the feature reconstruction compares un-augmented ones (a real image with its own
    reconstruction: independent augmentations would make the two differ by more than the VAE's error).
    """

    def __init__(
        self,
        adversarial: AdversarialLoss,
        feature_weight: float = 1.0,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        gp: GradientPenalty | None = None,
        r1: R1Penalty | None = None,
        weight_clip: WeightClip | None = None,
        fm: FeatureMatching | None = None,
        perceptual: GeneratorTerm | None = None,
        lecam: LeCamPenalty | None = None,
    ):
        # its G step draws its own prior samples (vae_loss): the D step keeps no generated batch for it
        super().__init__(
            adversarial,
            gp=gp,
            r1=r1,
            lecam=lecam,
            weight_clip=weight_clip,
            fm=fm,
            perceptual=perceptual,
            reuse_fakes=False,
        )
        if self.g_terms:
            name = next(iter(self.g_terms))
            raise ConfigError(
                f"{name}: generator terms are not used by VAE-GAN, whose reconstruction "
                "term already matches D's features; set its weight to 0",
                key=name,
            )
        checks.positive("feature_weight", feature_weight, hint="the VAE's reconstruction term")
        self.feature_weight = feature_weight
        self.kl = KLSchedule(beta, kl_warmup_steps, free_bits)

    def phases(self, model: nn.Module, updates: Mapping[str, Update], n_critic: int = 1) -> list[Phase]:
        if not isinstance(model.d, FeatureDiscriminator):
            raise ConfigError(f"VAE-GAN needs a discriminator (model.d) with features(x) and head(h); {type(model.d)}")
        d_phase, g_phase = super().phases(model, updates, n_critic)
        g_phase.loss = partial(self.vae_loss, model)
        return [d_phase, g_phase]

    def sampler(self, model: nn.Module, render: Callable, noise: torch.Tensor, data) -> Callable[[], Pictures]:
        return partial(vae_pictures, model, render, noise, first_images(data))

    def vae_loss(self, model: nn.Module, batch: Batch, step: int = 0) -> torch.Tensor:
        vae, d, x, real = model.g, model.d, self.adversarial.d_input, batch.x
        labels = model.labels(batch.y)
        mu, logvar = vae.encode(real, **labels)
        recon_images = vae.to_images(vae.decode(vae.reparameterize(mu, logvar), **labels))
        with torch.no_grad():
            real_features = d.features(x(real))
        diff = d.features(x(recon_images)) - real_features
        recon = 0.5 * _full(diff).pow(2).flatten(1).sum(1).mean()
        prior_images = model.generate(model.prior(len(batch), real.device))  # D itself sees no labels yet
        adv = self.adversarial.g_loss(d(self.d_view(prior_images)))  # augmented, as every input of D's loss
        kl_term, kl = self.kl.term(mu, logvar, step)
        loss = self.feature_weight * recon + kl_term + adv
        report("loss/recon", recon)
        report("loss/kl", kl)
        report("loss/G/adv", adv)
        report("loss/G", loss)
        return loss


def vae_labels(vae: nn.Module, batch: Batch) -> torch.Tensor | None:
    """The batch's labels for a conditional VAE (``vae.num_classes > 0``), None for an unconditional one (which
    ignores the labels a dataset carries)."""
    if not getattr(vae, "num_classes", 0):
        return None
    if batch.y is None:
        raise ValueError(f"this VAE is conditional on {vae.num_classes} classes but the batch has no labels")
    return batch.y


def first_images(stream, n: int = 16) -> Batch:
    """The stream's first ``n`` training images ``(n, C, H, W)`` and their labels (None without), on its device: the
    fixed reconstruction inputs."""
    n = min(n, len(stream.dataset))
    labels = None if stream.labels is None else stream.labels[:n].to(stream.device)
    return Batch(torch.stack([stream.dataset[i] for i in range(n)]).to(stream.device), labels)


def vae_pictures(model: nn.Module, render: Callable, noise: torch.Tensor, real: Batch) -> Pictures:
    """A VAE's pictures, in eval mode: prior samples, ``real`` beside its reconstructions, interpolations (a
    conditional VAE reconstructs each image with its label, and interpolates with the first image's label)."""
    was_training = model.g.training
    model.g.eval()
    try:
        return {
            "samples": samples_picture(model, render, noise),  # prior samples from the fixed z (per class)
            "reconstructions": reconstruction_grid(model.g, real.x, **model.labels(real.y)),
            "interpolation": interpolation_strip(
                model.g, real.x[:8], **model.labels(real.y[:8] if model.conditional else None)
            ),
        }
    finally:
        model.g.train(was_training)
