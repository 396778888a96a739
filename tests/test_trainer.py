"""The phase loop's invariants, asserted with numbers.

Unit tests use a one-weight model stepped by SGD (hand-computable); the gradient-hygiene tests
run the real DCGAN/WGAN-GP recipes built by the entry point.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gantrain.build import build
from gantrain.errors import ConfigError
from gantrain.events import Callback
from gantrain.phase import Phase, Update
from gantrain.runlog import standard_callbacks
from gantrain.trainer import Trainer, TrainerSettings, resolve_device
from tests.conftest import make_cfg


class ListStream:
    """Deterministic batches 1, 2, 3, ... (each a (1,)-tensor), resumable like BatchStream."""

    def __init__(self) -> None:
        self.i = 0

    def __next__(self) -> torch.Tensor:
        self.i += 1
        return torch.tensor([float(self.i)])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, s: dict) -> None:
        self.i = s["i"]


def one_weight_trainer(
    tmp_path, w0=1.0, lr=0.1, optimizer=None, data=None, phase_kw=None, sampler=None, **settings
) -> tuple[Trainer, nn.Linear]:
    """One phase on ``w`` with loss ``(w * x)^2 / 2`` (so d/dw = w * x^2), x = 1, 2, 3, ... by default.

    ``optimizer``: params -> optimizer (default SGD with ``lr``); ``phase_kw``: extra Phase fields.
    """
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(w0)
    phase_kw = dict(phase_kw or {})
    update_fields = ("schedule", "gradient_clip_val", "gradient_clip_algorithm")  # the Update's, not the Phase's
    update_kw = {k: phase_kw.pop(k) for k in update_fields if k in phase_kw}
    phase = Phase(
        "main",
        lin,
        Update((optimizer or (lambda params: torch.optim.SGD(params, lr=lr)))(lin.parameters()), **update_kw),
        lambda x, step: 0.5 * (lin(x) ** 2).sum(),
        counts_as_step=True,
        **phase_kw,
    )
    s = TrainerSettings(device="cpu", progress_bar=False, **settings)
    callbacks = standard_callbacks(s, tmp_path, sampler=sampler)
    trainer = Trainer(s, model=lin, phases=[phase], data=data or ListStream(), callbacks=callbacks)
    return trainer, lin


def test_sgd_steps_match_hand_computation(tmp_path):
    trainer, lin = one_weight_trainer(tmp_path, max_steps=2)
    trainer.fit()
    w = 1.0
    for x in (1.0, 2.0):
        w -= 0.1 * w * x**2
    assert lin.weight.item() == pytest.approx(w, rel=1e-6)  # 1 -> 0.9 -> 0.54


def test_accumulation_averages_micro_batches(tmp_path):
    # k=3 micro-batches x=1,2,3 in one step: grad = w * mean(x^2) = 14/3
    trainer, lin = one_weight_trainer(tmp_path, max_steps=1, accumulate_grad_batches=3)
    trainer.fit()
    assert lin.weight.item() == pytest.approx(1.0 - 0.1 * 14 / 3, rel=1e-6)
    assert trainer.images_seen == 3


def test_gradient_clipping_norm_and_value(tmp_path):
    # x=1, w=5: grad 5, clipped to 2 -> w = 5 - 0.1 * 2; the logged norm is the pre-clip 5.
    for algorithm in ("norm", "value"):
        trainer, lin = one_weight_trainer(
            tmp_path / algorithm, w0=5.0, max_steps=1, gradient_clip_val=2.0, gradient_clip_algorithm=algorithm
        )
        metrics = trainer.fit()
        assert lin.weight.item() == pytest.approx(4.8, rel=1e-6)
        assert metrics["grad_norm/main"] == pytest.approx(5.0)


def test_settings_errors_are_clear():
    # Each names its own key (the entry point puts ``trainer.`` in front, via ConfigError.within).
    with pytest.raises(ConfigError, match=r"^precision='fp16': must be one of 32, bf16-mixed, 16-mixed$"):
        TrainerSettings(precision="fp16")
    with pytest.raises(ConfigError, match=r"^ema.half_life_images=-1: must be >= 0"):
        TrainerSettings(ema={"half_life_images": -1})
    with pytest.raises(ConfigError, match=r"^n_critic=0: must be an integer >= 1$"):
        TrainerSettings(n_critic=0)
    with pytest.raises(ConfigError, match=r"^max_steps=0: must be an integer >= 1$"):
        TrainerSettings(max_steps=0)
    with pytest.raises(ConfigError, match=r"^gradient_clip_algorithm='l2': must be one of norm, value$"):
        TrainerSettings(gradient_clip_algorithm="l2")
    with pytest.raises(ConfigError, match=r"^gradient_clip_val=0: must be > 0 \(or null: no clipping\)$"):
        TrainerSettings(gradient_clip_val=0)
    with pytest.raises(ConfigError, match=r"trainer.device='gpu0' is not a device; use auto, cpu"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match=r"trainer.device='cuda' but CUDA is not available here"):
            resolve_device("cuda")


def test_exactly_one_phase_counts(tmp_path):
    lin = nn.Linear(1, 1)
    ph = Phase("a", lin, torch.optim.SGD(lin.parameters(), lr=0.1), lambda x, step: lin(x).sum())
    with pytest.raises(AssertionError, match="exactly one phase"):
        Trainer(TrainerSettings(), model=lin, phases=[ph], data=ListStream())


# ----------------------------------------------------------------------------- events
class Recorder(Callback):
    """Every event with the trainer's counters at that moment."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.step))

    def on_phase_end(self, trainer, phase):
        self.events.append(("phase_end", phase.name, trainer.iteration, trainer.step))

    def on_step_end(self, trainer):
        self.events.append(("step_end", trainer.step, trainer.iteration, trainer.images_seen))

    def on_fit_end(self, trainer):
        self.events.append(("fit_end", trainer.step))

    def teardown(self, trainer):
        self.events.append(("teardown", trainer.step))


