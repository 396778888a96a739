"""Model families (DCGAN, SNGAN ResNet, MLP): shapes, heads, minibatch layers, spectral norm, init schemes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gantrain.errors import ConfigError
from gantrain.models import GenerativeModel, initialize, mlp, resnet
from gantrain.models.dcgan import Discriminator, Generator
from gantrain.models.layers import (
    DiscriminatorHead,
    MinibatchDiscrimination,
    MinibatchStdDev,
    apply_spectral_norm,
    norm_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _convs(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.parametrize("resolution,g_widths", [(32, [256, 128, 64, 3]), (64, [512, 256, 128, 64, 3])])
def test_dcgan_shapes_and_widths(resolution, g_widths):
    g, d = (
        Generator(nz=100, ngf=64, channels=3, resolution=resolution),
        Discriminator(ndf=64, channels=3, resolution=resolution),
    )
    assert [c.out_channels for c in _convs(g)] == g_widths
    assert [c.out_channels for c in _convs(d)] == [w for w in reversed(g_widths[:-1])]
    assert d.head.linear.in_features == g_widths[0] * 4 * 4  # a Linear on the flattened 4x4 map
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
    with pytest.raises(ConfigError, match=r"^norm='bn': must be one of batch, layer, instance, none$"):
        Discriminator(norm="bn")
    with pytest.raises(ConfigError, match=r"^resolution=48: must be a power of two from 8 to 256 \(32 and 64"):
        Generator(resolution=48)
    with pytest.raises(ConfigError, match=r"^resolution=8192: must be a power of two from 8 to 256 \(32 and 64"):
        Discriminator(resolution=8192)  # refused before any layer is built (G's first would be 1024*ngf wide)
    with pytest.raises(ConfigError, match=r"^init='he': must be one of normal_0.02, xavier"):
        initialize(nn.Linear(2, 2), "he")
    with pytest.raises(ConfigError, match=r"^g is built for 3x64x64 images but resolution=32"):
        GenerativeModel(
            Generator(channels=3, resolution=64), Discriminator(channels=3, resolution=32), resolution=32, channels=3
        )


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
    model = GenerativeModel(
        Generator(nz=8, ngf=4, channels=1, resolution=8), Discriminator(ndf=4, channels=1, resolution=8), 8, 1
    )
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


# ----------------------------------------------------------------------------- every family
def _small_ds(**kw) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """One small discriminator per family, with their inputs' shape (batch 6)."""
    return {
        "dcgan": (Discriminator(ndf=8, channels=1, resolution=16, norm="none", **kw), (6, 1, 16, 16)),
        "resnet": (resnet.Discriminator(ndf=8, channels=1, resolution=32, **kw), (6, 1, 32, 32)),
        "mlp": (mlp.Discriminator(in_dim=2, width=16, depth=2, **kw), (6, 2)),
    }


@pytest.mark.parametrize("resolution", [32, 64])
def test_resnet_shapes(resolution):
    g = resnet.Generator(nz=16, ngf=8, channels=3, resolution=resolution)
    d = resnet.Discriminator(ndf=8, channels=3, resolution=resolution)
    assert g.latent_shape == (16,) and (g.channels, g.resolution) == (d.channels, d.resolution) == (3, resolution)
    assert len(g.blocks) == {32: 3, 64: 4}[resolution]
    assert len(d.blocks) == {32: 4, 64: 5}[resolution]  # optimized + (n-2) down + 2 at 8x8
    x = g(torch.randn(2, 16))
    assert x.shape == (2, 3, resolution, resolution) and x.abs().max() <= 1.0
    assert d.blocks(x).shape == (2, 8, 8, 8)
    assert d.features(x).shape == (2, 8)
    assert d(x).shape == (2,)


