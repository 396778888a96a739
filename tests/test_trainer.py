"""The phase loop's invariants, asserted with numbers.

Unit tests use a one-weight model stepped by SGD (hand-computable); the gradient-hygiene tests
run the real DCGAN/WGAN-GP recipes built by the entry point.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gantrain.errors import ConfigError
from gantrain.phase import Phase
from gantrain.train import build
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
    phase = Phase(
        "main",
        lin,
        (optimizer or (lambda params: torch.optim.SGD(params, lr=lr)))(lin.parameters()),
        lambda x, step: 0.5 * (lin(x) ** 2).sum(),
        counts_as_step=True,
        **(phase_kw or {}),
    )
    s = TrainerSettings(device="cpu", progress_bar=False, **settings)
    trainer = Trainer(s, model=lin, phases=[phase], data=data or ListStream(), run_dir=tmp_path, sampler=sampler)
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
    with pytest.raises(ConfigError, match=r"trainer.precision='fp16'; allowed: 32, bf16-mixed, 16-mixed"):
        TrainerSettings(precision="fp16")
    with pytest.raises(ConfigError, match=r"trainer.ema.half_life_images=-1: must be >= 0"):
        TrainerSettings(ema={"half_life_images": -1})
    with pytest.raises(ConfigError, match=r"trainer.n_critic=0: must be >= 1"):
        TrainerSettings(n_critic=0)
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_algorithm='l2'; allowed: norm, value"):
        TrainerSettings(gradient_clip_algorithm="l2")
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
        Trainer(TrainerSettings(), model=lin, phases=[ph], data=ListStream(), run_dir=tmp_path)


# ----------------------------------------------------------------------------- GAN hygiene
def _snapshot(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


@pytest.mark.parametrize("experiment,n_critic", [("dcgan", 1), ("wgan_gp", 5), ("vaegan", 1)])
def test_gradient_hygiene_invariants(tmp_path, experiment, n_critic):
    cfg = make_cfg(
        f"+experiment={experiment}",
        f"trainer.n_critic={n_critic}",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",
    )
    trainer = build(cfg, tmp_path)
    model = trainer.model
    next(model.g.parameters()).requires_grad_(False)  # a user-frozen parameter: its flag must come back
    flags0 = [p.requires_grad for p in model.parameters()]
    order, zero_calls, loss_calls = [], [], []

    for phase in trainer.phases:
        other = model.d if phase.name == "G" else model.g

        def loss(real, step, _phase=phase, _orig=phase.loss, _other=other):
            # While a phase runs: its module trainable, every other parameter frozen.
            assert all(p.requires_grad for p in _phase.module.parameters())
            assert not any(p.requires_grad for p in _other.parameters())
            loss_calls.append(_phase.name)
            return _orig(real, step)

        def zero_grad(set_to_none=True, _name=phase.name, _orig=phase.optimizer.zero_grad):
            assert set_to_none is True
            zero_calls.append((_name, len(loss_calls)))
            return _orig(set_to_none=set_to_none)

        phase.loss, phase.optimizer.zero_grad = loss, zero_grad

    run_phase = trainer._run_phase

    def checked_run(phase):
        other = model.d if phase.name == "G" else model.g
        before = _snapshot(other)
        run_phase(phase)
        after = _snapshot(other)
        for name, (p, g) in before.items():  # the other network: parameters AND grads bit-identical
            assert torch.equal(p, after[name][0]), f"{phase.name} step changed {name}"
            assert (g is None and after[name][1] is None) or torch.equal(g, after[name][1]), (
                f"{phase.name} step touched {name}.grad"
            )
        assert [p.requires_grad for p in model.parameters()] == flags0, "requires_grad flags not restored"
        order.append(phase.name)

    trainer._run_phase = checked_run
    trainer.fit()

    assert order == (["D"] * n_critic + ["G"]) * 3
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