def test_events_fire_once_per_step_in_order(tmp_path):
    trainer, _ = one_weight_trainer(tmp_path, max_steps=4, accumulate_grad_batches=2)
    trainer.callbacks.append(rec := Recorder())
    trainer.fit()
    steps = [e[1:] for e in rec.events if e[0] == "step_end"]
    assert steps == [(s, s, 2 * s) for s in (1, 2, 3, 4)]  # step, iteration, images_seen after each step
    assert rec.events[0] == ("fit_start", 0) and rec.events[-2:] == [("fit_end", 4), ("teardown", 4)]
    # the phase ends before its step is counted: iteration and step still hold the values it ran at
    assert [e for e in rec.events if e[0] == "phase_end"] == [("phase_end", "main", i, i) for i in range(4)]


@pytest.mark.parametrize("n_critic", [1, 3])
def test_phase_end_order_is_d_then_g_with_n_critic(tmp_path, n_critic):
    d, g = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    model = nn.ModuleDict({"d": d, "g": g})
    phases = [
        Phase("D", d, torch.optim.SGD(d.parameters(), lr=0.1), lambda x, step: d(x).sum()),
        Phase("G", g, torch.optim.SGD(g.parameters(), lr=0.1), lambda x, step: g(x).sum(), n_critic, True),
    ]
    rec = Recorder()
    s = TrainerSettings(device="cpu", progress_bar=False, max_steps=2, n_critic=n_critic)
    Trainer(s, model=model, phases=phases, data=ListStream(), callbacks=[rec]).fit()
    ends = [e[1] if e[0] == "phase_end" else e[0] for e in rec.events]
    window = ["D"] * n_critic + ["G", "step_end"]
    assert ends == ["fit_start", *window, *window, "fit_end", "teardown"]
    assert [e[1] for e in rec.events if e[0] == "step_end"] == [1, 2]


def test_a_crash_skips_fit_end_but_tears_down(tmp_path):
    class Crash(Callback):
        def on_step_end(self, trainer):
            if trainer.step == 2:
                raise RuntimeError("boom")

    trainer, _ = one_weight_trainer(tmp_path, max_steps=5)
    trainer.callbacks += [rec := Recorder(), Crash()]
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert [e[0] for e in rec.events][-2:] == ["step_end", "teardown"] and trainer.step == 2


