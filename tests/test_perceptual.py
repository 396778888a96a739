"""The perceptual term: a frozen VGG16 in eval mode, in no optimizer; weights from cache/download or a local
file, and a clear error offline. Tests use random or locally saved weights (no network)."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision.models import VGG16_Weights

from gantrain.build import build
from gantrain.errors import ConfigError
from gantrain.perceptual import PerceptualMatching, VGG16Features
from gantrain.stats import Collector, collecting
from tests.conftest import make_cfg


def test_features_are_frozen_and_stay_in_eval_mode():
    vgg = VGG16Features("relu2_2", weights="random")
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training and not any(m.training for m in vgg.modules())
    out = vgg(torch.zeros(2, 1, 32, 32))  # grey input is repeated to RGB
    assert out.shape == (2, 128, 16, 16)


def test_weights_path_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    src = VGG16Features("relu1_2", weights="random")
    path = tmp_path / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in src.net.state_dict().items()}, path)  # torchvision's key layout
    loaded = VGG16Features("relu1_2", weights_path=str(path))
    for (k, a), b in zip(src.net.state_dict().items(), loaded.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_weights_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^weights_path='.*nope.pth': must be an existing file"):
        PerceptualMatching(weight=1.0, weights_path=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"^weights_path='.*junk.pth': must be a readable torch state_dict"):
        PerceptualMatching(weight=1.0, weights_path=str(tmp_path / "junk.pth"))


def test_offline_without_weights_names_both_options(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(ConfigError) as e:
        PerceptualMatching(weight=1.0)
    msg = str(e.value)
    assert msg.startswith("weights_path=None: must be the path of a downloaded vgg16-397923af.pth")
    assert "cache" in msg and "online" in msg and "URLError" in msg


def test_weight_zero_loads_nothing(monkeypatch):
    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", lambda *a, **k: 1 / 0)
    assert PerceptualMatching(weight=0.0).vgg is None


def test_perceptual_value_matches_hand_computation():
    torch.manual_seed(0)
    term = PerceptualMatching(weight=0.5, layer="relu1_2", weights="random")
    real, fake = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    f_real, f_fake = term.vgg(real).flatten(1).mean(0), term.vgg(fake).flatten(1).mean(0)
    want = 0.5 * ((f_real - f_fake) ** 2).sum()
    assert term(None, real, fake, None).item() == pytest.approx(want.item(), rel=1e-5)


def test_perceptual_term_in_training_reaches_g_only(tmp_path):
    cfg = make_cfg(
        "+experiment=dcgan",
        "loss.perceptual.weight=1.0",
        "loss.perceptual.weights=random",
        "loss.perceptual.layer=relu2_2",
    )
    trainer = build(cfg, tmp_path)
    vgg = trainer.phases[1].loss.func.__self__.g_terms["perceptual"].vgg
    vgg_params = {id(p) for p in vgg.parameters()}
    for phase in trainer.phases:
        assert not vgg_params & {id(p) for g in phase.optimizer.param_groups for p in g["params"]}
    vgg_before = [p.clone() for p in vgg.parameters()]
    d_before = [p.detach().clone() for p in trainer.model.d.parameters()]
    g_before = [p.detach().clone() for p in trainer.model.g.parameters()]
    with collecting(Collector()) as c:
        trainer.run_phase(trainer.phases[1])  # one G step
    stats = c.drain()
    assert stats["loss/G/perceptual"] > 0
    assert stats["loss/G"] == pytest.approx(stats["loss/G/adv"] + stats["loss/G/perceptual"], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(vgg_before, vgg.parameters()))
    assert all(p.grad is None for p in vgg.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d_before, trainer.model.d.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, trainer.model.g.parameters()))
    assert not vgg.training


def test_bad_arguments_name_only_their_own_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"^layer='relu9_9': must be one of relu1_2, relu2_2, relu3_3, relu4_3$"):
        VGG16Features("relu9_9", weights="random")
    with pytest.raises(ConfigError, match=r"^weights='imagenet1k': must be one of imagenet, random \(random: tests"):
        VGG16Features(weights="imagenet1k")
    with pytest.raises(ConfigError, match=r"^weight=-1: must be >= 0 \(0 = off\)$"):
        PerceptualMatching(weight=-1)
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"^weights_path='.*other.pth': must be VGG16 weights \(missing \["):
        VGG16Features("relu1_2", weights_path=str(tmp_path / "other.pth"))
    # The entry point puts the config path in front, as ConfigError.within does.
    with pytest.raises(ConfigError, match=r"^layer='x': must be one of relu1_2") as e:
        VGG16Features("x")
    full = e.value.within("loss.perceptual")
    assert str(full).startswith("loss.perceptual.layer='x': must be one of relu1_2")
    assert full.key == "loss.perceptual.layer"