def test_resnet_block_structure():
    d = resnet.Discriminator(ndf=8, channels=3, resolution=32)
    first, down, same = d.blocks[0], d.blocks[1], d.blocks[2]
    assert first.optimized and first.shortcut.kernel_size == (1, 1)
    assert down.down and down.shortcut is not None
    assert not same.down and same.shortcut is None  # identity shortcut
    # The optimized block's shortcut is avgpool then conv1x1: check against a hand composition.
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(first._skip(x), first.shortcut(nn.functional.avg_pool2d(x, 2)))
    g = resnet.Generator(nz=4, ngf=8, channels=1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 2 * 3 + 1


def test_mlp_shapes():
    g, d = mlp.Generator(nz=3, width=16, depth=2, out_dim=2), mlp.Discriminator(in_dim=2, width=16, depth=3)
    assert g.latent_shape == (3,) and g.dim == d.dim == 2
    assert sum(isinstance(m, nn.Linear) for m in g.modules()) == 3
    assert sum(isinstance(m, nn.Linear) for m in d.body) == 3
    x = g(torch.randn(5, 3))
    assert x.shape == (5, 2)
    assert d.features(x).shape == (5, 16) and d(x).shape == (5,)
    model = GenerativeModel(g, d, init="kaiming", dim=2)
    assert model.resolution is None and model.channels is None
    assert model.noise(7).shape == (7, 3) and model.sample(model.noise(7)).shape == (7, 2)
    with pytest.raises(ConfigError, match=r"^d is built for 2-dimensional samples but dim=3"):
        GenerativeModel(mlp.Generator(out_dim=3), mlp.Discriminator(in_dim=2), dim=3)


@pytest.mark.parametrize("family", ["dcgan", "resnet", "mlp"])
def test_forward_is_head_of_features(family):
    torch.manual_seed(0)
    d, shape = _small_ds(minibatch_std=2, minibatch_kernels=3, minibatch_kernel_dim=4)[family]
    d.eval()
    x = torch.randn(shape)
    h = d.features(x)
    assert isinstance(d.head, DiscriminatorHead)
    assert d.head.mbstd.group_size == 2 and d.head.mbdisc.kernels == 3
    out = d(x)
    assert out.shape == (6,)
    assert torch.allclose(out, d.head(h), atol=1e-6)
    extra = math.prod(h.shape[2:]) if h.dim() == 4 else 1  # the stddev map/feature
    assert d.head.linear.in_features == h[0].numel() + extra + 3


# ----------------------------------------------------------------------------- minibatch layers
def _stat(rows: list[list[float]]) -> float:
    """Hand computation: mean over features of the biased std over the rows."""
    cols = list(zip(*rows))
    stds = []
    for c in cols:
        mu = sum(c) / len(c)
        stds.append(math.sqrt(sum((v - mu) ** 2 for v in c) / len(c) + 1e-8))
    return sum(stds) / len(stds)


def test_minibatch_stddev_by_hand():
    rows = [[0.0, 1.0], [2.0, 3.0], [4.0, 7.0], [4.0, 1.0]]
    x = torch.tensor(rows, dtype=torch.float64)
    out = MinibatchStdDev(2)(x)  # groups {0, 1} and {2, 3}
    assert out.shape == (4, 3) and torch.equal(out[:, :2], x)
    g0, g1 = _stat(rows[:2]), _stat(rows[2:])
    assert g0 == pytest.approx(1.0) and g1 == pytest.approx((1e-4 + 3.0) / 2)
    assert out[:, 2].tolist() == pytest.approx([g0, g0, g1, g1], rel=1e-9)
    whole = MinibatchStdDev(4)(x)[:, 2]  # group = B
    assert _stat(rows) == pytest.approx((math.sqrt(2.75) + math.sqrt(6.0)) / 2, rel=1e-6)
    assert whole.tolist() == pytest.approx([_stat(rows)] * 4, rel=1e-9)
    assert torch.equal(MinibatchStdDev(16)(x), MinibatchStdDev(4)(x))  # group size capped at B
    # B=3 is not divisible by 2: the largest divisor <= 2 is 1, so each sample is its own group.
    assert MinibatchStdDev(2)(x[:3])[:, 2].tolist() == pytest.approx([1e-4] * 3)
    # Image input: one constant extra channel, same statistics over (C, H, W) features.
    img = x.view(4, 1, 1, 2)
    out4 = MinibatchStdDev(2)(img)
    assert out4.shape == (4, 2, 1, 2) and torch.equal(out4[:, :1], img)
    assert out4[:, 1].flatten().tolist() == pytest.approx([g0, g0, g0, g0, g1, g1, g1, g1], rel=1e-9)


def test_minibatch_discrimination_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    e = math.exp
    # Two kernels of one value each, T = I: M_i = x_i, kernel b compares coordinate b.
    layer = MinibatchDiscrimination(2, kernels=2, kernel_dim=1).double()
    with torch.no_grad():
        layer.T.copy_(torch.eye(2))
    out = layer(x)
    assert out.shape == (3, 4) and torch.equal(out[:, :2], x)
    o0 = [e(-1) + 1, e(-1) + e(-1), 1 + e(-1)]  # coordinate 0: 0, 1, 0
    o1 = [1 + e(-2), 1 + e(-2), e(-2) + e(-2)]  # coordinate 1: 0, 0, 2
    assert out[:, 2].tolist() == pytest.approx(o0) and out[:, 3].tolist() == pytest.approx(o1)
    # One kernel of two values: the L1 distance over both coordinates (d01=1, d02=2, d12=3).
    layer = MinibatchDiscrimination(2, kernels=1, kernel_dim=2).double()
    with torch.no_grad():
        layer.T.copy_(torch.eye(2))
    assert layer(x)[:, 2].tolist() == pytest.approx([e(-1) + e(-2), e(-1) + e(-3), e(-2) + e(-3)])
    assert MinibatchDiscrimination(10, 5, 3).T.shape == (10, 15)


def test_discriminator_head_shapes():
    h = torch.randn(4, 8, 4, 4)
    assert DiscriminatorHead((8, 4, 4))(h).shape == (4,)
    head = DiscriminatorHead((8, 4, 4), minibatch_std=4, minibatch_kernels=5, kernel_dim=3)
    assert head.linear.in_features == 9 * 16 + 5 and head.mbdisc.in_features == 9 * 16
    assert head(h).shape == (4,)
    plain = DiscriminatorHead((8,))
    assert plain.mbstd is None and plain.mbdisc is None and plain.linear.in_features == 8


# ----------------------------------------------------------------------------- spectral norm
def _sigmas(d: nn.Module) -> list[float]:
    """Largest singular value of every spectrally normalised weight, read in eval mode (no power step)."""
    was = d.training
    d.eval()
    with torch.no_grad():
        out = [
            torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item()
            for m in d.modules()
            if parametrize.is_parametrized(m, "weight")
        ]
    d.train(was)
    return out


def test_apply_spectral_norm_wraps_conv_and_linear_only():
    d = Discriminator(ndf=8, channels=1, resolution=16, norm="none", minibatch_kernels=3)
    wrapped = apply_spectral_norm(d)
    assert len(wrapped) == 3 and wrapped[-1] is d.head.linear  # two convs + the head's Linear
    assert all(parametrize.is_parametrized(m, "weight") for m in wrapped)
    assert not parametrize.is_parametrized(d.head.mbdisc)  # T stays a plain parameter
    assert apply_spectral_norm(d) == []  # idempotent
    assert (
        len(apply_spectral_norm(resnet.Discriminator(ndf=8, channels=1))) == 4 * 2 + 2 + 1
    )  # 3x3 convs, two 1x1 shortcuts, head


@pytest.mark.parametrize("family", ["dcgan", "resnet", "mlp"])
def test_spectral_norm_keeps_sigma_at_one_while_training(family):
    torch.manual_seed(0)
    d, shape = _small_ds(spectral_norm=True, minibatch_std=2)[family]
    initialize(d, "normal_0.02")  # as GAN does after construction: re-inits the originals
    n_wrapped = {"dcgan": 3, "resnet": 11, "mlp": 3}[family]
    assert len(_sigmas(d)) == n_wrapped
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    d.train()
    for _ in range(30):
        real, fake = torch.randn(shape) + 1.0, torch.randn(shape)
        loss = torch.relu(1 - d(real)).mean() + torch.relu(1 + d(fake)).mean()  # hinge
        opt.zero_grad()
        loss.backward()
        opt.step()
    sigmas = _sigmas(d)
    assert all(abs(s - 1.0) < 0.05 for s in sigmas), sigmas


def test_init_with_spectral_norm_sets_the_original_weight():
    torch.manual_seed(0)
    d = Discriminator(ndf=16, channels=3, resolution=16, norm="none", spectral_norm=True, minibatch_kernels=4)
    t_before = d.head.mbdisc.T.clone()
    initialize(d, "normal_0.02")
    conv = d.body[2]  # 32x16x4x4 = 8k values
    assert conv.parametrizations.weight.original.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0
    assert torch.equal(d.head.mbdisc.T, t_before)  # keeps its own init
    # The power iteration was re-run for the new weights: sigma is ~1 right away, before any step.
    assert all(abs(s - 1.0) < 0.1 for s in _sigmas(d)), _sigmas(d)
    lin = mlp.Discriminator(in_dim=2, width=300, depth=2, spectral_norm=True).body[3]  # Linear(300, 300)
    initialize(lin, "xavier")
    assert lin.parametrizations.weight.original.std().item() == pytest.approx((2 / 600) ** 0.5, rel=0.02)
    initialize(lin, "orthogonal")
    w = lin.parametrizations.weight.original
    assert torch.allclose(w @ w.T, torch.eye(300), atol=1e-4)


def test_gan_initializes_spectral_norm_discriminators():
    torch.manual_seed(0)
    g = resnet.Generator(nz=8, ngf=8, channels=1)
    model = GenerativeModel(g, resnet.Discriminator(ndf=8, channels=1, spectral_norm=True), 32, 1, init="xavier")
    assert all(abs(s - 1.0) < 0.1 for s in _sigmas(model.d))
    assert len(model.state_dict()) == len(GenerativeModel(g, model.d, 32, 1).state_dict())


# ----------------------------------------------------------------------------- dropout and errors
@pytest.mark.parametrize(
    "g,z",
    [
        (Generator(nz=8, ngf=4, channels=1, resolution=8, dropout=0.5), (4, 8, 1, 1)),
        (resnet.Generator(nz=8, ngf=8, channels=1, dropout=0.5), (4, 8)),
        (mlp.Generator(nz=2, width=16, depth=2, dropout=0.5), (4, 2)),
    ],
    ids=["dcgan", "resnet", "mlp"],
)
def test_generator_dropout_train_only(g, z):
    torch.manual_seed(0)
    assert any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in g.modules())
    z = torch.randn(z)
    g.train()
    assert not torch.allclose(g(z), g(z))
    g.eval()
    assert torch.equal(g(z), g(z))