def test_run_phase_is_one_optimizer_step(tmp_path):
    trainer, lin = one_weight_trainer(tmp_path, max_steps=3)
    trainer.run_phase(trainer.phases[0])  # x = 1: w = 1 - 0.1 * 1
    assert lin.weight.item() == pytest.approx(0.9) and trainer.images_seen == 1 and trainer.step == 0


# ----------------------------------------------------------------------------- GAN hygiene
def _snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "experiment,n_critic,reuse",
    [("dcgan", 1, True), ("dcgan", 1, False), ("wgan_gp", 5, True), ("vaegan", 1, False)],
    ids=["dcgan", "dcgan-fresh-fakes", "wgan_gp", "vaegan"],
)
def test_gradient_hygiene_invariants(tmp_path, experiment, n_critic, reuse):
    """With fakes reused (dcgan: the G step backpropagates through the D step's generated batch) and without."""
    cfg = make_cfg(
        f"+experiment={experiment}",
        f"trainer.n_critic={n_critic}",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",
        *([] if experiment == "vaegan" else [f"loss.reuse_fakes={reuse}"]),  # VAE-GAN's G step draws its own
    )
    trainer = build(cfg, tmp_path)
    model = trainer.model
    noise, draws = model.noise, []
    model.noise = lambda *a, **kw: draws.append(1) or noise(*a, **kw)
    next(model.g.parameters()).requires_grad_(False)  # a user-frozen parameter: its flag must come back
    flags0 = [p.requires_grad for p in model.parameters()]
    order, zero_calls, loss_calls = [], [], []

    for phase in trainer.phases:
        other = model.d if phase.name == "G" else model.g

        def loss(batch, step, _phase=phase, _orig=phase.loss, _other=other):
            # While a phase runs: its module trainable, every other parameter frozen.
            assert all(p.requires_grad for p in _phase.module.parameters())
            assert not any(p.requires_grad for p in _other.parameters())
            loss_calls.append(_phase.name)
            return _orig(batch, step)

        def zero_grad(set_to_none=True, _name=phase.name, _orig=phase.optimizer.zero_grad):
            assert set_to_none is True
            zero_calls.append((_name, len(loss_calls)))
            return _orig(set_to_none=set_to_none)

        phase.loss, phase.optimizer.zero_grad = loss, zero_grad

    class Checked(Callback):
        """Snapshots both networks after every event; at each phase end the other network must be unchanged."""

        def on_fit_start(self, trainer):  # keyed by the phase that must not touch that network
            self.before = {"D": _snapshot(model.g), "G": _snapshot(model.d)}

        def on_phase_end(self, trainer, phase):
            other = model.d if phase.name == "G" else model.g
            after = _snapshot(other)
            for name, (p, g) in self.before[phase.name].items():  # the other network: parameters AND grads identical
                assert torch.equal(p, after[name][0]), f"{phase.name} step changed {name}"
                assert (g is None and after[name][1] is None) or torch.equal(g, after[name][1]), (
                    f"{phase.name} step touched {name}.grad"
                )
            assert [p.requires_grad for p in model.parameters()] == flags0, "requires_grad flags not restored"
            order.append(phase.name)
            self.before = {"D": _snapshot(model.g), "G": _snapshot(model.d)}

    trainer.callbacks.append(Checked())
    trainer.fit()

    assert order == (["D"] * n_critic + ["G"]) * 3
    reused = reuse and n_critic == 1
    assert len(draws) == 3 * 2 * (n_critic + (0 if reused else 1))  # 3 steps x 2 micro-batches per phase run
    # zero_grad once per window (2 micro-batches), before that window's first loss call
    assert [n for n, _ in zero_calls] == order
    assert [c for _, c in zero_calls] == [2 * i for i in range(len(order))]
    assert all(p.grad is not None for p in model.d.parameters())  # D grads existed during the G steps


def test_no_retain_graph_in_package():
    from pathlib import Path

    import gantrain

    sources = [p for p in Path(gantrain.__file__).parent.rglob("*.py")]
    offenders = [str(p) for p in sources if "retain_graph" in p.read_text()]
    assert sources and offenders == []
