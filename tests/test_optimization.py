"""The optimization machinery inside the Trainer's one phase loop, asserted with numbers.

SGD variants and accumulation against hand computation, k micro-batches against one large batch
for the real bce and wgan_gp recipes, LR schedules stepped per optimizer step of each network,
clipping after unscaling under fp16, skipped-step counting, EMA against its closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gantrain import amp
from gantrain.batch import Batch
from gantrain.build import build
from gantrain.checkpoint import trainer_state
from gantrain.losses import GradientPenalty
from gantrain.optim import Schedule, Update
from gantrain.phase import Phase
from gantrain.runlog import RunLog, standard_callbacks
from gantrain.trainer import Trainer, TrainerSettings
from tests.conftest import make_cfg
from tests.test_trainer import ListStream, one_weight_trainer


def _record_after_steps(optimizer: torch.optim.Optimizer, tensor: torch.Tensor) -> list[float]:
    values: list[float] = []
    optimizer.register_step_post_hook(lambda *_: values.append(tensor.item()))
    return values


# ----------------------------------------------------------------------------- acceptance 1
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov"])
def test_sgd_variants_match_hand_computation(tmp_path, variant, k):
    mu, lr, steps = 0.9, 0.05, 3
    kw = {"plain": {}, "momentum": {"momentum": mu}, "nesterov": {"momentum": mu, "nesterov": True}}[variant]
    trainer, lin = one_weight_trainer(
        tmp_path,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, **kw),
        max_steps=steps,
        accumulate_grad_batches=k,
    )
    got = _record_after_steps(trainer.phases[0].optimizer, lin.weight)
    trainer.fit()

    w, buf, want, x = 1.0, None, [], 0
    for _ in range(steps):
        xs = [x + i + 1 for i in range(k)]  # the window's fresh micro-batches
        x += k
        g = w * sum(v * v for v in xs) / k  # mean of (w x^2) over the window
        if variant == "plain":
            w -= lr * g
        else:
            buf = g if buf is None else mu * buf + g
            w -= lr * (g + mu * buf if variant == "nesterov" else buf)
        want.append(w)
    assert got == pytest.approx(want, rel=1e-6)
    assert trainer.images_seen == steps * k


# ----------------------------------------------------------------------------- acceptance 2
class FixedBatches:
    """Yields the given tensors in order, as Batches (the real data of the equivalence test)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.i = batches, 0

    def __next__(self) -> Batch:
        self.i += 1
        return Batch(self.batches[self.i - 1])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, s: dict) -> None:
        self.i = s["i"]


