"""LeCam regularisation (Tseng et al. 2021), ``loss.lecam``: the penalty by hand over scripted D outputs (the moving
averages included), its gradient reaches D only, its averages are state that survives SIGTERM + resume bit-exactly,
and every GAN loss option has the slot."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from gantrain.batch import Batch
from gantrain.checkpoint import Checkpointing
from gantrain.errors import ConfigError
from gantrain.losses import BCELoss, LeCamPenalty
from gantrain.objectives import GANObjective
from gantrain.train import Interrupted, train
from tests.conftest import make_cfg
from tests.test_checkpoint import _assert_same_tensors
from tests.test_long_runs import _assert_same_state, _ckpt
from tests.test_losses import _tiny_gan

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def mean(v) -> float:
    return sum(v) / len(v)


def by_hand(real, fake, alpha_real: float, alpha_fake: float, one_sided: bool = False) -> float:
    """weight 1: mean((D(x) - α_F)²) + mean((α_R - D(G(z)))²), each gap clipped at 0 when one-sided."""
    clip = (lambda g: max(g, 0.0)) if one_sided else (lambda g: g)
    return mean([clip(r - alpha_fake) ** 2 for r in real]) + mean([clip(alpha_real - f) ** 2 for f in fake])


@pytest.mark.parametrize("one_sided", [False, True])
def test_the_penalty_and_its_averages_match_a_hand_computation(one_sided):
    """Step 0: no average yet, term 0. Step 1 (two micro-batches): anchors = step 0's means. Step 2: the zero-debiased
    average of steps 0 and 1, each step's mean the mean of its micro-batches' means. A skipped step (no after_step)
    leaves the averages as they were."""
    d, w = 0.9, 0.5
    pen = LeCamPenalty(weight=w, decay=d, one_sided=one_sided)
    r0, f0 = [1.0, 3.0], [-2.0, 0.0]
    assert pen.outputs(T(*r0), T(*f0), 0).item() == 0.0 and pen.anchors() is None
    pen.after_step(None)
    a0 = (mean(r0), mean(f0))  # (2.0, -1.0)
    assert pen.anchors().tolist() == pytest.approx(a0, rel=1e-12)
    steps1 = [([0.0, 4.0, -1.0], [1.0, -3.0, 0.5]), ([2.0, 2.5, 0.5], [-4.0, 2.0, 1.0])]
    for r, f in steps1:
        assert pen.outputs(T(*r), T(*f), 1).item() == pytest.approx(w * by_hand(r, f, *a0, one_sided), rel=1e-12)
    pen.after_step(None)
    a1 = (mean([mean(r) for r, _ in steps1]), mean([mean(f) for _, f in steps1]))
    a = tuple((d * x0 + x1) / (1 + d) for x0, x1 in zip(a0, a1))  # ((1-d)(d a0 + a1)) / (1 - d²)
    assert pen.anchors().tolist() == pytest.approx(a, rel=1e-12) and pen.steps == 2
    r2, f2 = [1.5, -0.5, 3.0, 2.0], [0.0, -1.0, 2.5, -2.0]
    assert pen.outputs(T(*r2), T(*f2), 2).item() == pytest.approx(w * by_hand(r2, f2, *a, one_sided), rel=1e-12)
    pen.outputs(T(100.0), T(-100.0), 3)  # step 3 is skipped (a non-finite loss): no after_step
    pen.outputs(T(*r2), T(*f2), 4)
    pen.after_step(None)  # folds step 4 alone
    want = tuple((d * d * x0 + d * x1 + x2) / (1 + d + d * d) for x0, x1, x2 in zip(a0, a1, (mean(r2), mean(f2))))
    assert pen.anchors().tolist() == pytest.approx(want, rel=1e-12) and pen.steps == 3


def test_a_half_precision_output_is_penalised_in_float32():
    pen = LeCamPenalty(weight=1.0)
    pen.outputs(torch.zeros(2), torch.zeros(2), 0)
    pen.after_step(None)
    term = pen.outputs(torch.full((2,), 300.0, dtype=torch.float16), torch.zeros(2, dtype=torch.float16), 1)
    assert term.dtype == torch.float32 and term.item() == 300.0**2


def test_the_term_reaches_d_only_and_adds_to_the_d_loss():
    """Through GANObjective.d_loss: loss/D/lecam is the hand value from D's own outputs, G gets no gradient, D's
    gradient changes."""
    from gantrain.stats import Collector, collecting

    model, real = _tiny_gan(), torch.randn(4, 1, 8, 8)

    def d_step(objective: GANObjective) -> tuple[dict, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with collecting(Collector()) as c:
            objective.d_loss(model, Batch(real), step=1).backward()
        assert all(p.grad is None for p in model.g.parameters()), "the D loss must not reach G"
        return c.drain(), [p.grad.clone() for p in model.d.parameters()]

    pen = LeCamPenalty(weight=2.0)
    pen.load_state_dict({"ema": T(0.3, -0.2).float() * (1 - 0.99), "steps": 1})  # anchors (0.3, -0.2)
    stats, with_lecam = d_step(GANObjective(BCELoss(), lecam=pen))
    _, without = d_step(GANObjective(BCELoss()))
    torch.manual_seed(1)
    with torch.no_grad():
        fake = model.generate(model.prior(4, "cpu"))
        r, f = model.d(real).tolist(), model.d(fake).tolist()
    assert stats["loss/D/lecam"] == pytest.approx(2.0 * by_hand(r, f, 0.3, -0.2), rel=1e-5)
    assert stats["loss/D"] == pytest.approx(stats["loss/D/adv"] + stats["loss/D/lecam"], rel=1e-5)
    assert any(not torch.allclose(a, b) for a, b in zip(with_lecam, without)), "LeCam must change D's gradient"


def test_state_dict_round_trip():
    pen = LeCamPenalty(weight=1.0, decay=0.9)
    for step, (r, f) in enumerate([(T(1.0, 2.0), T(0.0, -1.0)), (T(3.0), T(-2.0))]):
        pen.outputs(r, f, step)
        pen.after_step(None)
    saved = pen.state_dict()
    other = LeCamPenalty(weight=1.0, decay=0.9)
    other.load_state_dict(saved)
    assert torch.equal(other.anchors(), pen.anchors()) and other.steps == pen.steps == 2
    r, f = T(0.5, 1.5), T(-0.5, 2.0)
    assert torch.equal(other.outputs(r, f, 2), pen.outputs(r, f, 2))
    saved["ema"].add_(1.0)  # a snapshot: the penalty's own averages do not move with it
    assert not torch.equal(pen.state_dict()["ema"], saved["ema"])
    assert LeCamPenalty().state_dict() == {"ema": None, "steps": 0}


def test_every_gan_loss_option_has_the_slot_and_registers_its_state():
    for loss in ("bce", "hinge", "wasserstein", "wgan_gp", "lsgan", "ragan", "rpgan", "vaegan"):
        model = ["+experiment=vaegan"] if loss == "vaegan" else []
        cfg = make_cfg(*model, f"loss={loss}", "loss.lecam.weight=0.3", "loss.lecam.decay=0.9")
        assert cfg.loss.lecam.one_sided is False
        objective = instantiate(cfg.loss)
        assert objective.penalties["lecam"].decay == 0.9 and objective.penalties["lecam"].weight == 0.3
        assert list(objective.state_parts()) == ["loss.lecam"]
    assert "lecam" not in instantiate(make_cfg("loss=bce").loss).penalties  # off by default
    with pytest.raises(ConfigCompositionException, match="Could not override 'loss.lecam.weight'"):  # a VAE: no D
        make_cfg("+experiment=vae", "loss.lecam.weight=1")
    with pytest.raises(ConfigError, match=r"^decay=1.0: must be >= 0 and < 1"):
        LeCamPenalty(decay=1.0)


LECAM_RUN = ["loss.lecam.weight=0.5", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1000"]


def test_sigterm_and_resume_continue_the_averages_bit_exactly(tmp_path, monkeypatch, one_thread):
    """A run stopped by SIGTERM after step 3 and resumed ends where the uninterrupted run does: the same averages
    (bit for bit) and the same weights, optimizer states and RNG."""
    train(make_cfg(*LECAM_RUN), tmp_path / "straight")
    on_step_end = Checkpointing.on_step_end

    def signal_at_step_3(self, trainer):
        on_step_end(self, trainer)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Checkpointing, "on_step_end", signal_at_step_3)
    with pytest.raises(Interrupted):
        train(make_cfg(*LECAM_RUN), tmp_path / "run")
    stopped = _ckpt(tmp_path / "run")
    assert stopped["step"] == 3 and stopped["loss.lecam"]["steps"] == 3
    monkeypatch.setattr(Checkpointing, "on_step_end", on_step_end)
    train(make_cfg(*LECAM_RUN, "trainer.resume=auto"), tmp_path / "run")
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "run")
    assert a["loss.lecam"]["steps"] == b["loss.lecam"]["steps"] == 6
    _assert_same_tensors(a["loss.lecam"]["ema"], b["loss.lecam"]["ema"], "loss.lecam")
    _assert_same_state(a, b)