def test_no_dropout_layers_by_default():
    for g in (Generator(resolution=8), resnet.Generator(ngf=8), mlp.Generator(width=8)):
        assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in g.modules())
        g.train()
        z = torch.randn(4, *g.latent_shape)
        assert torch.equal(g(z), g(z))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: resnet.Discriminator(norm="foo"), r"^norm='foo': must be one of batch, layer, instance, none$"),
        (lambda: mlp.Discriminator(norm="instance"), r"^norm='instance': must be one of batch, layer, none$"),
        (lambda: norm_layer("foo", 4), r"^norm='foo': must be one of batch, layer, instance, none$"),
        (lambda: norm_layer("instance", 4, dims=1), r"^norm='instance': must be one of batch, layer, none$"),
        (lambda: mlp.Generator(width=0), r"^width=0: must be an integer >= 1$"),
        (lambda: mlp.Generator(depth=0), r"^depth=0: must be an integer >= 1$"),
        (lambda: mlp.Generator(norm="instance"), r"^norm='instance': must be one of batch, layer, none$"),
        (lambda: mlp.Discriminator(width=0), r"^width=0: must be an integer >= 1$"),
        (lambda: mlp.Discriminator(depth=-1), r"^depth=-1: must be an integer >= 1$"),
        (lambda: mlp.Discriminator(pack=True), r"^pack=True: must be an integer >= 1$"),
        (lambda: Generator(dropout=1.0), r"^dropout=1.0: must be >= 0 and < 1 \(0 turns dropout off\)$"),
        (lambda: Generator(norm="layer"), r"^norm='layer': must be one of batch, none$"),
        (lambda: resnet.Generator(dropout=-0.1), r"^dropout=-0.1: must be >= 0 and < 1"),
        (lambda: mlp.Generator(dropout=1.5), r"^dropout=1.5: must be >= 0 and < 1"),
        (lambda: resnet.Generator(resolution=48), r"^resolution=48: must be one of 32, 64$"),
        (lambda: resnet.Discriminator(resolution=16), r"^resolution=16: must be one of 32, 64$"),
        (lambda: resnet.Discriminator(ndf=0), r"^ndf=0: must be an integer >= 1$"),
        (lambda: Discriminator(minibatch_std=-1), r"^minibatch_std=-1: must be an integer >= 0$"),
        (lambda: mlp.Discriminator(minibatch_kernels=-2), r"^minibatch_kernels=-2: must be an integer >= 0$"),
        (
            lambda: mlp.Discriminator(minibatch_kernels=2, minibatch_kernel_dim=0),
            r"^minibatch_kernel_dim=0: must be an integer >= 1$",
        ),
    ],
)
def test_bad_new_arguments_name_their_key(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_norm_layer_kinds():
    assert isinstance(norm_layer("batch", 4), nn.BatchNorm2d)
    assert isinstance(norm_layer("layer", 4), nn.GroupNorm) and norm_layer("layer", 4).num_groups == 1
    inst = norm_layer("instance", 4)
    assert isinstance(inst, nn.InstanceNorm2d) and inst.affine
    assert isinstance(norm_layer("none", 4), nn.Identity)
    assert isinstance(norm_layer("batch", 4, dims=1), nn.BatchNorm1d)
    assert isinstance(norm_layer("layer", 4, dims=1), nn.LayerNorm)
    d = mlp.Discriminator(width=8, depth=2, norm="layer")
    assert sum(isinstance(m, nn.LayerNorm) for m in d.modules()) == 2
    assert all(m.bias is None for m in d.body if isinstance(m, nn.Linear))  # the norm's shift replaces it
    r = resnet.Discriminator(ndf=8, channels=1, norm="instance")
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in r.modules()) == 1 + 3 * 2  # none before the first conv