@pytest.mark.parametrize(
    "experiment, reuse",
    [("dcgan", True), ("dcgan", False), ("wgan_gp", True), ("vae", False)],
    ids=["dcgan", "dcgan-fresh-fakes", "wgan_gp", "vae"],
)
def test_k_micro_batches_equal_one_large_batch(tmp_path, monkeypatch, experiment, reuse):
    """k=4 micro-batches of b and one batch of 4b: same gradients and weights (float64, BatchNorm-free).

    Every random draw (real batch, G's noise, the GP's mixing weights, the VAE's reparameterisation
    noise) is fed from fixed tensors, the micro-batch runs getting them in slices. With ``reuse``
    (``loss.reuse_fakes``, n_critic 1) G's micro-batches take the D window's k generated batches in
    order, so only D draws noise.
    """
    k, b = 4, 3
    vae = experiment == "vae"
    windows = 1 if vae else 2  # a VAE has one phase; a GAN's D and G each draw a window of k batches
    latents = 1 if vae or reuse else 2  # windows that draw noise: G's draws its own only without reuse
    gen = torch.Generator().manual_seed(0)
    latent = (32,) if vae else (100, 1, 1)
    reals = [torch.rand(b, 1, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(windows * k)]
    noises = [torch.randn(b, *latent, generator=gen, dtype=torch.float64) for _ in range(latents * k)]
    alphas = [torch.rand(b, 1, 1, 1, generator=gen, dtype=torch.float64) for _ in range(k)]
    gp_call = GradientPenalty.__call__

    def run(name: str, micro: int) -> tuple[dict, dict]:
        chunks = [torch.cat(reals[i : i + micro]) for i in range(0, windows * k, micro)]  # D's window, then G's
        z = [torch.cat(noises[i : i + micro]) for i in range(0, latents * k, micro)]
        a = [torch.cat(alphas[i : i + micro]) for i in range(0, k, micro)]
        # the VAE has no norms by default
        gan = [] if vae else ["model.g.norm=none", "model.d.norm=none", f"loss.reuse_fakes={reuse}"]
        cfg = make_cfg(
            f"+experiment={experiment}",
            *gan,
            f"data.batch_size={b * micro}",
            f"trainer.accumulate_grad_batches={k // micro}",
            "trainer.n_critic=1",
            "trainer.max_steps=1",
        )
        trainer = build(cfg, tmp_path / name)
        trainer.model.double()
        trainer.data = FixedBatches(chunks)
        for callback in trainer.callbacks:
            if isinstance(callback, RunLog):  # no sample grid: the model is float64 now, its fixed noise float32
                callback.sampler = None
        if vae:
            trainer.model.g.reparameterize = lambda mu, logvar: mu + torch.exp(0.5 * logvar) * z.pop(0)
        else:
            trainer.model.noise = lambda n, device, generator=None: z.pop(0)
        monkeypatch.setattr(GradientPenalty, "__call__", lambda self, d, r, f: gp_call(self, d, r, f, alpha=a.pop(0)))
        grads: dict[str, list[torch.Tensor]] = {}
        for phase in trainer.phases:
            phase.optimizer.register_step_pre_hook(
                lambda opt, *_, _n=phase.name, _m=phase.module: grads.__setitem__(
                    _n, [p.grad.clone() for p in _m.parameters()]
                )
            )
        trainer.fit()
        assert z == [] and trainer.data.i == len(chunks)  # every batch and latent used exactly once
        assert len(a) == (0 if experiment == "wgan_gp" else len(alphas) // micro)  # GP: each mix weight once
        return grads, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    grads_micro, params_micro = run("micro", 1)
    grads_big, params_big = run("big", k)
    assert grads_big.keys() == ({"VAE"} if vae else {"D", "G"})
    for phase in grads_big:
        assert torch.nn.utils.get_total_norm(grads_big[phase]) > 1e-6  # a real gradient, not all zeros
        for gm, gb in zip(grads_micro[phase], grads_big[phase]):
            # far inside the required 1e-5: G's gradients are ~1e-5 themselves at DCGAN's init
            torch.testing.assert_close(gm, gb, rtol=1e-9, atol=1e-15)
    for name in params_big:
        torch.testing.assert_close(params_micro[name], params_big[name], rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- acceptance 3 (in the loop)
def _two_phase_trainer(tmp_path, schedule: Schedule, n_critic: int, max_steps: int):
    nets = nn.ModuleDict({"d": nn.Linear(1, 1, bias=False), "g": nn.Linear(1, 1, bias=False)})
    phases = [
        Phase(
            "D", nets.d, Update(torch.optim.SGD(nets.d.parameters(), lr=0.1), schedule), lambda x, s: nets.d(x).sum()
        ),
        Phase(
            "G",
            nets.g,
            Update(torch.optim.SGD(nets.g.parameters(), lr=0.02), schedule),
            lambda x, s: nets.g(x).sum(),
            interval=n_critic,
            counts_as_step=True,
        ),
    ]
    s = TrainerSettings(device="cpu", progress_bar=False, max_steps=max_steps)
    callbacks = standard_callbacks(s, tmp_path)
    return Trainer(s, model=nets, phases=phases, data=ListStream(), callbacks=callbacks)


def _torch_reference(kind: str, lr: float, total: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = {
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0),
        "exponential": lambda: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
        "linear": lambda: torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=total),
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    }[kind]()
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", ["constant", "step", "cosine", "exponential", "linear"])
def test_schedules_step_once_per_optimizer_step_of_each_network(tmp_path, kind):
    """20 G steps with n_critic=2: D's schedule spans its 40 steps, G's its 20; both match torch's own."""
    schedule = Schedule(kind=kind, step_size=5, gamma=0.5 if kind == "step" else 0.8)
    trainer = _two_phase_trainer(tmp_path, schedule, n_critic=2, max_steps=20)
    lrs = {p.name: [] for p in trainer.phases}
    for p in trainer.phases:
        p.optimizer.register_step_pre_hook(lambda opt, *_, _n=p.name: lrs[_n].append(opt.param_groups[0]["lr"]))
    trainer.fit()
    assert lrs["D"] == pytest.approx(_torch_reference(kind, 0.1, 40), rel=1e-12, abs=1e-15)
    assert lrs["G"] == pytest.approx(_torch_reference(kind, 0.02, 20), rel=1e-12, abs=1e-15)
    if kind == "cosine":  # and the closed form, to be sure the reference is the schedule we mean
        assert lrs["G"][7] == pytest.approx(0.02 * (1 + math.cos(math.pi * 7 / 20)) / 2, rel=1e-12)


# ----------------------------------------------------------------------------- clipping and fp16
def test_per_network_clipping_overrides_the_trainer(tmp_path):
    # x=1, w=5: grad 5. Trainer clips to 2, but this phase says 0 (no clipping) -> w = 5 - 0.1 * 5.
    trainer, lin = one_weight_trainer(
        tmp_path / "off", w0=5.0, max_steps=1, gradient_clip_val=2.0, phase_kw={"gradient_clip_val": 0.0}
    )
    trainer.fit()
    assert lin.weight.item() == pytest.approx(4.5, rel=1e-6)
    # No trainer clipping, the phase clips by value at 1 -> w = 5 - 0.1 * 1.
    trainer, lin = one_weight_trainer(
        tmp_path / "on", w0=5.0, max_steps=1, phase_kw={"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"}
    )
    trainer.fit()
    assert lin.weight.item() == pytest.approx(4.9, rel=1e-6)


def test_clipping_happens_after_unscaling_under_fp16(tmp_path):
    """With a 2^20 loss scale the gradient the optimizer sees has norm exactly the threshold.

    Clipping before unscaling would clip the scaled norm (~650) to 2e-4, leaving ~2e-10 after unscaling.
    """
    torch.manual_seed(0)
    net = nn.Linear(8, 8)
    x = torch.randn(16, 8)
    phase = Phase(
        "main",
        net,
        torch.optim.SGD(net.parameters(), lr=0.0),
        lambda _, s: 1e-3 * (net(x).float() ** 2).mean(),
        counts_as_step=True,
    )
    s = TrainerSettings(device="cpu", progress_bar=False, max_steps=1, precision="16-mixed", gradient_clip_val=2e-4)
    callbacks = standard_callbacks(s, tmp_path)
    trainer = Trainer(s, model=net, phases=[phase], data=ListStream(), callbacks=callbacks)
    trainer.scalers["main"] = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    seen = []
    phase.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).item())
    )
    metrics = trainer.fit()

    with torch.autocast("cpu", dtype=torch.float16):  # the true (unscaled) gradient norm, by hand
        loss = 1e-3 * (net(x).float() ** 2).mean()
    true_norm = torch.nn.utils.get_total_norm(torch.autograd.grad(loss.float(), list(net.parameters()))).item()
    assert true_norm > 5e-4  # so the threshold 2e-4 really clips
    # clipped after unscale: the threshold (up to the 1e-6 torch adds to the norm it divides by)
    assert seen == [pytest.approx(2e-4, rel=5e-3)]
    assert metrics["grad_norm/main"] == pytest.approx(true_norm, rel=1e-2)  # logged before clipping, unscaled
    assert metrics["amp/skipped_steps/main"] == 0
    assert metrics["amp/scale/main"] == 2.0**20


