"""trainer.compile, trainer.channels_last, trainer.matmul_precision (gantrain.speed): each switch trains the same
weights as the eager, contiguous, highest-precision run, compile keeps a double-backward network eager and says
so once, and the gradient penalty's gradients under compile are non-zero and equal the eager ones.

How close "the same" is: 5 steps move the weights by Adam updates of about lr each; the switches only change
float32 rounding (other kernels, fused ops, another memory layout), so the distance between the two runs'
weights must be a small fraction of the distance the eager run moved (``SAME``, over all weights and buffers).
A per-element bound would not hold: a parameter whose true gradient is zero (a conv bias right before BatchNorm)
gets a rounding-noise gradient, and Adam scales any gradient, noise too, to a step of about lr, so such a bias
walks by ~lr per step in a direction set by the rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from gantrain import speed
from gantrain.build import build
from gantrain.errors import ConfigError
from gantrain.losses import BCELoss, GradientPenalty, R1Penalty, WassersteinLoss
from gantrain.models import dcgan
from gantrain.objectives import GANObjective
from gantrain.train import train
from gantrain.trainer import TrainerSettings
from gantrain.vae_objective import VAEObjective
from tests.conftest import make_cfg

RECIPES = ("dcgan", "hinge_sngan", "vae", "wgan_gp")
STEPS = 5
# ||w_switch - w_eager|| / ||w_eager - w_init|| over every float tensor of the model (float32). Measured on a CPU
# (torch 2.14): dcgan <= 7e-8, vae <= 6e-6, wgan_gp <= 1.2e-4, hinge_sngan <= 7.8e-4 (its conv biases before BatchNorm)
SAME = 5e-3
QUIET = [
    "seed=0",
    f"trainer.max_steps={STEPS}",
    "trainer.checkpoint_every_n_steps=1000",
    "trainer.sample_every_n_steps=1000",
    "trainer.log_every_n_steps=1000",
]


def weights(run_dir, experiment: str, *overrides: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_cfg(f"+experiment={experiment}", *QUIET, *overrides), run_dir)
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision("highest")  # a process-wide setting: the next test starts from default
    model = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["model"]
    return {k: v.float() for k, v in model.items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """Each recipe's initial and 5-step eager weights, trained once for every switch."""
    cache: dict[str, tuple[dict, dict]] = {}

    def get(experiment: str):
        if experiment not in cache:
            run = tmp_path_factory.mktemp(experiment)
            init = build(make_cfg(f"+experiment={experiment}", *QUIET), run / "init").model.state_dict()
            cache[experiment] = (
                {k: v.float() for k, v in init.items() if v.is_floating_point()},
                weights(run / "eager", experiment),
            )
        return cache[experiment]

    return get


