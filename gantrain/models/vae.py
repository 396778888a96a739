"""Variational autoencoder (Kingma & Welling 2014): encoders, decoders and the :class:`VAE` container.

Images arrive in the data range [-1, 1]. An encoder maps them to ``(B, 2 * latent_dim)``, read as the
posterior mean and log-variance ``(mu, logvar)`` of a diagonal Gaussian q(z | x); a decoder maps a latent
``(B, latent_dim)`` to raw per-pixel parameters ``(B, C, R, R)`` of p(x | z) over ``x01 = (x + 1) / 2``
in [0, 1]: Bernoulli logits or Gaussian means (``VAE.likelihood``). ``VAE.forward(z)`` turns them into
images in [-1, 1], so a VAE can stand in for a generator ``g`` wherever samples are drawn from
``g(z)`` with ``z ~ N(0, I)`` of shape ``(n, *g.latent_shape)`` (e.g. :meth:`gantrain.models.GenerativeModel.sample`).

Conditional VAE (Sohn et al. 2015, "Learning Structured Output Representation using Deep Conditional Generative
Models"): a :class:`VAE` with ``num_classes > 0`` models q(z | x, y) and p(x | z, y). The label enters both networks as
its one-hot vector (as in the paper; no embedding table): the encoder sees it as ``num_classes`` constant input planes
beside the image (conv) or concatenated to the flattened image (MLP), the decoder concatenated to the latent, so the
first layer of each learns a per-class input. Encoders and decoders take it through ``cond_dim`` (0: unconditional, the
networks exactly as without it). The prior stays N(0, I), independent of y (the paper's baseline CVAE, not its
conditional prior network p(z | x)).

Families: :class:`ConvEncoder` / :class:`ConvDecoder` mirror the DCGAN discriminator / generator shapes (32 or 64 px);
:class:`MLPEncoder` / :class:`MLPDecoder` are fully connected (e.g. the classic 784-400-40 MNIST VAE). All layers keep
torch's default init; a container may re-initialise them (:func:`gantrain.models.initialize`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gantrain import checks
from gantrain.models.layers import NORMS, norm_layer

ENCODER_NORMS = NORMS  # batch | layer | instance | none
DECODER_NORMS = ("batch", "none")
CONV_RESOLUTIONS = (32, 64)
MLP_MAX_RESOLUTION = 128  # the first Linear takes channels*R*R inputs: 49,152 at 128 px in colour
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}
LIKELIHOODS = ("bernoulli", "gaussian")

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ----------------------------------------------------------------------------- conv encoder / decoder
class ConvEncoder(nn.Module):
    """Strided-conv encoder: ``(B, channels, R, R)`` images in [-1, 1] -> ``(B, 2 * latent_dim)`` = ``[mu, logvar]``.

    The DCGAN discriminator's body (kernel 4, stride 2, padding 1): at 32 px
    ``Conv(C, ndf) LReLU(0.2) -> Conv(ndf, 2ndf) [norm] LReLU -> Conv(2ndf, 4ndf) [norm] LReLU`` gives
    ``(B, 4ndf, 4, 4)``; 64 px adds one more layer (widths ndf, 2ndf, 4ndf, 8ndf). Then flatten and
    ``Linear(width * 16, 2 * latent_dim)``. The first conv has no norm, and a conv right before a norm has no bias.

    ``norm``: ``none`` (default; each sample's ELBO is then independent of the rest of the batch),
    ``batch``, ``layer`` (GroupNorm(1, C)) or ``instance``. ``cond_dim``: the size of a conditioning vector ``c``
    (a one-hot label) given to ``forward``, broadcast to ``cond_dim`` constant planes beside the image channels.
    """

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 32,
        ndf: int = 64,
        latent_dim: int = 32,
        norm: str = "none",
        cond_dim: int = 0,
    ):
        super().__init__()
        checks.integer("channels", channels, 1)
        n = 3 if checks.choice("resolution", resolution, CONV_RESOLUTIONS) == 32 else 4
        checks.integer("ndf", ndf, 1)
        checks.integer("latent_dim", latent_dim, 1)
        checks.choice("norm", norm, ENCODER_NORMS)
        widths = [ndf * 2**i for i in range(n)]  # [ndf, 2ndf, 4ndf] at 32 px
        bias = norm == "none"
        cond_dim = checks.integer("cond_dim", cond_dim, 0)
        layers: list[nn.Module] = [nn.Conv2d(channels + cond_dim, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=bias), norm_layer(norm, c_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Flatten(1), nn.Linear(widths[-1] * 4 * 4, 2 * latent_dim)]
        self.net = nn.Sequential(*layers)
        self.channels, self.resolution, self.latent_dim, self.cond_dim = channels, resolution, latent_dim, cond_dim

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, R, R)`` (and ``c`` ``(B, cond_dim)``) -> ``(B, 2 * latent_dim)``."""
        if c is not None:
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)], 1)
        return self.net(x)