class Values:
    """Yields the given floats as (1,)-tensors, resumable."""

    def __init__(self, values):
        self.values, self.i = values, 0

    def __next__(self):
        self.i += 1
        return torch.tensor([self.values[self.i - 1]])

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_fp16_steps_with_inf_gradients_are_skipped_and_counted(tmp_path):
    trainer, lin = one_weight_trainer(
        tmp_path, data=Values([1.0, 200.0, 1.0]), max_steps=3, precision="16-mixed", log_every_n_steps=100
    )
    after = _record_after_steps(trainer.phases[0].optimizer, lin.weight)
    # 2^8, so that only the x = 200 batch overflows: its loss, 0.9^2 * 200^2 / 2, is finite (a non-finite
    # loss is on_nonfinite's, not the scaler's) but its scaled gradient 2^8 * 0.9 * 200^2 is not, in fp16
    # (at the default 2^16 the first fp16 gradient, 1 * 2^16, overflows fp16's 65504 too: the scaler
    # backs off, which is its job, but it blurs this test).
    trainer.scalers["main"] = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scale0 = 2.0**8
    metrics = trainer.fit()
    assert len(after) == 2  # step 2 (x = 200) never reached the optimizer
    assert after == pytest.approx([0.9, 0.81], rel=1e-3)  # fp16 forward, so ~1e-3
    assert metrics["amp/skipped_steps/main"] == 1
    assert metrics["amp/scale/main"] == scale0 / 2  # backed off once, not grown yet
    assert trainer_state(trainer)["guard"]["skipped_steps"] == {"main": 1}
    # the skipped step's values are not logged: the mean gradient norm is steps 1 and 3's (w x^2 = 1, 0.9), not inf
    assert math.isfinite(metrics["grad_norm/main"]) and metrics["grad_norm/main"] == pytest.approx(
        (1.0 + 0.9) / 2, rel=1e-3
    )


