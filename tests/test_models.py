"""DCGAN shapes, widths and init schemes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gantrain.errors import ConfigError
from gantrain.models import GAN, initialize
from gantrain.models.dcgan import Discriminator, Generator


def _convs(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize("resolution,g_widths", [(32, [256, 128, 64, 3]), (64, [512, 256, 128, 64, 3])])
def test_dcgan_shapes_and_widths(resolution, g_widths):
    g, d = (
        Generator(nz=100, ngf=64, channels=3, resolution=resolution),
        Discriminator(ndf=64, channels=3, resolution=resolution),
    )
    assert [c.out_channels for c in _convs(g)] == g_widths
    assert [c.out_channels for c in _convs(d)] == [w for w in reversed(g_widths[:-1])] + [1]
    z = torch.randn(2, 100, 1, 1)
    x = g(z)
    assert x.shape == (2, 3, resolution, resolution)
    assert x.abs().max() <= 1.0  # Tanh
    assert d(x).shape == (2,)
    assert d.features(x).shape == (2, 4 * 64 if resolution == 32 else 8 * 64, 4, 4)


def test_generator_spatial_path_at_32px():
    g = Generator(nz=100, ngf=64, channels=1, resolution=32)
    sizes, h = [], torch.randn(1, 100, 1, 1)
    for layer in g.net:
        h = layer(h)
        if isinstance(layer, nn.ConvTranspose2d):
            sizes.append(h.shape[-1])
    assert sizes == [4, 8, 16, 32]


@pytest.mark.parametrize(
    "norm,kind", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm), ("instance", nn.InstanceNorm2d)]
)
def test_discriminator_norms(norm, kind):
    d = Discriminator(ndf=8, channels=1, resolution=32, norm=norm)
    assert sum(isinstance(m, kind) for m in d.modules()) == 2  # hidden layers only, not the first
    none = Discriminator(ndf=8, channels=1, resolution=32, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) for m in none.modules())


def test_bad_model_arguments_are_clear():
    with pytest.raises(ConfigError, match=r"model.d.norm='bn'; allowed: batch, layer, instance, none"):
        Discriminator(norm="bn")
    with pytest.raises(ConfigError, match=r"model.resolution=48: DCGAN needs a power of two"):
        Generator(resolution=48)
    with pytest.raises(ConfigError, match=r"model.init: unknown scheme 'he'; allowed: normal_0.02, xavier"):
        initialize(nn.Linear(2, 2), "he")
    with pytest.raises(ConfigError, match=r"model.g is built for 3x64x64 images but model.resolution=32"):
        GAN(Generator(channels=3, resolution=64), Discriminator(channels=3, resolution=32), resolution=32, channels=3)


def test_init_normal_002():
    torch.manual_seed(0)
    g = initialize(Generator(nz=100, ngf=64, channels=3, resolution=32), "normal_0.02")
    w = _convs(g)[1].weight  # 256x128x4x4 = 524k values
    assert w.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert w.std().item() == pytest.approx(0.02, rel=0.01)
    bn = next(m for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.count_nonzero(bn.bias) == 0


def test_init_xavier_kaiming_orthogonal():
    torch.manual_seed(0)
    lin = nn.Linear(400, 300)
    initialize(lin, "xavier")
    assert lin.weight.std().item() == pytest.approx((2 / (400 + 300)) ** 0.5, rel=0.02)
    initialize(lin, "kaiming")
    gain = (2 / (1 + 0.2**2)) ** 0.5
    assert lin.weight.std().item() == pytest.approx(gain / 400**0.5, rel=0.02)
    initialize(lin, "orthogonal")
    w = lin.weight  # (300, 400): rows orthonormal
    assert torch.allclose(w @ w.T, torch.eye(300), atol=1e-4)
    assert torch.count_nonzero(lin.bias) == 0


def test_sample_uses_eval_mode_and_changes_no_state():
    torch.manual_seed(0)
    model = GAN(Generator(nz=8, ngf=4, channels=1, resolution=8), Discriminator(ndf=4, channels=1, resolution=8), 8, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    z = model.noise(5, generator=torch.Generator().manual_seed(3))
    x = model.sample(z)
    assert x.shape == (5, 1, 8, 8) and model.g.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.sample(z), x)


def test_generator_without_norm_has_biases_instead():
    g = Generator(nz=8, ngf=4, channels=1, resolution=16, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert all(c.bias is not None for c in _convs(g))
    batch = Generator(nz=8, ngf=4, channels=1, resolution=16)
    assert [c.bias is not None for c in _convs(batch)] == [False, False, True]  # BN follows all but the last