def distance(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()  # compiled in place: the same state_dict keys
    return torch.cat([(a[k] - b[k]).flatten() for k in a]).norm().item()


def assert_same_training(eager, tmp_path, experiment: str, switch: str) -> float:
    init, want = eager(experiment)
    got = weights(tmp_path / "on", experiment, switch)
    moved, apart = distance(want, init), distance(got, want)
    assert moved > 0
    assert apart <= SAME * moved, f"{experiment} {switch}: weights {apart:.3g} apart, eager moved {moved:.3g}"
    return apart / moved


@pytest.mark.parametrize("experiment", RECIPES)
@pytest.mark.parametrize("switch", ["trainer.channels_last=true", "trainer.matmul_precision=medium"])
def test_a_switch_trains_the_eager_weights(eager, tmp_path, experiment, switch):
    assert_same_training(eager, tmp_path, experiment, switch)


@pytest.mark.slow  # compiling G and D forward and backward: about a minute a recipe on 2 busy cores
@pytest.mark.parametrize("experiment", RECIPES)
def test_compile_trains_the_eager_weights(eager, tmp_path, experiment):
    from torch._dynamo.utils import counters

    eager(experiment)
    torch._dynamo.reset()  # no graph or recompile count left from another test
    counters.clear()
    assert_same_training(eager, tmp_path, experiment, "trainer.compile=true")
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["recompile_limit"]  # compiled, no eager fallback


def test_the_switches_are_off_by_default_and_checked():
    settings = TrainerSettings()
    assert (settings.compile, settings.channels_last, settings.matmul_precision) == (False, False, "highest")
    assert speed.compile_mode(True) == "default" and speed.compile_mode("max-autotune") == "max-autotune"
    for key, value, allowed in [
        ("compile", "fast", "one of false, true, default, reduce-overhead, max-autotune"),
        ("compile", 1, "one of false, true"),  # 1 == True in Python: not a mode
        ("channels_last", "yes", "true or false"),
        ("matmul_precision", "low", "one of highest, high, medium"),
    ]:
        with pytest.raises(ConfigError, match=f"^{key}=.*: must be {allowed}"):
            TrainerSettings(**{key: value})


def test_the_objectives_declare_their_double_backward_networks():
    assert GANObjective(WassersteinLoss()).double_backward_networks() == {}
    assert GANObjective(WassersteinLoss(), gp=GradientPenalty(0.0)).double_backward_networks() == {}  # off
    both = GANObjective(WassersteinLoss(), gp=GradientPenalty(10.0), r1=R1Penalty(1.0))
    assert both.double_backward_networks() == {"d": ("gp", "r1")}
    vaegan = make_cfg("+experiment=vaegan", "loss.r1.gamma=10")
    from hydra.utils import instantiate

    assert instantiate(vaegan.loss).double_backward_networks() == {"d": ("r1",)}
    assert VAEObjective(bce=instantiate(make_cfg("+experiment=vae").loss.bce)).double_backward_networks() == {}


def compiled(net: nn.Module) -> bool:
    return getattr(net, "_compiled_call_impl", None) is not None  # what nn.Module.compile sets


def test_compile_keeps_a_gradient_penalty_critic_eager_and_says_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gantrain")
    trainer = build(make_cfg("+experiment=wgan_gp", "trainer.compile=reduce-overhead"), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer.compile")]
    assert lines == [
        "trainer.compile: d stays eager: loss.gp takes a double backward through it, which torch.compile does "
        "not support"
    ]
    assert compiled(trainer.model.g) and not compiled(trainer.model.d)
    keys = build(make_cfg("+experiment=wgan_gp"), tmp_path / "eager").model.state_dict().keys()
    assert trainer.model.state_dict().keys() == keys  # checkpoints load with compile on or off


def test_compile_keeps_a_spectral_norm_critic_eager_and_says_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gantrain")
    trainer = build(make_cfg("+experiment=hinge_sngan", "trainer.compile=true"), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer.compile")]
    assert len(lines) == 1 and lines[0].startswith("trainer.compile: d stays eager: its spectral norm updates")
    assert compiled(trainer.model.g) and not compiled(trainer.model.d)


def test_compile_covers_a_vaes_encoder_and_decoder(tmp_path):
    """The ELBO calls encode()/decode(), not forward(): the VAE's parts are compiled."""
    g = build(make_cfg("+experiment=vae", "trainer.compile=true"), tmp_path).model.g
    assert compiled(g.encoder) and compiled(g.decoder)


def test_an_objective_that_does_not_declare_its_double_backward_networks_is_refused():
    class Mine(nn.Module):
        networks = ("g",)

    with pytest.raises(ConfigError, match=r"^trainer.compile: Mine does not declare double_backward_networks\(\)"):
        speed.compile_networks(nn.Module(), Mine(), "default")


def dcgan_pair() -> nn.Module:
    model = nn.Module()
    model.g = dcgan.Generator(nz=8, ngf=4, channels=1, resolution=32)
    model.d = dcgan.Discriminator(ndf=4, channels=1, resolution=32)
    return model


def apply_on(device: str, settings: TrainerSettings, model: nn.Module) -> None:
    """speed.apply for ``device`` without running anything there (it only decides and marks the networks)."""
    benchmark = torch.backends.cudnn.benchmark
    try:
        speed.apply(settings, model, GANObjective(BCELoss()), iter([]), torch.device(device))
    finally:
        torch.backends.cudnn.benchmark = benchmark  # apply() turns it on for cuda


@pytest.mark.parametrize("device", ["cuda", "mps", "cpu"])
def test_compile_with_channels_last_on_a_gpu_keeps_transposed_convolutions_eager(device, caplog):
    """On a GPU, inductor's compiled ConvTranspose2d backward fails its stride check in channels_last (dcgan's G on an
    H200, torch 2.11): G stays eager there, with one line; D (plain convolutions) compiles, and so does every network
    on a CPU or without channels_last."""
    caplog.set_level(logging.INFO, logger="gantrain")
    model = dcgan_pair()
    apply_on(device, TrainerSettings(compile=True, channels_last=True), model)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer.compile")]
    if device == "cpu":
        assert lines == [] and compiled(model.g) and compiled(model.d)
    else:
        assert lines == [
            "trainer.compile: g stays eager: with trainer.channels_last on a GPU, the compiled backward of its "
            "transposed convolutions fails inductor's stride check (pytorch/pytorch#171622)"
        ]
        assert not compiled(model.g) and compiled(model.d)
    without = dcgan_pair()
    apply_on(device, TrainerSettings(compile=True), without)
    assert compiled(without.g) and compiled(without.d)


def test_channels_last_batches_only_images():
    images, points = torch.randn(2, 3, 4, 4), torch.randn(5, 2)
    assert speed.channels_last(images).is_contiguous(memory_format=torch.channels_last)
    assert speed.channels_last(points) is points

    class Batch:  # the coming Batch(x, y): its images change, the rest stays
        def __init__(self, x):
            self.x, self.y = x, torch.arange(2)

    batch = speed.channels_last(Batch(images))
    assert batch.x.is_contiguous(memory_format=torch.channels_last) and batch.y.tolist() == [0, 1]
    stream = speed.ChannelsLastStream(iter([images]))
    assert next(stream).is_contiguous(memory_format=torch.channels_last)


def critic_gradients(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> list[torch.Tensor]:
    """The gradient penalty's gradient w.r.t. the critic's parameters (fixed interpolation weights)."""
    alpha = torch.linspace(0.1, 0.9, real.shape[0]).view(-1, 1, 1, 1)
    penalty = GradientPenalty(10.0)(d, real, fake, alpha=alpha)
    grads = torch.autograd.grad(penalty, list(d.parameters()), allow_unused=True)  # some heads go unused
    return [g for g in grads if g is not None]


def tiny_critic() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    d = dcgan.Discriminator(ndf=4, channels=1, resolution=32, norm="none")
    return d, torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)


def test_under_compile_the_penalty_gradients_are_the_eager_ones(tmp_path):
    """The silent-drop case: the critic the compile switch leaves eager gets exactly the eager penalty gradients,
    and they are not zero."""
    d, real, fake = tiny_critic()
    want = critic_gradients(d, real, fake)
    model = nn.Module()
    model.g, model.d = nn.Linear(2, 2), d
    assert speed.compile_networks(model, GANObjective(WassersteinLoss(), gp=GradientPenalty(10.0)), "default") == ["g"]
    got = critic_gradients(model.d, real, fake)
    assert all(g.abs().sum() > 0 for g in want if g.dim() > 1)  # biases may not shape an input gradient
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.slow  # one compile of a tiny critic: ~30 s on 2 busy cores
def test_this_torch_cannot_double_backward_through_a_compiled_critic():
    """Why the critic stays eager. If a torch release makes this pass (it raises, or returns wrong gradients), the
    compiled critic's penalty gradients are to be compared with the eager ones here before letting it compile."""
    d, real, fake = tiny_critic()
    want = critic_gradients(d, real, fake)
    torch._dynamo.reset()  # past another test's recompile limit the critic would silently run eager
    d.compile()
    try:
        got = critic_gradients(d, real, fake)
    except RuntimeError as e:
        assert "double backward" in str(e)
    else:
        assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, want)), (
            "this torch gets the compiled critic's penalty gradients right: trainer.compile could compile it"
        )


def test_a_run_resumes_with_compile_or_channels_last_changed_but_not_matmul_precision(tmp_path):
    """compile and channels_last change how the same float32 arithmetic runs; TF32/bf16 matmuls change the
    arithmetic, as trainer.precision does."""
    tiny = ["+experiment=dcgan", "trainer.checkpoint_every_n_steps=1000", "trainer.sample_every_n_steps=1000"]
    train(make_cfg(*tiny), tmp_path)
    train(make_cfg(*tiny, "trainer.max_steps=3", "trainer.resume=auto", "trainer.channels_last=true"), tmp_path)
    with pytest.raises(Exception, match=r"trainer.matmul_precision"):
        train(make_cfg(*tiny, "trainer.max_steps=4", "trainer.resume=auto", "trainer.matmul_precision=high"), tmp_path)
    torch.set_float32_matmul_precision("highest")
    from omegaconf import OmegaConf

    from gantrain.checkpoint import check_same_run

    saved = OmegaConf.to_container(make_cfg(*tiny), resolve=True)
    check_same_run({"config": saved}, {**saved, "trainer": {**saved["trainer"], "compile": "max-autotune"}}, "ckpt")


def test_the_hparams_row_records_matmul_precision_and_cudnn_benchmark(tmp_path):
    from gantrain.provenance import hparams_row

    cfg = make_cfg("+experiment=dcgan", "trainer.matmul_precision=high")
    row = hparams_row(cfg)
    assert row["trainer.matmul_precision"] == "high" and row["cudnn.benchmark"] is False  # CPU: no cuDNN
