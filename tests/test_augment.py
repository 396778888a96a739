"""The augment group (issue 24): each op's identity at strength 0, its input gradient against finite differences,
what translation and cutout move and erase, per-sample draws, ADA's p update, where the objective applies it
(G's gradient through the fakes' augmentation, none through the reals'), bit-exact resume of p, the refusals."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from gantrain import augment as aug
from gantrain.augment import ADA, OPS, DiffAugment, NoAugment
from gantrain.batch import Batch
from gantrain.build import build
from gantrain.errors import ConfigError
from gantrain.losses import BCELoss, RelativisticPairingLoss
from gantrain.models import GenerativeModel
from gantrain.models.dcgan import Discriminator, Generator
from gantrain.objectives import GANObjective
from gantrain.stats import Collector, collecting
from gantrain.train import train
from tests.conftest import REPO, TINY, TINY_WIDTH, HostCopies, make_cfg


def images(b: int = 2, c: int = 3, size: int = 8, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2 - 1


# ----------------------------------------------------------------------------- identity at strength 0
@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_at_strength_or_probability_0_is_exactly_the_identity(channels):
    x, b = images(4, channels), 4
    assert torch.equal(aug.brightness(x, torch.zeros(b)), x)
    assert torch.equal(aug.saturation(x, torch.ones(b)), x)
    assert torch.equal(aug.contrast(x, torch.ones(b)), x)
    assert torch.equal(aug.translate(x, torch.zeros(b, 2, dtype=torch.long)), x)
    assert torch.equal(aug.cutout(x, torch.zeros(b, 2, dtype=torch.long), (0, 0)), x)
    assert torch.equal(aug.geometric(x, torch.eye(3).expand(b, 3, 3)), x)
    assert torch.equal(aug.color(x, torch.eye(4).expand(b, 4, 4)), x)
    off = dict(brightness=0.0, saturation=0.0, contrast=0.0, translation=0.0, cutout=0.0)
    assert torch.equal(DiffAugment(**off)(x), x)
    for op in OPS:  # each ADA op alone, and all of them, at p = 0
        assert torch.equal(ADA(p=0.0, ops=[op])(x), x), op
    assert torch.equal(ADA(p=0.0)(x), x)
    assert NoAugment()(x) is x and not NoAugment().active


def test_a_sample_whose_ops_do_not_fire_is_returned_exactly_while_others_change():
    x = images(64)
    torch.manual_seed(0)
    out = ADA(p=0.2)(x)
    same = torch.tensor([torch.equal(a, b) for a, b in zip(out, x)])
    assert 0 < same.sum() < 64  # (1 - 0.2)^11 ≈ 8.6% of the samples untouched: between 1 and 63 of 64


# ----------------------------------------------------------------------------- gradients
def _seeded(fn, seed: int = 3):
    """``fn`` with the global RNG reset before each call: its random parameters are fixed, its input varies."""

    def call(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(seed)
        return fn(x)

    return call


OPS_WITH_FIXED_PARAMETERS = {
    "brightness": lambda x: aug.brightness(x, torch.tensor([0.3, -0.2], dtype=x.dtype)),
    "saturation": lambda x: aug.saturation(x, torch.tensor([1.7, 0.4], dtype=x.dtype)),
    "contrast": lambda x: aug.contrast(x, torch.tensor([1.4, 0.6], dtype=x.dtype)),
    "translation": lambda x: aug.translate(x, torch.tensor([[1, -2], [-1, 0]])),
    "cutout": lambda x: aug.cutout(x, torch.tensor([[2, 3], [0, 5]]), (3, 3)),
    "geometric": lambda x: aug.geometric(
        x, torch.tensor([[[0.8, -0.5, 0.7], [0.5, 0.9, -0.3], [0, 0, 1]]]).expand(2, 3, 3)
    ),
    "color": lambda x: aug.color(
        x, torch.eye(4) + 0.2 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(1))
    ),
    "diffaugment": _seeded(DiffAugment()),
    "ada": _seeded(lambda x: ADA().apply(x, 0.9)),
    "ada_gray": _seeded(lambda x: ADA().apply(x[:, :1], 0.9)),
}


@pytest.mark.parametrize("name", list(OPS_WITH_FIXED_PARAMETERS))
def test_each_op_gradient_matches_finite_differences_in_float64(name):
    x = images(2, 3, 6, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(OPS_WITH_FIXED_PARAMETERS[name], (x,), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- what translation and cutout do
def test_translation_moves_and_cutout_erases_exactly_the_pixels_they_say():
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)  # rows 1..4, 5..8, ...
    moved = aug.translate(x, torch.tensor([[1, -2]]))  # one row down, two columns left, zeros come in
    want = torch.tensor([[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0]], dtype=torch.float32)
    assert torch.equal(moved[0, 0], want)
    cut = aug.cutout(x, torch.tensor([[2, 1]]), (2, 2))  # rows 1-2, columns 0-1
    want = x.clone()
    want[0, 0, 1:3, 0:2] = 0
    assert torch.equal(cut, want)
    corner = aug.cutout(x, torch.tensor([[0, 3]]), (2, 2))  # cut at the border: row 0, column 2-3... row -1 is outside
    want = x.clone()
    want[0, 0, 0:1, 2:4] = 0
    assert torch.equal(corner, want)
    assert int(8 * DiffAugment().translation + 0.5) == 1 and int(8 * DiffAugment().cutout + 0.5) == 4


def test_diffaugment_translation_and_cutout_stay_within_their_bounds():
    x = torch.ones(256, 1, 16, 16)
    torch.manual_seed(0)
    cut = DiffAugment(policy=["cutout"])(x)
    erased = (cut == 0).flatten(1).sum(1)
    assert erased.max() == 64 and erased.min() >= 16  # an 8x8 square, cut by the border to at least 4x4
    torch.manual_seed(0)
    moved = DiffAugment(policy=["translation"])(x)
    empty_rows = (moved[:, 0] == 0).all(2).sum(1)
    assert empty_rows.max() == 2 and set(empty_rows.tolist()) == {0, 1, 2}  # |dy| <= 16 / 8


def test_a_batch_is_augmented_per_sample():
    x = images(1).expand(2, -1, -1, -1).contiguous()
    for name, fn in [("diffaugment", DiffAugment()), ("ada", lambda x: ADA().apply(x, 1.0))]:
        torch.manual_seed(0)
        out = fn(x)
        assert not torch.equal(out[0], out[1]), name


# ----------------------------------------------------------------------------- ADA's p
def scripted(ada: ADA, signs: list[list[float]], batch: int = 8) -> list[tuple[float, float]]:
    """Feed one D step per row: D outputs with those signs (``batch`` of them, cycled); (p, r_t or nan) after each."""
    seen = []
    for step, row in enumerate(signs):
        out = torch.tensor([row[i % len(row)] for i in range(batch)]) * 3.0
        ada.observe(out, step)
        with collecting(Collector()) as c:
            ada.after_d_step()
        seen.append((ada.p.item(), c.drain().get("augment/rt", math.nan)))
    return seen


def test_the_augmentations_copy_nothing_from_the_host_to_a_gpu():
    """ADA (every op, 1 and 3 channels, the observation of D's outputs and an adjustment of p), DiffAugment and the
    VAE's Gaussian likelihood make their constants on the device: ADA once made ~100 blocking host copies a call,
    which made an ADA run on a shared H200 slower than four times the steps without it. Checked without a GPU: the
    tensors are fake CUDA tensors (shapes and devices only)."""
    from gantrain.elbo import gaussian_log_prob

    with FakeTensorMode(allow_non_fake_inputs=True):
        ada = ADA(ops=list(OPS), adjust_every=1, speed_images=10)
        ada(torch.zeros(4, 1, 8, 8, device="cuda"))  # moves p to the GPU, once
        with HostCopies() as copies:
            for c in (1, 3):
                ada(torch.zeros(4, c, 8, 8, device="cuda"))
                ada.apply(torch.zeros(4, c, 8, 8, device="cuda"), 0.5)  # a float p too
            ada.observe(torch.zeros(4, 1, device="cuda"), step=0)
            ada.after_d_step()  # adjusts p
            DiffAugment()(torch.zeros(4, 3, 8, 8, device="cuda"))
            mean = torch.zeros(2, 1, 4, 4, device="cuda")
            gaussian_log_prob(mean, mean, -1.0)
        assert ada.p.device.type == "cuda"
    assert copies.seen == []


def test_ada_fills_each_number_of_a_matrix_once():
    """On a GPU a small ADA step is launch-bound (the H200 ran ADA at half a plain dcgan step's rate): a matrix built
    from per-sample tensors and numbers fills each distinct number once, and a whole call stays under its count
    after that change (174 computing ops on a 1-channel batch, from 243)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    s, like = torch.rand(4), torch.zeros(4)
    with Ops() as ops:
        m = aug._scale2d(s, s, like)
    assert ops.seen.count("aten.new_full.default") == 2  # 0 and 1, not six
    assert torch.equal(m, torch.diag_embed(torch.stack([s, s, torch.ones(4)], dim=1)))
    z = aug._matrix([[-0.0, 0.0], [1, 1.0]], like)  # -0.0 == 0.0 as a key, but keeps its sign
    assert torch.signbit(z[:, 0, 0]).all() and not torch.signbit(z[:, 0, 1]).any()
    with Ops() as ops:
        ADA(p=0.3, adaptive=False)(images(64, 1, 32))
    assert ops.seen.count("aten.new_full.default") <= 26  # 95 when every number of every matrix was its own fill


def test_p_follows_the_papers_formula_on_a_scripted_sequence_of_d_outputs():
    """p += sign(r_t - target) * n / speed_images every adjust_every D steps, n the reals seen; clamped to [0, 1)."""
    ada = ADA(target=0.6, adjust_every=2, speed_images=256)  # each adjustment: 2 steps * 8 images / 256 = 1/16
    up, down, half = [1.0], [1.0, 1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 0.0]  # r_t = 1, 0, 0.75
    rows = [up, up, up, half, down, down, down, down, up, up]
    seen = scripted(ada, rows)
    assert [p for p, _ in seen] == [0, 1 / 16, 1 / 16, 2 / 16, 2 / 16, 1 / 16, 1 / 16, 0, 0, 1 / 16]
    rts = [rt for _, rt in seen]
    assert rts[1::2] == [1.0, (1 + 0.75) / 2, 0.0, 0.0, 1.0] and all(math.isnan(r) for r in rts[0::2])
    ada = ADA(p=0.99, adjust_every=1, speed_images=8)  # one adjustment of +1: stays below 1
    assert scripted(ada, [up])[0][0] == aug.BELOW_ONE < 1
    fixed = ADA(p=0.3, adaptive=False, adjust_every=1, speed_images=8)
    assert [p for p, _ in scripted(fixed, [up, down])] == [pytest.approx(0.3)] * 2


def test_a_skipped_d_step_leaves_no_observation_behind():
    ada = ADA(p=0.5, adjust_every=1, speed_images=16)
    ada.observe(torch.ones(8), step=0)  # this step was skipped (non-finite): no after_d_step
    ada.observe(torch.tensor([1.0] * 6 + [-1.0] * 2), step=1)
    ada.after_d_step()
    assert ada.p.item() == 0.0  # r_t = 0.5 from step 1 alone: 0.5 - 8/16 (with step 0's, r_t 0.75: up to 1)
    ada.observe(torch.ones(8), step=2)
    ada.observe(torch.ones(8), step=2)  # two micro-batches of one step
    ada.after_d_step()
    assert ada.p.item() == aug.BELOW_ONE and ada.state_dict()["sums"] is None  # +16/16, clamped below 1


def test_the_ada_keys_are_checked():
    for kwargs, key in [({"target": 1.0}, "target"), ({"p": 1.0}, "p"), ({"ops": ["zoom"]}, "ops")]:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            ADA(**kwargs)
    with pytest.raises(ConfigError, match=r"^policy='rotate': must be one of color, translation, cutout"):
        DiffAugment(policy=["rotate"])


# ----------------------------------------------------------------------------- in the objective
def tiny_gan() -> GenerativeModel:
    torch.manual_seed(0)
    g = Generator(nz=4, ngf=4, channels=3, resolution=8, norm="none")
    d = Discriminator(ndf=4, channels=3, resolution=8, norm="none")
    return GenerativeModel(g, d, 8, 3)


def test_g_gradient_flows_through_the_augmented_fakes_and_equals_a_hand_built_graph():
    model, real = tiny_gan(), Batch(images(4, 3, 8))
    objective = GANObjective(BCELoss())
    objective.use_augment(DiffAugment())
    torch.manual_seed(5)
    objective.g_loss(model, real).backward()
    got = [p.grad.clone() for p in model.g.parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    fake = model.generate(model.prior(4))
    seen = DiffAugment()(fake)  # the same draws, by hand
    F.binary_cross_entropy_with_logits(model.d(seen), torch.ones(4)).backward()
    want = [p.grad for p in model.g.parameters()]
    assert all(g.abs().sum() > 0 for g in got)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(got, want))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    no_aug = GANObjective(BCELoss())
    no_aug.g_loss(model, real).backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(got, model.g.parameters()))  # it changed the gradient


def test_every_d_input_is_augmented_and_the_reals_carry_no_graph():
    """RpGAN reads D's real outputs in the G phase: D sees augmented fakes (graph to G) and augmented reals (no
    graph); in the D phase neither reaches G. Each D input differs from the un-augmented batch."""
    model, real = tiny_gan(), Batch(images(4, 3, 8))
    objective = GANObjective(RelativisticPairingLoss(), reuse_fakes=False)
    objective.use_augment(DiffAugment(policy=["translation", "cutout"]))
    inputs = []
    hook = model.d.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    torch.manual_seed(1)
    objective.d_loss(model, real)
    assert len(inputs) == 2 and all(t.grad_fn is None and not t.requires_grad for t in inputs)
    assert not torch.equal(inputs[0], real.x) and (inputs[0] == 0).any()  # cut out
    inputs.clear()
    objective.g_loss(model, real)
    hook.remove()
    fake_in, real_in = inputs
    assert fake_in.grad_fn is not None and real_in.grad_fn is None and not real_in.requires_grad
    assert not torch.equal(real_in, real.x)


def test_with_augmentation_a_g_step_leaves_d_alone_and_ada_adjusts_after_d_steps(tmp_path):
    trainer = build(make_cfg("+experiment=dcgan", "augment=ada", "augment.adjust_every=1"), tmp_path)
    d_phase, g_phase = trainer.phases
    model, ada = trainer.model, trainer.state.parts["augment"]
    assert isinstance(ada, ADA)
    with collecting(Collector()) as c:
        trainer.run_phase(d_phase)
        assert ada.steps == 0 and ada.p.item() in (0.0, torch.tensor(8 / 500_000).item())  # 8 reals: up or 0
        d_after, d_grads = [p.detach().clone() for p in model.d.parameters()], [p.grad for p in model.d.parameters()]
        g_before = [p.detach().clone() for p in model.g.parameters()]
        trainer.run_phase(g_phase)
        assert all(torch.equal(a, b) for a, b in zip(d_after, model.d.parameters()))
        assert all(a is b or torch.equal(a, b) for a, b in zip(d_grads, [p.grad for p in model.d.parameters()]))
        assert any(not torch.equal(a, b) for a, b in zip(g_before, model.g.parameters()))
    assert {"augment/p", "augment/rt"} <= c.drain().keys()


# ----------------------------------------------------------------------------- runs, resume, refusals
STOPPING = '''
import os
import signal

from gantrain.losses import BCELoss


class StoppingBCE(BCELoss):
    """BCE that sends itself SIGTERM at D loss call STOP_AT (the run saves after that step and exits 143)."""

    calls = 0

    def d_loss(self, real, fake):
        StoppingBCE.calls += 1
        if StoppingBCE.calls == int(os.environ.get("STOP_AT", "0")):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().d_loss(real, fake)
'''


@pytest.mark.parametrize("option", ["diffaugment", "ada"])
def test_a_run_with_augmentation_trains_two_steps(tmp_path, option, one_thread):
    metrics = train(make_cfg("+experiment=dcgan", f"augment={option}"), tmp_path)
    assert metrics["step"] == 2 and all(math.isfinite(v) for v in metrics.values())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ("augment" in ckpt) == (option == "ada")


def test_sigterm_and_resume_continue_p_exactly(tmp_path):
    """p moves by 0.1875 every 3 D steps (each 2 micro-batches of 8); SIGTERM in step 4 of 8, mid-interval; resume:
    p, its sums and the weights equal the uninterrupted run's, bit for bit."""
    args = ["+experiment=dcgan", "augment=ada", "augment.p=0.5", "augment.adjust_every=3", "augment.speed_images=256"]
    args += [*TINY, *TINY_WIDTH["ngf"], "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1000"]
    args += ["trainer.sample_every_n_steps=1000", "trainer.accumulate_grad_batches=2"]
    args += ["loss.adversarial._target_=stopping.StoppingBCE"]
    (tmp_path / "stopping.py").write_text(STOPPING)

    def gantrain(run: Path, *more: str, stop_at: int = 0) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "STOP_AT": str(stop_at)}
        cmd = [sys.executable, "-m", "gantrain", *args, f"hydra.run.dir={run}", *more]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    straight = gantrain(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = gantrain(tmp_path / "run", stop_at=2 * 4)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    load = lambda run: torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # noqa: E731
    half = load(tmp_path / "run")["augment"]
    assert load(tmp_path / "run")["step"] == 4 and half["steps"] == 1 and half["sums"][1] == 16
    assert half["p"].item() in (0.5 - 0.1875, 0.5 + 0.1875)
    resumed = gantrain(tmp_path / "run", "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "straight")["augment"], load(tmp_path / "run")["augment"]
    assert torch.equal(a["p"], b["p"]) and a["steps"] == b["steps"] == 8 % 3
    assert torch.equal(a["sums"], b["sums"])
    assert all(
        torch.equal(v, load(tmp_path / "run")["model"][k]) for k, v in load(tmp_path / "straight")["model"].items()
    )


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["+experiment=toy_gan", "augment=ada"],
            "augment=ada: augments images, and Ring has 2-D points; use augment=none",
        ),
        (
            ["+experiment=toy_gan", "augment=diffaugment"],
            "augment=diffaugment: augments images, and Ring has 2-D points",
        ),
        (["+experiment=vae", "augment=ada"], "augment=ada: augments a discriminator's inputs, and VAEObjective has no"),
    ],
)
def test_augmenting_points_or_a_model_without_d_is_refused_in_one_line(tmp_path, overrides, line):
    with pytest.raises(ConfigError) as e:
        build(make_cfg(*overrides), tmp_path)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_augment_ada_with_ring8_is_one_line_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "gantrain", "+experiment=toy_gan", "data=ring8", "augment=ada", *TINY]
    done = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out
    assert "augment=ada: augments images, and Ring has 2-D points; use augment=none" in out
