"""Class-conditional networks (issue 23): conditional BatchNorm, the projection discriminator, the ACGAN classifier,
and unconditional networks left exactly as they were."""

from __future__ import annotations

import hashlib

import hydra
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gantrain.errors import ConfigError
from gantrain.models import INIT_SCHEMES, dcgan, initialize, mlp, resnet
from gantrain.models.layers import ConditionalBatchNorm, DiscriminatorHead
from tests.conftest import make_cfg

Y = torch.tensor([0, 1, 2, 3])

# Tiny networks of every family; each builder takes the class conditioning as keyword arguments.
GENERATORS = {
    "dcgan": lambda **kw: dcgan.Generator(nz=4, ngf=4, channels=1, **kw),
    "resnet": lambda **kw: resnet.Generator(nz=4, ngf=4, channels=1, **kw),
    "mlp": lambda **kw: mlp.Generator(nz=2, width=4, depth=2, norm="batch", **kw),
}
DISCRIMINATORS = {
    "dcgan": lambda **kw: dcgan.Discriminator(ndf=4, channels=1, spectral_norm=True, **kw),
    "resnet": lambda **kw: resnet.Discriminator(ndf=4, channels=1, spectral_norm=True, **kw),
    "mlp": lambda **kw: mlp.Discriminator(width=4, depth=2, spectral_norm=True, **kw),
}
# sha256 of the space-joined state_dict keys of these networks, recorded before the conditional change
KEYS_BEFORE = {
    "dcgan.G": (lambda: dcgan.Generator(nz=4, ngf=4, channels=1), "6c0081194db7539e"),
    "dcgan.D": (
        lambda: dcgan.Discriminator(ndf=4, channels=1, spectral_norm=True, minibatch_std=2, minibatch_kernels=2),
        "235c6ba42cae78bb",
    ),
    "resnet.G": (lambda: resnet.Generator(nz=4, ngf=4, channels=1), "d7105ee312f24137"),
    "resnet.D": (lambda: resnet.Discriminator(ndf=4, channels=1, spectral_norm=True), "23e573c620150cf3"),
    "mlp.G": (lambda: mlp.Generator(nz=2, width=4, depth=2, norm="batch"), "366871d5f40ef033"),
    "mlp.D": (lambda: mlp.Discriminator(width=4, depth=2, spectral_norm=True, pack=2), "204de7a1b39fdfde"),
}


def noise(g: nn.Module, n: int = 4) -> torch.Tensor:
    return torch.randn(n, *g.latent_shape)


def images(d: nn.Module, n: int = 4) -> torch.Tensor:
    return torch.randn(n, d.dim) if isinstance(d, mlp.Discriminator) else torch.randn(n, 1, 32, 32)


# ----------------------------------------------------------------------------- conditional BatchNorm
@pytest.mark.parametrize("dims", [1, 2])
def test_one_class_conditional_batchnorm_is_batchnorm(dims):
    torch.manual_seed(0)
    shape = (6, 3, 5, 5) if dims == 2 else (6, 3)
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(3)
    cbn = ConditionalBatchNorm(3, num_classes=1, dims=dims)
    with torch.no_grad():  # the same non-trivial affine in both
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        cbn.gain.weight.copy_(bn.weight[None])
        cbn.bias.weight.copy_(bn.bias[None])
    y = torch.zeros(shape[0], dtype=torch.long)
    weights = torch.randn(shape)
    for _ in range(3):  # train mode: batch statistics, running stats updated alike
        x1 = (torch.randn(shape) * 2 + 1).requires_grad_()
        x2 = x1.detach().clone().requires_grad_()
        out1, out2 = bn(x1), cbn(x2, y)
        torch.testing.assert_close(out2, out1, rtol=0, atol=1e-6)
        (out1 * weights).sum().backward()
        (out2 * weights).sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(cbn.gain.weight.grad[0], bn.weight.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(cbn.bias.weight.grad[0], bn.bias.grad, rtol=0, atol=1e-5)
        bn.zero_grad(), cbn.zero_grad()
    torch.testing.assert_close(cbn.bn.running_mean, bn.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(cbn.bn.running_var, bn.running_var, rtol=0, atol=1e-6)
    assert abs(float(bn.running_mean.mean()) - 1 * (1 - 0.9**3)) < 0.2  # the stats did move
    bn.eval(), cbn.eval()  # eval mode: running statistics
    x1 = torch.randn(shape).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    out1, out2 = bn(x1), cbn(x2, y)
    torch.testing.assert_close(out2, out1, rtol=0, atol=1e-6)
    (out1 * weights).sum().backward()
    (out2 * weights).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)


def test_conditional_batchnorm_uses_each_samples_class():
    cbn = ConditionalBatchNorm(2, num_classes=3)
    with torch.no_grad():
        cbn.gain.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 3.0], [0.0, 0.0]]))
        cbn.bias.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0], [5.0, 6.0]]))
    x = torch.randn(3, 2, 4, 4)
    out = cbn(x, torch.tensor([0, 1, 2]))
    normed = nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(out[0], normed[0])
    torch.testing.assert_close(
        out[1], normed[1] * torch.tensor([2.0, 3.0])[:, None, None] + torch.tensor([1.0, -1.0])[:, None, None]
    )
    torch.testing.assert_close(out[2], torch.tensor([5.0, 6.0])[:, None, None].expand(2, 4, 4))


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
@pytest.mark.parametrize("family", ["dcgan", "resnet"])
def test_initialize_leaves_conditional_gains_at_one_and_biases_at_zero(scheme, family):
    g = initialize(GENERATORS[family](num_classes=5), scheme)
    cbns = [m for m in g.modules() if isinstance(m, ConditionalBatchNorm)]
    assert len(cbns) == {"dcgan": 3, "resnet": 7}[family]  # every BatchNorm is conditional
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine for m in g.modules())
    for m in cbns:
        assert m.gain.weight.shape == m.bias.weight.shape == (5, m.bn.num_features)
        assert torch.equal(m.gain.weight, torch.ones_like(m.gain.weight))
        assert torch.equal(m.bias.weight, torch.zeros_like(m.bias.weight))