# ----------------------------------------------------------------------------- gradient penalty under AMP
def _gp_case(device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    d = nn.Sequential(
        nn.Conv2d(1, 16, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten()
    )
    d.append(nn.Linear(32 * 8 * 8, 1))
    real, fake = torch.rand(8, 1, 32, 32) * 2 - 1, torch.rand(8, 1, 32, 32) * 2 - 1
    alpha = torch.rand(8, 1, 1, 1)
    return d.to(device), real.to(device), fake.to(device), alpha.to(device)


def _fp16_gp_matches_fp32(device: str) -> None:
    d, real, fake, alpha = _gp_case(device)
    gp = GradientPenalty(weight=10.0)
    ref = gp(d, real, fake, alpha=alpha)
    # 2^8: a scale training settles on here; at 2^16 the scaled output overflows fp16, the penalty is
    # inf/NaN, and the scaler skips that step and halves the scale (tested in the skipped-step test).
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
    with amp.scaling(scaler), torch.autocast(device, dtype=torch.float16):
        half = gp(d, real, fake, alpha=alpha)
    assert torch.isfinite(half)
    assert half.item() == pytest.approx(ref.item(), rel=1e-2)
    # The penalty's gradient w.r.t. D also agrees (the D step's direction, not only the value).
    params = list(d.parameters())
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)  # the last bias has no input gradient
    g_half = torch.autograd.grad(half, params, allow_unused=True)
    flat_ref, flat_half = (
        torch.cat([(torch.zeros_like(p) if g is None else g.float()).flatten() for g, p in zip(grads, params)])
        for grads in (g_ref, g_half)
    )
    cos = torch.nn.functional.cosine_similarity(flat_ref, flat_half, dim=0)
    assert cos.item() > 0.99


def test_fp16_gradient_penalty_matches_fp32_on_cpu():
    _fp16_gp_matches_fp32("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_gradient_penalty_matches_fp32_on_cuda():
    _fp16_gp_matches_fp32("cuda")


def test_input_gradient_is_unscaled():
    """Inside a phase with a 2^10 scale the gradient penalty sees the true input gradient, not 2^10 times it."""
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    w = torch.tensor([3.0, -4.0])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with amp.scaling(scaler):
        g = amp.input_gradient(x @ w, x)
    assert g.tolist() == [[3.0, -4.0]]
    assert amp.loss_scale(x).item() == 1.0  # no scaler active outside the block


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("experiment", ["dcgan", "wgan_gp"])
def test_mixed_precision_trains_on_cuda(tmp_path, precision, experiment):
    from gantrain.train import train

    cfg = make_cfg(
        f"+experiment={experiment}", "trainer.device=cuda", f"trainer.precision={precision}", "trainer.max_steps=3"
    )
    metrics = train(cfg, tmp_path)
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))


# ----------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("k", [1, 2])
def test_ema_matches_closed_form(tmp_path, k):
    """ema_n = beta^n w_0 + sum_i (1 - beta) beta^(n-i) w_i with beta = 0.5^(images per step / half-life)."""
    half_life, n = 3.0, 6
    seen_by_sampler = []
    trainer, lin = one_weight_trainer(
        tmp_path,
        max_steps=n,
        lr=0.02,
        accumulate_grad_batches=k,
        ema={"half_life_images": half_life},
        sample_every_n_steps=n,
        sampler=lambda: seen_by_sampler.append(lin.weight.item()) or torch.zeros(3, 2, 2),
    )
    weights = _record_after_steps(trainer.phases[0].optimizer, lin.weight)
    trainer.fit()

    beta = 0.5 ** (k / half_life)  # each step draws k images of batch 1
    want = beta**n * 1.0 + sum((1 - beta) * beta ** (n - i) * w for i, w in enumerate(weights, start=1))
    assert trainer.ema.average.weight.item() == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(weights[-1], rel=1e-3)  # the average really lags the weights
    assert seen_by_sampler == [pytest.approx(want, rel=1e-6)]  # grids are drawn with the EMA weights
    assert lin.weight.item() == weights[-1]  # and the live weights come back afterwards
    assert trainer_state(trainer)["ema"]["module"] == ""  # the whole one-weight model is the averaged network