class ConvDecoder(nn.Module):
    """Transposed-conv decoder: ``(B, latent_dim)`` -> raw ``(B, channels, R, R)`` (no output activation). The DCGAN
    generator with a Linear stem: at 32 px ``Linear(latent_dim, 4ngf * 4 * 4)``, reshape to ``(B, 4ngf, 4, 4)``,
    ``[norm] ReLU -> ConvT(4ngf, 2ngf) [norm] ReLU -> ConvT(2ngf, ngf) [norm] ReLU -> ConvT(ngf, C)`` (kernel 4, stride
    2, padding 1: 4 -> 8 -> 16 -> 32); 64 px starts at 8ngf and adds one layer. The output is Bernoulli logits or
    Gaussian means of the pixels in [0, 1], as the :class:`VAE`'s ``likelihood`` says. ``norm``: ``none`` (default) or
    ``batch``; a layer right before a norm has no bias. ``cond_dim``: the size of a conditioning vector ``c`` given to
    ``forward``, concatenated to the latent (the stem is then ``Linear(latent_dim + cond_dim, .)``)."""

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 32,
        ngf: int = 64,
        latent_dim: int = 32,
        norm: str = "none",
        cond_dim: int = 0,
    ):
        super().__init__()
        checks.integer("channels", channels, 1)
        n = 3 if checks.choice("resolution", resolution, CONV_RESOLUTIONS) == 32 else 4
        checks.integer("ngf", ngf, 1)
        checks.integer("latent_dim", latent_dim, 1)
        checks.choice("norm", norm, DECODER_NORMS)
        widths = [ngf * 2 ** (n - 1 - i) for i in range(n)]  # [4ngf, 2ngf, ngf] at 32 px
        bias = norm == "none"
        cond_dim = checks.integer("cond_dim", cond_dim, 0)
        layers: list[nn.Module] = [
            nn.Linear(latent_dim + cond_dim, widths[0] * 4 * 4, bias=bias),
            nn.Unflatten(1, (widths[0], 4, 4)),
            norm_layer(norm, widths[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias), norm_layer(norm, c_out), nn.ReLU(True)]
        layers.append(nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1))  # (B, C, R, R), raw
        self.net = nn.Sequential(*layers)
        self.channels, self.resolution, self.latent_dim, self.cond_dim = channels, resolution, latent_dim, cond_dim

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` (and ``c`` ``(B, cond_dim)``) -> ``(B, C, R, R)`` raw."""
        return self.net(z if c is None else torch.cat([z, c.to(z.dtype)], 1))


# ----------------------------------------------------------------------------- MLP encoder / decoder
def _mlp_body(
    channels: int,
    resolution: int,
    latent_dim: int,
    hidden: Sequence[int],
    activation: str,
    encoder: bool,
    cond_dim: int = 0,
) -> tuple[list[int], list[nn.Module]]:
    """Checked ``hidden`` sizes (a non-empty list of ints >= 1) and the ``[Linear, act]`` layers up to them; the
    first takes ``cond_dim`` more inputs (a conditioning vector concatenated to the input)."""
    checks.integer("channels", channels, 1)
    checks.integer("cond_dim", cond_dim, 0)
    checks.integer("resolution", resolution, 4, at_most=MLP_MAX_RESOLUTION)
    checks.integer("latent_dim", latent_dim, 1)
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or len(hidden) == 0:
        checks.fail("hidden", hidden, "a non-empty list of layer widths", "e.g. [400]")
    sizes = [checks.integer(f"hidden[{i}]", h, 1) for i, h in enumerate(hidden)]
    act = ACTIVATIONS[checks.choice("activation", activation, ACTIVATIONS)]
    layers: list[nn.Module] = []
    first = (channels * resolution * resolution if encoder else latent_dim) + cond_dim
    for h_in, h_out in zip([first, *sizes], sizes):
        layers += [nn.Linear(h_in, h_out), act()]
    return sizes, layers


class MLPEncoder(nn.Module):
    """Fully connected encoder: ``(B, channels, R, R)`` -> ``(B, 2 * latent_dim)`` = ``[mu, logvar]``. Flatten to
    ``C * R * R``, then ``[Linear(., h), act]`` for every width ``h`` in ``hidden``, then
    ``Linear(hidden[-1], 2 * latent_dim)``. ``activation``: relu | tanh | softplus | elu. ``resolution``: 4 to 128;
    ``hidden``: a list, tuple or OmegaConf ListConfig of ints >= 1. ``cond_dim``: the size of a conditioning vector
    ``c`` given to ``forward``, concatenated to the flattened image."""

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 28,
        hidden: Sequence[int] = (400,),
        latent_dim: int = 40,
        activation: str = "relu",
        cond_dim: int = 0,
    ):
        super().__init__()
        sizes, hidden_layers = _mlp_body(channels, resolution, latent_dim, hidden, activation, True, cond_dim)
        self.net = nn.Sequential(nn.Flatten(1), *hidden_layers, nn.Linear(sizes[-1], 2 * latent_dim))
        self.channels, self.resolution, self.latent_dim, self.cond_dim = channels, resolution, latent_dim, cond_dim
        self.hidden = sizes

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, R, R)`` (and ``c`` ``(B, cond_dim)``) -> ``(B, 2 * latent_dim)``."""
        return self.net(x if c is None else torch.cat([x.flatten(1), c.to(x.dtype)], 1))


class MLPDecoder(nn.Module):
    """Fully connected decoder: ``(B, latent_dim)`` -> raw ``(B, channels, R, R)`` (no output activation).
    ``[Linear(., h), act]`` for every width ``h`` in ``hidden``, then ``Linear(hidden[-1], C * R * R)`` reshaped to
    ``(B, C, R, R)``. Same arguments and checks as :class:`MLPEncoder`; ``c`` is concatenated to the latent."""

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 28,
        hidden: Sequence[int] = (400,),
        latent_dim: int = 40,
        activation: str = "relu",
        cond_dim: int = 0,
    ):
        super().__init__()
        sizes, layers = _mlp_body(channels, resolution, latent_dim, hidden, activation, False, cond_dim)
        layers += [
            nn.Linear(sizes[-1], channels * resolution * resolution),
            nn.Unflatten(1, (channels, resolution, resolution)),
        ]
        self.net = nn.Sequential(*layers)
        self.channels, self.resolution, self.latent_dim, self.cond_dim = channels, resolution, latent_dim, cond_dim
        self.hidden = sizes

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` (and ``c`` ``(B, cond_dim)``) -> ``(B, C, R, R)`` raw."""
        return self.net(z if c is None else torch.cat([z, c.to(z.dtype)], 1))


# ----------------------------------------------------------------------------- the VAE
class VAE(nn.Module):
    """An ``encoder`` q(z | x) and a ``decoder`` p(x | z) sharing a ``latent_dim``-dimensional latent.

    Args:
        encoder: ``(B, C, R, R)`` images in [-1, 1] -> ``(B, 2 * latent_dim)``, split into ``(mu, logvar)``.
        decoder: ``(B, latent_dim)`` -> raw ``(B, C, R, R)``.
        latent_dim: checked against ``encoder.latent_dim`` / ``decoder.latent_dim`` where they exist.
        likelihood: what the decoder's raw output parameterises, over the pixels rescaled to [0, 1]
            (``x01 = (x + 1) / 2``): ``bernoulli`` (logits of x01) or ``gaussian`` (the mean of x01).
        num_classes: > 0: a conditional VAE (Sohn et al. 2015), q(z | x, y) and p(x | z, y) for int64 labels ``y`` in
            ``[0, num_classes)``, given to both networks one-hot (their ``cond_dim`` must equal it; see the module
            docstring); every method then needs ``y``. 0: unconditional, the networks are called without it.

    ``channels``/``resolution`` come from the decoder, else the encoder, else ``None``; ``latent_shape`` is
    ``(latent_dim,)``. ``forward(z)`` gives images in [-1, 1] (the likelihood's mean; see the module docstring).
    """

    # what trainer.compile compiles (gantrain.speed): the ELBO calls encode()/decode(), not forward()
    compile_parts = ("encoder", "decoder")

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        likelihood: str = "bernoulli",
        num_classes: int = 0,
    ):
        super().__init__()
        checks.integer("latent_dim", latent_dim, 1)
        checks.choice("likelihood", likelihood, LIKELIHOODS)
        checks.integer("num_classes", num_classes, 0)
        for name, net in (("encoder", encoder), ("decoder", decoder)):
            for attr, key, want in (("latent_dim", "latent_dim", latent_dim), ("cond_dim", "num_classes", num_classes)):
                have = getattr(net, attr, want)  # a network without the attribute is not checked
                if have != want:
                    checks.fail(f"{name}.{attr}", have, f"equal to {key}={want}")
        for attr in ("channels", "resolution"):
            enc, dec = getattr(encoder, attr, None), getattr(decoder, attr, None)
            if enc is not None and dec is not None and enc != dec:
                checks.fail(f"decoder.{attr}", dec, f"equal to encoder.{attr}={enc}")
        self.encoder, self.decoder = encoder, decoder
        self.channels = getattr(decoder, "channels", getattr(encoder, "channels", None))
        self.resolution = getattr(decoder, "resolution", getattr(encoder, "resolution", None))
        self.latent_dim = latent_dim
        self.latent_shape = (latent_dim,)
        self.likelihood = likelihood
        self.num_classes = num_classes

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Labels ``(B,)`` -> the one-hot ``(B, num_classes)`` both networks take; None for an unconditional VAE.
        ValueError when ``y`` is missing for a conditional VAE or given to an unconditional one."""
        if (y is None) != (self.num_classes == 0):
            raise ValueError(
                f"this VAE is conditional on {self.num_classes} classes: give labels y"
                if self.num_classes
                else "this VAE is unconditional (num_classes=0): it takes no labels y"
            )
        return None if y is None else F.one_hot(y.long(), self.num_classes).float()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, R, R)`` images in [-1, 1] (and, conditional, their labels ``y``) -> posterior ``(mu, logvar)``,
        each ``(B, latent_dim)``. ``logvar`` is clamped to [-30, 20] (std in [3e-7, 2.2e4]) so that ``exp`` in the
        reparameterisation and the KL term cannot overflow or underflow; outside that range its gradient is zero."""
        c = self.condition(y)
        h = self.encoder(x) if c is None else self.encoder(x, c)
        if h.dim() != 2 or h.shape[1] != 2 * self.latent_dim:
            raise ValueError(
                f"the encoder must return (B, 2 * latent_dim) = (B, {2 * self.latent_dim}), got {tuple(h.shape)}"
            )
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A sample ``z = mu + exp(0.5 * logvar) * eps``, ``eps ~ N(0, I)``, same shape as ``mu``. ``eps`` from
        ``torch.randn_like`` (the global training RNG); gradients flow to ``mu`` and ``logvar``."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` (and, conditional, labels ``y``) -> the decoder's raw ``(B, C, R, R)``: Bernoulli logits
        or Gaussian means of x01."""
        c = self.condition(y)
        return self.decoder(z) if c is None else self.decoder(z, c)

    def to_images(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw output -> mean of p(x | z) in [-1, 1]: ``2 * sigmoid(logits) - 1``, ``2 * mean.clamp(0, 1) - 1``."""
        if self.likelihood == "bernoulli":
            return 2.0 * torch.sigmoid(raw) - 1.0
        return 2.0 * raw.clamp(0.0, 1.0) - 1.0

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latents ``(B, latent_dim)`` (and, conditional, labels ``y``) -> images ``(B, C, R, R)`` in [-1, 1] (what
        sample grids show)."""
        return self.to_images(self.decode(z, y))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, R, R)`` images in [-1, 1] (and, conditional, labels ``y``) -> reconstructions in [-1, 1] decoded
        from the posterior mean. Deterministic; it neither switches to eval mode nor disables autograd (do both for
        grids)."""
        mu, _ = self.encode(x, y)
        return self.to_images(self.decode(mu, y))