# ----------------------------------------------------------------------------- projection and classifier
@pytest.mark.parametrize("in_shape", [(3,), (2, 2, 2)])
def test_projection_adds_the_inner_product_of_the_class_embedding_and_the_features(in_shape):
    torch.manual_seed(0)
    head = DiscriminatorHead(in_shape, minibatch_std=2, minibatch_kernels=2, num_classes=2)
    n = 3 if len(in_shape) == 1 else 8
    with torch.no_grad():
        head.embed.weight.copy_(torch.arange(2 * n, dtype=torch.float32).view(2, n) / 10)
    h = torch.randn(4, *in_shape)
    y = torch.tensor([1, 0, 1, 1])
    plain = DiscriminatorHead(in_shape, minibatch_std=2, minibatch_kernels=2)
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("embed")})
    by_hand = plain(h) + (head.embed.weight[y] * h.flatten(1)).sum(1)
    torch.testing.assert_close(head(h, y), by_hand)
    if in_shape == (3,):  # one number written out: sample 1 (class 0: embedding 0, .1, .2)
        want = plain(h)[1] + 0.1 * h[1, 1] + 0.2 * h[1, 2]
        torch.testing.assert_close(head(h, y)[1], want)


@pytest.mark.parametrize("family", DISCRIMINATORS)
def test_discriminator_exposes_features_head_classify(family):
    torch.manual_seed(0)
    d = DISCRIMINATORS[family](num_classes=5, aux_classifier=True)
    assert d.num_classes == 5
    d.eval()  # in train mode every call runs a power iteration (spectral norm) and updates BatchNorm's statistics
    x = images(d)
    h = d.features(x)
    torch.testing.assert_close(d(x, Y), d.head(h, Y))
    assert d.classify(h).shape == (4, 5)
    out = d(x, Y)
    assert out.shape == (4,)
    assert not torch.allclose(out, d(x, torch.tensor([4, 4, 4, 4])))  # the output depends on y
    # spectral norm wraps the projection embedding and the classifier; none of the unconditional D's modules is new
    assert isinstance(d.head.embed, nn.Embedding) and parametrize.is_parametrized(d.head.embed, "weight")
    assert parametrize.is_parametrized(d.head.classifier, "weight")
    assert d.head.classifier.in_features == h.flatten(1).shape[1]
    with pytest.raises(ValueError, match="conditional on 5 classes: call it with labels y"):
        d(x)
    plain = DISCRIMINATORS[family]()
    assert plain.num_classes == 0 and not hasattr(plain.head, "embed")
    with pytest.raises(ValueError, match="no auxiliary classifier: build it with aux_classifier=true"):
        plain.classify(plain.features(x))
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, Y)


def test_acgan_only_discriminator_ignores_labels_and_classifies():
    torch.manual_seed(0)
    d = dcgan.Discriminator(ndf=4, channels=1, num_classes=3, projection=False, aux_classifier=True)
    x = images(d)
    torch.testing.assert_close(d(x), d(x, Y % 3))
    assert not hasattr(d.head, "embed") and d.classify(d.features(x)).shape == (4, 3)


def test_discriminator_configuration_errors():
    with pytest.raises(ConfigError, match=r"^pack=2: a class-conditional discriminator .*use pack=1$"):
        mlp.Discriminator(pack=2, num_classes=3)
    with pytest.raises(ConfigError, match="aux_classifier=true needs class labels"):
        resnet.Discriminator(ndf=4, aux_classifier=True)


