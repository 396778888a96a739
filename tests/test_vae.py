"""The VAE family on the shared Trainer: loss values by hand, the KL schedule, the likelihood checks,
the perceptual term's frozen VGG, VAE-GAN's phases, the TensorBoard pictures and scripts/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models import VGG16_Weights

from gantrain.batch import Batch
from gantrain.build import build
from gantrain.errors import ConfigError
from gantrain.hydra_errors import user_error
from gantrain.models.vae import VAE, MLPDecoder, MLPEncoder
from gantrain.stats import Collector, collecting
from gantrain.train import train
from gantrain.vae_objective import BernoulliRecon, GaussianRecon, VAEObjective
from tests.conftest import REPO, make_cfg


def _tiny_vae(likelihood: str = "bernoulli") -> VAE:
    torch.manual_seed(0)
    enc = MLPEncoder(channels=1, resolution=4, hidden=[8], latent_dim=3)
    dec = MLPDecoder(channels=1, resolution=4, hidden=[8], latent_dim=3)
    return VAE(enc, dec, latent_dim=3, likelihood=likelihood).double()


def _x(n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64) > 0.5).double() * 2 - 1  # binary, in {-1, 1}


def _by_hand(vae: VAE, x: torch.Tensor, eps: torch.Tensor, kl_weight: float, gaussian_sigma: float | None = None):
    """-log p(x|z) + kl_weight * KL, written out from the formulas."""
    mu, logvar = vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    out = vae.decode(z).flatten(1)
    x01 = ((x + 1) / 2).flatten(1)
    if gaussian_sigma is None:  # Bernoulli: -sum [x log s(l) + (1 - x) log(1 - s(l))]
        p = torch.sigmoid(out)
        nll = -(x01 * torch.log(p) + (1 - x01) * torch.log(1 - p)).sum(1)
    else:
        s = gaussian_sigma
        nll = (0.5 * ((x01 - out) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(1)
    kl = 0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).sum(1)
    return nll.mean() + kl_weight * kl.mean(), nll.mean(), kl.mean()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_loss_equals_hand_computation_with_kl_warmup(monkeypatch, likelihood):
    vae, x = _tiny_vae(likelihood), _x()
    term = {"bce": BernoulliRecon(1.0)} if likelihood == "bernoulli" else {"gaussian": GaussianRecon(1.0, sigma=0.3)}
    objective = VAEObjective(beta=0.5, kl_warmup_steps=10, **term)
    eps = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: eps)
    sigma = None if likelihood == "bernoulli" else 0.3
    for step, weight in [(0, 0.0), (4, 0.2), (10, 0.5), (25, 0.5)]:  # beta * min(1, step / 10)
        collector = Collector()
        with collecting(collector):
            loss = objective.loss(vae, Batch(x), step)
        want, nll, kl = _by_hand(vae, x, eps, weight, sigma)
        assert loss.item() == pytest.approx(want.item(), rel=1e-10)
        stats = collector.drain()
        assert stats["kl_weight"] == pytest.approx(weight)
        assert stats["loss/kl"] == pytest.approx(kl.item(), rel=1e-6)
        assert stats["elbo"] == pytest.approx(-(nll + kl).item(), rel=1e-6)  # the ELBO ignores beta and warm-up


def test_free_bits_only_lift_dimensions_below_the_floor(monkeypatch):
    vae, x = _tiny_vae(), _x()
    eps = torch.zeros(5, 3, dtype=torch.float64)
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: eps)
    plain = VAEObjective(bce=BernoulliRecon(1.0)).loss(vae, Batch(x))
    floored = VAEObjective(free_bits=10.0, bce=BernoulliRecon(1.0)).loss(vae, Batch(x))
    mu, logvar = vae.encode(x)
    kl_dims = 0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar).mean(0)  # (3,) batch means, all << 10 nats here
    assert (kl_dims < 10).all()
    assert (floored - plain).item() == pytest.approx((3 * 10.0 - kl_dims.sum()).item(), rel=1e-9)


def test_likelihood_and_weight_errors_are_clear(tmp_path):
    cfg = make_cfg("+experiment=vae", "model.g.likelihood=gaussian")
    with pytest.raises(ConfigError, match=r"loss.bce: needs a decoder that outputs bernoulli .*model.g.likelihood"):
        build(cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"every reconstruction term has weight 0"):
        VAEObjective(bce=BernoulliRecon(0.0))
    with pytest.raises(ConfigError, match=r"^beta=-1: must be >= 0$"):  # the loss node's own argument
        VAEObjective(beta=-1, bce=BernoulliRecon(1.0))
    with pytest.raises(ConfigError, match=r"^sigma=0: must be > 0"):
        GaussianRecon(1.0, sigma=0)


def test_perceptual_reconstruction_keeps_vgg_frozen(tmp_path):
    cfg = make_cfg(
        "+experiment=vae", "loss.perceptual.weight=0.5", "loss.perceptual.weights=random", "trainer.max_steps=2"
    )
    trainer = build(cfg, tmp_path)
    objective_vgg = next(
        m for m in trainer.phases[0].loss.func.__self__.modules() if type(m).__name__ == "VGG16Features"
    )
    vgg_params = {id(p) for p in objective_vgg.parameters()}
    optimized = {id(p) for group in trainer.phases[0].optimizer.param_groups for p in group["params"]}
    assert vgg_params and not (vgg_params & optimized)  # in no optimizer
    before = [p.detach().clone() for p in objective_vgg.parameters()]
    metrics = trainer.fit()
    assert not objective_vgg.training and not any(p.requires_grad for p in objective_vgg.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, objective_vgg.parameters()))
    assert metrics["loss/recon/perceptual"] > 0 and math.isfinite(metrics["elbo"])


def test_perceptual_offline_without_weights_names_both_options(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(Exception) as e:
        build(make_cfg("+experiment=vae", "loss.perceptual.weight=1"), tmp_path / "run")
    err = user_error(e.value)  # what the command line prints, unwrapped from Hydra's InstantiationException
    assert isinstance(err, ConfigError)
    msg = str(err)
    assert "loss.perceptual.weights_path=" in msg and "cache" in msg and "URLError" in msg


def test_vae_logs_pictures_and_its_elbo(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train(make_cfg("+experiment=vae", "trainer.max_steps=3", "trainer.sample_every_n_steps=3"), tmp_path)
    assert metrics["elbo"] < 0 and metrics["loss/kl"] >= 0
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0}).Reload()
    assert {"samples", "reconstructions", "interpolation"} <= set(acc.Tags()["images"])
    recon = acc.Images("reconstructions")[-1]
    assert recon.width == 2 + 8 * (32 + 2)  # 4 (input, reconstruction) pairs per row, 32 px, make_grid padding 2
    strip = acc.Images("interpolation")[-1]
    assert strip.width == 2 + 10 * 34 and strip.height == 2 + 4 * 34  # 4 pairs, 10 steps each
    assert (tmp_path / "samples" / "reconstructions_step_0000003.png").is_file()
    assert {"loss/recon", "loss/kl", "elbo"} <= set(acc.Tags()["scalars"])


def test_vaegan_has_the_gan_phases_with_the_vae_as_g(tmp_path):
    """D/G hygiene (each step leaves the other network's weights and grads alone) is the generic test
    tests/test_trainer.py::test_gradient_hygiene_invariants, parametrized with vaegan."""
    trainer = build(make_cfg("+experiment=vaegan", "trainer.max_steps=1"), tmp_path)
    assert [p.name for p in trainer.phases] == ["D", "G"]
    assert trainer.phases[0].module is trainer.model.d and trainer.phases[1].module is trainer.model.g
    assert isinstance(trainer.model.g, VAE)


def test_vaegan_trains_200_steps_on_the_mnist_folder(tmp_path, mnist_dir):
    cfg = make_cfg(
        "+experiment=vaegan",
        "data=folder",
        f"data.path={mnist_dir / 'png' / '3'}",
        "data.channels=1",
        "trainer.max_steps=200",
        "trainer.log_every_n_steps=50",
        "trainer.sample_every_n_steps=200",
    )
    metrics = train(cfg, tmp_path)
    assert metrics["step"] == 200
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert {"loss/recon", "loss/kl", "loss/D", "loss/G"} <= metrics.keys()


def _evaluate_cli():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_reports_heldout_elbo_and_iwae(tmp_path, capsys):
    run = tmp_path / "run"
    train(
        make_cfg(
            "+experiment=vae_mlp",
            "data.holdout=97",
            "data.binarize=dynamic",
            "data.batch_size=50",
            "trainer.max_steps=30",
        ),
        run,
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    cli = _evaluate_cli()
    results = {}
    for k in (1, 20):
        cli.main(["--checkpoint", str(ckpt), "--k", str(k), "--json"])
        results[k] = json.loads(capsys.readouterr().out)
    assert results[1]["images"] == results[20]["images"] == 97
    assert results[1]["nll_iwae"] == pytest.approx(-results[1]["elbo_mc"], rel=1e-9)  # k=1: the IWAE bound is the ELBO
    assert results[20]["nll_iwae"] < -results[20]["elbo_mc"]  # k>1: tighter
    assert 0 < results[20]["nll_iwae"] < 28 * 28 * math.log(2)  # better than p = 1/2 for every pixel

    cli.main(["--checkpoint", str(ckpt), "--k", "5"])
    out = capsys.readouterr().out
    assert out.startswith("97 held-out images: ELBO -") and "IWAE NLL (k=5)" in out


def test_evaluate_script_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "gan"
    train(make_cfg(), run)
    cli = _evaluate_cli()
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(run / "checkpoints" / "last.ckpt")])
    assert "evaluate.py: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(tmp_path / "nope.ckpt")])
    assert "does not exist" in capsys.readouterr().err


def test_vae_model_is_g_without_d(tmp_path):
    model = build(make_cfg("+experiment=vae_mlp"), tmp_path).model
    assert isinstance(model.g, VAE) and model.d is None
    assert isinstance(model.g.encoder, nn.Module) and model.g.latent_shape == (40,)


@pytest.mark.parametrize(
    "data",
    [
        ["data=digits", "data.channels=3"],  # RGB
        ["data=mnist", "data.split=test", "data.download=false", "data.binarize=dynamic"],  # IDX files from ../shared
        ["model.resolution=64"],
    ],
)
def test_vae_trains_on_other_data_options(tmp_path, mnist_dir, data):
    overrides = list(data)
    if "data=mnist" in data:
        overrides.append(f"data.root={mnist_dir}")
    metrics = train(make_cfg("+experiment=vae", *overrides), tmp_path)
    assert metrics["step"] == 2 and math.isfinite(metrics["elbo"])


def test_sample_script_draws_from_a_vae_checkpoint(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    train(make_cfg("+experiment=vae_mlp"), tmp_path / "run")
    out = tmp_path / "grid.png"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "sample.py"),
            "--checkpoint",
            str(tmp_path / "run/checkpoints/last.ckpt"),
        ]
        + ["--num", "9", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (2 + 3 * 30, 2 + 3 * 30)  # 3 x 3 grid of 28 px images, padding 2
