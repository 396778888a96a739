"""VAE networks: encoder/decoder shapes and sizes, reparameterisation statistics and gradients, output maps,
config errors, and the VAE standing in as the generator of a :class:`~gantrain.models.GenerativeModel`."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from gantrain.errors import ConfigError
from gantrain.models import GenerativeModel
from gantrain.models.dcgan import Discriminator
from gantrain.models.vae import VAE, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _mlp_vae(likelihood: str = "bernoulli", latent_dim: int = 4) -> VAE:
    enc = MLPEncoder(channels=1, resolution=8, hidden=[16], latent_dim=latent_dim)
    dec = MLPDecoder(channels=1, resolution=8, hidden=[16], latent_dim=latent_dim)
    return VAE(enc, dec, latent_dim=latent_dim, likelihood=likelihood)


class _Const(nn.Module):
    """A stand-in network returning a fixed tensor, broadcast over the batch."""

    def __init__(self, out: torch.Tensor, latent_dim: int | None = None):
        super().__init__()
        self.out = out
        if latent_dim is not None:
            self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(x.shape[0], *self.out.shape[1:]).clone()


# ----------------------------------------------------------------------------- shapes and sizes
@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "instance"])
def test_conv_encoder_shapes(resolution, channels, norm):
    enc = ConvEncoder(channels=channels, resolution=resolution, ndf=4, latent_dim=6, norm=norm)
    assert (enc.channels, enc.resolution, enc.latent_dim) == (channels, resolution, 6)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == ([4, 8, 16] if resolution == 32 else [4, 8, 16, 32])
    assert [c.stride for c in convs] == [(2, 2)] * len(convs)
    linear = enc.net[-1]
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (
        convs[-1].out_channels * 16,
        12,
    )
    assert enc(torch.randn(3, channels, resolution, resolution)).shape == (3, 12)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("norm", ["none", "batch"])
def test_conv_decoder_shapes(resolution, channels, norm):
    dec = ConvDecoder(channels=channels, resolution=resolution, ngf=4, latent_dim=6, norm=norm)
    assert (dec.channels, dec.resolution, dec.latent_dim) == (channels, resolution, 6)
    first = dec.net[0]
    widths = [16, 8, 4] if resolution == 32 else [32, 16, 8, 4]
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (6, widths[0] * 16)
    convs = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == widths[1:] + [channels]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dec.modules()) == (len(widths) if norm == "batch" else 0)
    x = dec(torch.randn(3, 6))
    assert x.shape == (3, channels, resolution, resolution)
    assert isinstance(dec.net[-1], nn.ConvTranspose2d)  # raw output: no activation layer at the end


def test_conv_decoder_spatial_path_at_32px():
    dec = ConvDecoder(channels=1, resolution=32, ngf=4, latent_dim=3)
    sizes, h = [], torch.randn(1, 3)
    for layer in dec.net:
        h = layer(h)
        if isinstance(layer, (nn.Unflatten, nn.ConvTranspose2d)):
            sizes.append(tuple(h.shape[1:]))
    assert sizes == [(16, 4, 4), (8, 8, 8), (4, 16, 16), (1, 32, 32)]


def test_conv_encoder_bias_only_without_norm():
    with_norm = ConvEncoder(ndf=4, latent_dim=2, norm="batch")
    convs = [m for m in with_norm.modules() if isinstance(m, nn.Conv2d)]
    assert [c.bias is not None for c in convs] == [True, False, False]  # the first conv has no norm
    plain = ConvEncoder(ndf=4, latent_dim=2)
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) for m in plain.modules())


@pytest.mark.parametrize("hidden", [[400], [512, 256]])
def test_mlp_shapes(hidden):
    enc = MLPEncoder(channels=1, resolution=28, hidden=hidden, latent_dim=40)
    dec = MLPDecoder(channels=1, resolution=28, hidden=hidden, latent_dim=40)
    assert enc.hidden == hidden and dec.hidden == hidden
    assert [m.out_features for m in enc.modules() if isinstance(m, nn.Linear)] == [*hidden, 80]
    assert [m.out_features for m in dec.modules() if isinstance(m, nn.Linear)] == [*hidden, 784]
    assert enc(torch.rand(2, 1, 28, 28) * 2 - 1).shape == (2, 80)
    assert dec(torch.randn(2, 40)).shape == (2, 1, 28, 28)


def test_mlp_param_counts_784_400_40():
    enc = MLPEncoder(channels=1, resolution=28, hidden=[400], latent_dim=40)
    dec = MLPDecoder(channels=1, resolution=28, hidden=[400], latent_dim=40)
    assert _n_params(enc) == 784 * 400 + 400 + 400 * 80 + 80 == 346_080
    assert _n_params(dec) == 40 * 400 + 400 + 400 * 784 + 784 == 330_784


def test_mlp_rgb_and_other_resolutions():
    enc = MLPEncoder(channels=3, resolution=5, hidden=(7,), latent_dim=2, activation="elu")
    dec = MLPDecoder(channels=3, resolution=5, hidden=(7,), latent_dim=2, activation="softplus")
    assert enc.net[1].in_features == 75
    assert dec(torch.randn(4, 2)).shape == (4, 3, 5, 5)
    assert enc(torch.randn(4, 3, 5, 5)).shape == (4, 4)


@pytest.mark.parametrize("name,cls", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("softplus", nn.Softplus), ("elu", nn.ELU)])
def test_mlp_activations(name, cls):
    enc = MLPEncoder(resolution=4, hidden=[3, 3], latent_dim=1, activation=name)
    dec = MLPDecoder(resolution=4, hidden=[3, 3], latent_dim=1, activation=name)
    assert sum(isinstance(m, cls) for m in enc.modules()) == 2
    assert sum(isinstance(m, cls) for m in dec.modules()) == 2


def test_mlp_hidden_from_listconfig():
    hidden = OmegaConf.create({"h": [12, 6]}).h
    enc = MLPEncoder(resolution=4, hidden=hidden, latent_dim=2)
    assert enc.hidden == [12, 6] and type(enc.hidden) is list
    assert [m.out_features for m in enc.modules() if isinstance(m, nn.Linear)] == [12, 6, 4]


# ----------------------------------------------------------------------------- reparameterisation
def test_reparameterize_moments():
    torch.manual_seed(0)
    n = 200_000
    mu = torch.full((n, 1), 3.0)
    logvar = torch.full((n, 1), math.log(4.0))
    z = VAE.reparameterize(mu, logvar)
    assert z.shape == (n, 1)
    assert abs(z.mean().item() - 3.0) < 0.02
    assert abs(z.std().item() - 2.0) < 0.02


def test_reparameterize_is_seeded():
    vae = _mlp_vae()
    mu, logvar = torch.zeros(5, 4), torch.zeros(5, 4)
    torch.manual_seed(7)
    a = vae.reparameterize(mu, logvar)
    torch.manual_seed(7)
    b = vae.reparameterize(mu, logvar)
    assert torch.equal(a, b)
    assert not torch.equal(a, vae.reparameterize(mu, logvar))  # the RNG moved on


def test_reparameterize_gradients(monkeypatch):
    eps = torch.tensor([[0.5, -1.0, 2.0]])
    monkeypatch.setattr(torch, "randn_like", lambda t: eps.clone())
    mu = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0), -2.0]], requires_grad=True)
    z = VAE.reparameterize(mu, logvar)
    std = torch.exp(0.5 * logvar.detach())
    assert torch.allclose(z, mu.detach() + std * eps)
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, 0.5 * std * eps)
    assert torch.allclose(logvar.grad, torch.tensor([[0.25, -1.0, math.exp(-1.0)]]))


def test_reparameterize_gradient_from_recovered_eps():
    torch.manual_seed(1)
    mu = torch.randn(4, 3, requires_grad=True)
    logvar = torch.randn(4, 3, requires_grad=True)
    z = VAE.reparameterize(mu, logvar)
    std = torch.exp(0.5 * logvar.detach())
    eps = (z.detach() - mu.detach()) / std
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones_like(mu))
    assert torch.allclose(logvar.grad, 0.5 * std * eps, atol=1e-6)


# ----------------------------------------------------------------------------- output maps
def test_bernoulli_to_images():
    vae = _mlp_vae("bernoulli")
    out = vae.to_images(torch.tensor([0.0, 50.0, -50.0, math.log(3.0)]))
    assert torch.allclose(out, torch.tensor([0.0, 1.0, -1.0, 0.5]), atol=1e-6)  # sigmoid(log 3) = 0.75


def test_gaussian_to_images():
    vae = _mlp_vae("gaussian")
    out = vae.to_images(torch.tensor([0.25, 0.0, 1.0, -0.3, 1.7, 0.5]))
    assert torch.allclose(out, torch.tensor([-0.5, -1.0, 1.0, -1.0, 1.0, 0.0]))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_forward_is_decode_then_to_images(likelihood):
    torch.manual_seed(0)
    vae = _mlp_vae(likelihood)
    z = torch.randn(6, 4) * 5
    x = vae(z)
    assert x.shape == (6, 1, 8, 8)
    assert torch.equal(x, vae.to_images(vae.decode(z)))
    assert x.min() >= -1.0 and x.max() <= 1.0


# ----------------------------------------------------------------------------- encode / reconstruct
def test_encode_splits_and_clamps_logvar():
    h = torch.tensor([[1.0, -2.0, -100.0, 100.0], [0.5, 0.0, 3.0, -4.0]])
    vae = VAE(_Const(h, latent_dim=2), _Const(torch.zeros(1, 1, 4, 4)), latent_dim=2)
    mu, logvar = vae.encode(torch.zeros(2, 1, 4, 4))
    assert torch.equal(mu, torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    assert torch.equal(logvar, torch.tensor([[-30.0, 20.0], [3.0, -4.0]]))


def test_encode_checks_encoder_width():
    vae = VAE(_Const(torch.zeros(1, 5)), _Const(torch.zeros(1, 1, 4, 4)), latent_dim=2)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        vae.encode(torch.zeros(1, 1, 4, 4))


def test_reconstruct_uses_posterior_mean():
    torch.manual_seed(0)
    vae = _mlp_vae()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    a, b = vae.reconstruct(x), vae.reconstruct(x)
    assert torch.equal(a, b)
    mu, _ = vae.encode(x)
    assert torch.equal(a, vae(mu))
    assert a.shape == x.shape and a.abs().max() <= 1.0


def test_conv_vae_end_to_end_grad():
    torch.manual_seed(0)
    enc = ConvEncoder(channels=3, resolution=32, ndf=4, latent_dim=5)
    dec = ConvDecoder(channels=3, resolution=32, ngf=4, latent_dim=5)
    vae = VAE(enc, dec, latent_dim=5, likelihood="gaussian")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mu, logvar = vae.encode(x)
    raw = vae.decode(vae.reparameterize(mu, logvar))
    assert raw.shape == (2, 3, 32, 32)
    ((raw - (x + 1) / 2) ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())


# ----------------------------------------------------------------------------- config errors
def test_attributes():
    vae = _mlp_vae("gaussian", latent_dim=4)
    assert (vae.channels, vae.resolution, vae.latent_dim, vae.latent_shape) == (1, 8, 4, (4,))
    assert vae.likelihood == "gaussian"


def test_bad_likelihood():
    with pytest.raises(ConfigError, match=r"^likelihood='poisson': must be one of bernoulli, gaussian$"):
        _mlp_vae("poisson")


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_latent_mismatch(which):
    enc = MLPEncoder(resolution=4, hidden=[3], latent_dim=4 if which == "encoder" else 3)
    dec = MLPDecoder(resolution=4, hidden=[3], latent_dim=4 if which == "decoder" else 3)
    with pytest.raises(ConfigError, match=rf"^{which}\.latent_dim=4: must be equal to latent_dim=3$"):
        VAE(enc, dec, latent_dim=3)


def test_image_shape_mismatch():
    enc = MLPEncoder(channels=1, resolution=8, hidden=[3], latent_dim=2)
    with pytest.raises(ConfigError, match=r"^decoder\.resolution=6: must be equal to encoder\.resolution=8$"):
        VAE(enc, MLPDecoder(channels=1, resolution=6, hidden=[3], latent_dim=2), latent_dim=2)
    with pytest.raises(ConfigError, match=r"^decoder\.channels=3: must be equal to encoder\.channels=1$"):
        VAE(enc, MLPDecoder(channels=3, resolution=8, hidden=[3], latent_dim=2), latent_dim=2)


@pytest.mark.parametrize("cls", [ConvEncoder, ConvDecoder])
@pytest.mark.parametrize("resolution", [48, 16, 128])
def test_conv_resolution(cls, resolution):
    with pytest.raises(ConfigError, match=rf"^resolution={resolution}: must be one of 32, 64$"):
        cls(resolution=resolution)


def test_conv_bad_widths_and_norms():
    with pytest.raises(ConfigError, match=r"^ndf=0: must be an integer >= 1$"):
        ConvEncoder(ndf=0)
    with pytest.raises(ConfigError, match=r"^ngf=0: must be an integer >= 1$"):
        ConvDecoder(ngf=0)
    with pytest.raises(ConfigError, match=r"^norm='layer': must be one of batch, none$"):
        ConvDecoder(norm="layer")
    with pytest.raises(ConfigError, match=r"^norm='group': must be one of batch, layer, instance, none$"):
        ConvEncoder(norm="group")
    with pytest.raises(ConfigError, match=r"^latent_dim=0: must be an integer >= 1$"):
        ConvEncoder(latent_dim=0)
    with pytest.raises(ConfigError, match=r"^channels=0: must be an integer >= 1$"):
        ConvDecoder(channels=0)


@pytest.mark.parametrize("cls", [MLPEncoder, MLPDecoder])
def test_mlp_config_errors(cls):
    with pytest.raises(ConfigError, match=r"^activation='gelu': must be one of relu, tanh, softplus, elu$"):
        cls(activation="gelu")
    with pytest.raises(ConfigError, match=r"^hidden=\[\]: must be a non-empty list of layer widths \(e\.g\. \[400\]"):
        cls(hidden=[])
    with pytest.raises(ConfigError, match=r"^hidden\[1\]=0: must be an integer >= 1$"):
        cls(hidden=[8, 0])
    with pytest.raises(ConfigError, match=r"^hidden=400: must be a non-empty list of layer widths"):
        cls(hidden=400)
    with pytest.raises(ConfigError, match=r"^resolution=3: must be an integer >= 4 and <= 128$"):
        cls(resolution=3)
    with pytest.raises(ConfigError, match=r"^resolution=8192: must be an integer >= 4 and <= 128$"):
        cls(resolution=8192)


# ----------------------------------------------------------------------------- as the generator of a GAN
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_as_gan_generator(likelihood):
    torch.manual_seed(0)
    enc = ConvEncoder(channels=3, resolution=32, ndf=4, latent_dim=6, norm="batch")
    dec = ConvDecoder(channels=3, resolution=32, ngf=4, latent_dim=6, norm="batch")
    vae = VAE(enc, dec, latent_dim=6, likelihood=likelihood)
    gan = GenerativeModel(g=vae, d=Discriminator(ndf=4, channels=3, resolution=32), resolution=32, channels=3)
    z = gan.noise(5, "cpu")
    assert z.shape == (5, 6)
    assert gan.g.training
    x = gan.sample(z)
    assert x.shape == (5, 3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert gan.g.training  # sample() restores the mode
    assert gan.d(x).shape == (5,)
    # GAN's init (normal_0.02 by default) re-initialised the VAE's linear layers, biases to 0
    assert torch.count_nonzero(gan.g.encoder.net[-1].bias.detach()) == 0


def test_gan_rejects_vae_built_for_another_image_shape():
    vae = _mlp_vae()  # 1 x 8 x 8
    with pytest.raises(ConfigError, match=r"^g is built for 1x8x8"):
        GenerativeModel(g=vae, d=Discriminator(ndf=4, channels=1, resolution=32), resolution=32, channels=1)