def test_a_batchnorm_free_conditional_dcgan_generator_concatenates_a_label_embedding_to_the_noise():
    torch.manual_seed(0)
    g = dcgan.Generator(nz=6, ngf=4, channels=1, resolution=8, norm="none", num_classes=3)
    assert g.embed.weight.shape == (3, 3) and g.net[0].in_channels == 6 + 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in g.modules())
    z, y = torch.randn(4, 6, 1, 1), torch.tensor([0, 1, 2, 1])
    by_hand = g.net(torch.cat([z, g.embed.weight[y][:, :, None, None]], dim=1))
    torch.testing.assert_close(g(z, y), by_hand)
    assert not torch.allclose(g(z, y), g(z, (y + 1) % 3))
    # per sample: a sample's image does not depend on the rest of its batch (micro-batches equal one batch)
    torch.testing.assert_close(g(z[:2], y[:2]), g(z, y)[:2])


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("family", GENERATORS)
def test_conditional_generator_output_depends_on_the_labels(family):
    torch.manual_seed(0)
    g = GENERATORS[family](num_classes=5)
    assert g.num_classes == 5
    if family != "mlp":  # fresh CBN gains/biases are 1/0 for every class: set distinct ones
        with torch.no_grad():
            for m in g.modules():
                if isinstance(m, ConditionalBatchNorm):
                    m.gain.weight.uniform_(0.5, 1.5), m.bias.weight.normal_()
    else:
        assert g.embed.weight.shape == (5, 5)  # label_dim: min(num_classes, 16)
    z = noise(g).repeat(2, *([1] * len(g.latent_shape)))  # the same z twice
    y = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4])
    out = g(z, y)
    assert out.shape[0] == 8
    for i in range(4):  # same z, different labels: different samples
        assert (out[i] - out[4 + i]).abs().max() > 1e-3
    g.eval()
    out = g(z[:4], torch.tensor([1, 1, 2, 2]))
    assert (out[0] - out[2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="conditional on 5 classes"):
        g(z)
    with pytest.raises(ValueError, match="unconditional"):
        GENERATORS[family]()(z, y)


def test_mlp_label_dim():
    assert mlp.Generator(nz=2, num_classes=40).embed.weight.shape == (40, 16)
    g = mlp.Generator(nz=2, width=8, num_classes=40, label_dim=3)
    assert g.embed.weight.shape == (40, 3) and g.net[0].in_features == 5


# ----------------------------------------------------------------------------- unconditional networks unchanged
@pytest.mark.parametrize("name", KEYS_BEFORE)
def test_unconditional_networks_have_the_state_dict_keys_of_before(name):
    build, want = KEYS_BEFORE[name]
    net = build()
    assert net.num_classes == 0
    got = hashlib.sha256(" ".join(net.state_dict().keys()).encode()).hexdigest()[:16]
    assert got == want
    assert not any(isinstance(m, (nn.Embedding, ConditionalBatchNorm)) for m in net.modules())


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("recipe", [[], ["+experiment=hinge_sngan"], ["+experiment=toy_gan"]])
def test_conditional_model_configs_build_conditional_networks(recipe):
    cfg = make_cfg(*recipe, "model.conditional=true", "model.num_classes=10")
    model = hydra.utils.instantiate(cfg.model)
    assert model.num_classes == model.g.num_classes == model.d.num_classes == 10
    latents = model.prior(4)
    assert model.d(model.generate(latents), latents.y).shape == (4,)
    plain = hydra.utils.instantiate(make_cfg(*recipe).model)
    assert plain.num_classes == plain.g.num_classes == plain.d.num_classes == 0


@pytest.mark.parametrize("family", ["dcgan", "resnet"])
def test_a_generator_can_take_the_label_with_the_noise_as_well_as_or_instead_of_through_its_norms(family):
    from gantrain.models.layers import ConditionalBatchNorm

    make = {"dcgan": lambda **kw: dcgan.Generator(nz=6, ngf=4, channels=1, resolution=8, **kw),
            "resnet": lambda **kw: resnet.Generator(nz=6, ngf=4, channels=1, **kw)}[family]  # fmt: skip
    torch.manual_seed(0)
    both = make(num_classes=3, label_dim=5)  # conditional BatchNorms and a 5-value embedding beside z
    instead = make(num_classes=3, conditional_norm=False)  # plain BatchNorms, the embedding alone (3 values)
    assert any(isinstance(m, ConditionalBatchNorm) for m in both.modules()) and both.embed.weight.shape == (3, 5)
    assert not any(isinstance(m, ConditionalBatchNorm) for m in instead.modules())
    assert instead.embed.weight.shape == (3, 3)
    first = instead.net[0] if family == "dcgan" else instead.linear
    assert (first.in_channels if family == "dcgan" else first.in_features) == 6 + 3
    z, y = torch.randn(4, *instead.latent_shape), torch.tensor([0, 1, 2, 0])
    assert not torch.allclose(instead(z, y), instead(z, (y + 1) % 3))
    if family == "resnet":  # by hand: the embedding joins the flattened noise before the first Linear
        h = instead.linear(torch.cat([z, instead.embed.weight[y]], dim=1)).view(-1, 4, 4, 4)
        for block in instead.blocks:
            h = block(h)
        torch.testing.assert_close(instead(z, y), instead.out(h))
    with pytest.raises(ConfigError, match="label_dim=0: must be an integer >= 1"):
        make(num_classes=3, conditional_norm=False, label_dim=0)  # a generator that could not see its labels
    assert make().embed is None and make(num_classes=3).embed is None  # the defaults: as before