@pytest.mark.parametrize(
    "overrides,family",
    [
        (["model=resnet"], resnet),
        (["model=mlp"], mlp),
        (["model=mlp", "model.d.spectral_norm=true", "model.d.minibatch_std=4"], mlp),
        (["model.d.spectral_norm=true", "model.d.minibatch_std=4", "model.d.minibatch_kernels=8"], None),
    ],
)
def test_model_configs_compose_and_instantiate(overrides, family):
    from hydra.utils import instantiate

    from gantrain.train import compose_config

    cfg = compose_config(*overrides, "model.g.dropout=0.1")
    model = instantiate(cfg.model)
    if family is not None:
        assert isinstance(model.g, family.Generator) and isinstance(model.d, family.Discriminator)
    sn = "model.d.spectral_norm=true" in overrides
    assert any(parametrize.is_parametrized(m, "weight") for m in model.d.modules()) == sn
    assert any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in model.g.modules())
    x = model.sample(model.noise(4))
    assert model.d(x).shape == (4,)
    if family is mlp:
        assert model.dim == 2 and model.resolution is None and x.shape == (4, 2)
    else:
        assert x.shape == (4, cfg.model.channels, 32, 32)


def test_mlp_pack_judges_consecutive_samples_together():
    from gantrain.models.mlp import Discriminator as MLPD

    torch.manual_seed(0)
    d = MLPD(in_dim=2, width=8, depth=2, pack=4)
    x = torch.randn(12, 2)
    out = d(x)
    assert out.shape == (3,)
    # The second decision depends on samples 4..7 only.
    y = x.clone()
    y[0] += 1.0
    assert torch.equal(d(y)[1:], out[1:]) and d(y)[0] != out[0]
    torch.testing.assert_close(d.features(x), d.body(x.reshape(3, 8)))
    with pytest.raises(ConfigError, match=r"model.d.pack=4 needs a batch size divisible by it, got 10"):
        d(torch.randn(10, 2))
