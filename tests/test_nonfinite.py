"""Non-finite values: ``trainer.on_nonfinite`` (stop | skip), ``max_consecutive_skips``, the fp16 scaler's
streaks, the checkpoint guard, anomaly mode and per-layer gradient norms.

NaNs are injected where a real divergence puts them: into one loss term (the term's own code,
patched for one step), into a gradient (a hook), or into a buffer; the last test diverges for real
through the command line.
"""

from __future__ import annotations

import copy
import logging
import math
import re

import pytest
import torch

from gantrain.build import build
from gantrain.errors import ConfigError, NonFiniteError
from gantrain.events import Callback
from gantrain.losses import BCELoss, GradientPenalty
from gantrain.train import train
from gantrain.trainer import TrainerSettings
from tests.conftest import TINY, TINY_WIDTH, make_cfg
from tests.test_checkpoint import _assert_same_tensors
from tests.test_cli import run_cli


def checkpoint_files(run_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("*"))}


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class AtStep(Callback):
    """Snapshots, after step ``step``, every parameter, optimizer state and the files in ``checkpoints/``."""

    def __init__(self, step: int, run_dir):
        self.step, self.run_dir = step, run_dir

    def on_step_end(self, trainer):  # runs after Checkpointing's (callbacks run in list order)
        if trainer.step == self.step:
            self.params = params(trainer.model)
            self.optimizers = {p.name: copy.deepcopy(p.optimizer.state_dict()) for p in trainer.phases}
            self.files = checkpoint_files(self.run_dir)


def nan_in_adversarial_term(monkeypatch, trainer, phase: str, steps) -> None:
    """``loss/<phase>/adv`` (the BCE term) is NaN in the training steps ``steps`` (1-based)."""
    method = {"D": "d_loss", "G": "g_loss"}[phase]
    original = getattr(BCELoss, method)

    def term(self, *args):
        value = original(self, *args)
        return value * math.nan if trainer.step + 1 in steps else value

    monkeypatch.setattr(BCELoss, method, term)


def test_stop_names_step_phase_and_term_keeps_weights_and_checkpoints(tmp_path, monkeypatch, one_thread):
    """WGAN-GP, NaN in the gradient penalty at step 3: one line; the weights of step 2 and its checkpoint intact."""
    k = 3
    trainer = build(
        make_cfg("+experiment=wgan_gp", "trainer.max_steps=5", "trainer.checkpoint_every_n_steps=1"), tmp_path
    )
    penalty = GradientPenalty.__call__
    monkeypatch.setattr(
        GradientPenalty, "__call__", lambda self, *a: penalty(self, *a) * (math.nan if trainer.step == k - 1 else 1)
    )
    trainer.callbacks.append(before := AtStep(k - 1, tmp_path))
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    message = str(error.value)
    assert message.startswith(f"step {k}, phase D: loss/D/gp is nan; this update was not applied")
    assert "\n" not in message and "trainer.on_nonfinite=skip" in message
    assert trainer.step == k - 1
    _assert_same_tensors(before.params, params(trainer.model), "params")
    _assert_same_tensors(before.optimizers, {p.name: p.optimizer.state_dict() for p in trainer.phases}, "optimizers")
    assert before.files and checkpoint_files(tmp_path) == before.files  # last.ckpt of step 2, byte for byte


@pytest.mark.parametrize("phase", ["D", "G"])
def test_skip_drops_transient_nan_steps_and_continues(tmp_path, monkeypatch, caplog, phase):
    """NaN in ``phase``'s term at steps 2, 4 and 5 (at most 2 in a row, limit 3): all dropped, the run finishes.

    A dropped step changes neither the phase's weights nor its optimizer state, nor the EMA, nor runs
    ``after_step``; the LR scheduler still steps (documented: the schedule follows the step count).
    """
    net = phase.lower()
    cfg = make_cfg(
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=6",  # one mean over the run: finite only if the dropped steps' values are not in it
        "trainer.on_nonfinite=skip",
        "trainer.max_consecutive_skips=3",
        "trainer.ema.half_life_images=20",
        f"optim.{net}.schedule.kind=linear",
    )
    trainer = build(cfg, tmp_path)
    dropped = (2, 4, 5)
    nan_in_adversarial_term(monkeypatch, trainer, phase, steps=dropped)
    d_phase = trainer.phases[0]
    after_d_steps = []
    d_phase.after_step = lambda _f=d_phase.after_step: after_d_steps.append(trainer.step) or _f()

    watched = next(p for p in trainer.phases if p.name == phase)

    class Record(Callback):
        """(step, state before, state after) of each run of the watched phase: its weights, its optimizer
        state and the EMA, snapshotted at the previous event (the other phase's end, or the start)."""

        def __init__(self):
            self.runs, self.last = [], None

        def snapshot(self, trainer):
            state = copy.deepcopy(watched.optimizer.state_dict()["state"])
            return params(watched.module), state, params(trainer.ema.average)

        def on_fit_start(self, trainer):
            self.last = self.snapshot(trainer)

        def on_phase_end(self, trainer, ran):
            now = self.snapshot(trainer)
            if ran is watched:
                self.runs.append((trainer.step + 1, self.last, now))
            self.last = now

    trainer.callbacks.append(record := Record())
    with caplog.at_level(logging.WARNING, logger="gantrain.trainer"):
        metrics = trainer.fit()

    assert trainer.step == 6 and trainer.guard.nonfinite_skips == {"D": 0, "G": 0} | {phase: 3}
    assert metrics[f"nonfinite/skipped_steps/{phase}"] == 3 and math.isfinite(metrics[f"loss/{phase}"])
    assert [step for step, _, _ in record.runs] == [1, 2, 3, 4, 5, 6]
    for step, before, after in record.runs:
        if step in dropped:
            _assert_same_tensors(before, after, f"step {step}")
        else:  # an applied step changes the weights (so the comparison above can fail)
            assert any(not torch.equal(before[0][n], after[0][n]) for n in before[0]), step
    assert trainer.schedulers[phase].last_epoch == 6  # stepped for the dropped steps too
    assert after_d_steps == ([0, 2, 5] if phase == "D" else [0, 1, 2, 3, 4, 5])  # trainer.step: completed steps
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == [
        f"step {s}, phase {phase}: loss/{phase}/adv is nan; step skipped ({n} so far: nonfinite/skipped_steps/{phase})"
        for n, s in enumerate(dropped, start=1)
    ]
    path = trainer.callbacks[0].path  # the checkpoint keeps the counts
    assert torch.load(path, weights_only=False)["guard"]["nonfinite_skips"] == {"D": 0, "G": 0} | {phase: 3}


def test_skip_stops_after_max_consecutive_skips(tmp_path, monkeypatch):
    trainer = build(
        make_cfg("trainer.max_steps=8", "trainer.on_nonfinite=skip", "trainer.max_consecutive_skips=3"), tmp_path
    )
    nan_in_adversarial_term(monkeypatch, trainer, "D", steps=range(2, 9))
    trainer.callbacks.append(before := AtStep(1, tmp_path))
    with pytest.raises(
        NonFiniteError,
        match=r"^step 4, phase D: 3 optimizer steps in a row skipped \(trainer.max_consecutive_skips=3\), "
        r"the last because loss/D/adv is nan; ",
    ):
        trainer.fit()
    assert trainer.guard.nonfinite_skips["D"] == 3 and trainer.step == 3
    _assert_same_tensors(before.params["d.body.0.weight"], trainer.model.d.body[0].weight, "D untouched")


def test_a_nan_gradient_with_finite_losses_is_caught(tmp_path):
    trainer = build(make_cfg("trainer.max_steps=3"), tmp_path)
    first = trainer.model.d.body[0].weight
    first.register_hook(lambda g: g * math.nan if trainer.step == 1 else g)
    with pytest.raises(
        NonFiniteError,
        match=r"^step 2, phase D: grad_norm/D is nan \(first non-finite gradient: body.0.weight\); this update",
    ):
        trainer.fit()


def test_fp16_scaler_streak_stops_the_run(tmp_path, one_thread):
    """A D loss scale so large that every fp16 D gradient overflows: 3 skipped steps in a row stop the run."""
    cfg = make_cfg("trainer.precision=16-mixed", "trainer.max_steps=5", "trainer.max_consecutive_skips=3")
    trainer = build(cfg, tmp_path)
    trainer.scalers["D"] = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    d0 = params(trainer.model.d)
    with pytest.raises(
        NonFiniteError,
        match=r"^step 3, phase D: 3 optimizer steps in a row skipped \(trainer.max_consecutive_skips=3\), the last "
        r"because the fp16 loss scale kept overflowing \(now 1.44115e\+17\); ",  # 2^60 halved three times
    ):
        trainer.fit()
    assert trainer.guard.skipped_steps["D"] == 3 and trainer.guard.nonfinite_skips["D"] == 0
    _assert_same_tensors(d0, params(trainer.model.d), "D")


def test_fp16_input_gradient_overflow_is_the_scalers_not_a_stop(tmp_path, one_thread):
    """WGAN-GP under fp16: the gradient penalty's scaled input gradient overflows at the start (the penalty
    is NaN); the scaler skips those D steps and backs off, and ``stop`` does not stop the run."""
    metrics = train(make_cfg("+experiment=wgan_gp", "trainer.precision=16-mixed", "trainer.max_steps=2"), tmp_path)
    assert metrics["step"] == 2
    assert metrics["amp/skipped_steps/D"] >= 1 and metrics["amp/scale/D"] < 2.0**16


@pytest.mark.parametrize("where", ["model", "EMA"])
def test_no_checkpoint_with_a_nonfinite_buffer(tmp_path, where):
    cfg = make_cfg("trainer.max_steps=3", "trainer.checkpoint_every_n_steps=1", "trainer.ema.half_life_images=20")
    trainer = build(cfg, tmp_path)

    class Poison(Callback):
        def on_phase_end(self, trainer, phase):  # before step 2's checkpoint
            if phase.name == "G" and trainer.step == 1:
                net = trainer.model.g if where == "model" else trainer.ema.average
                net.net[1].running_var[0] = math.nan

    trainer.callbacks += [before := AtStep(1, tmp_path), Poison()]
    name = "model g.net.1.running_var" if where == "model" else "EMA net.1.running_var"
    with pytest.raises(NonFiniteError, match=rf"^step 2: {name} holds NaN/inf, so .*last.ckpt was not written"):
        trainer.fit()
    assert before.files and checkpoint_files(tmp_path) == before.files


@pytest.mark.filterwarnings("ignore:Error detected in SqrtBackward0")  # autograd's trace of the forward call
def test_detect_anomaly_changes_nothing_and_names_the_op(tmp_path, monkeypatch, caplog):
    common = ("trainer.max_steps=2",)
    plain = build(make_cfg(*common), tmp_path / "plain")
    plain.fit()
    with caplog.at_level(logging.WARNING, logger="gantrain.trainer"):
        anomaly = build(make_cfg(*common, "trainer.detect_anomaly=true"), tmp_path / "anomaly")
        anomaly.fit()
    assert [r.getMessage() for r in caplog.records if "anomaly" in r.getMessage()] == [
        "trainer.detect_anomaly=true: autograd's anomaly mode makes every step several times slower"
    ]
    _assert_same_tensors(params(plain.model), params(anomaly.model), "params")

    d_loss = BCELoss.d_loss  # a NaN made in the forward pass of step 2: the error names the backward op
    monkeypatch.setattr(BCELoss, "d_loss", lambda self, *a: d_loss(self, *a) + torch.sqrt(-d_loss(self, *a)))
    trainer = build(make_cfg(*common, "trainer.detect_anomaly=true"), tmp_path / "nan")
    with pytest.raises(
        NonFiniteError, match=r"^step 1, phase D: trainer.detect_anomaly: Function 'SqrtBackward0' returned nan"
    ):
        trainer.fit()


def test_layer_grad_norms_are_each_parameters_pre_clip_norm(tmp_path):
    cfg = make_cfg("trainer.max_steps=1", "trainer.log_grad_norms=layer", "trainer.gradient_clip_val=1e-3")
    trainer = build(cfg, tmp_path)
    by_hand = {}
    for phase in trainer.phases:  # each phase runs once: its logged mean is that step's norm
        named = list(phase.module.named_parameters())
        # before clipping: a gradient hook sees the gradient as backward leaves it
        for name, p in named:
            p.register_hook(lambda g, key=f"grad_norm/{phase.name}/{name}": by_hand.__setitem__(key, g.norm().item()))
    metrics = trainer.fit()
    layers = {k: v for k, v in metrics.items() if k.count("/") == 2 and k.startswith("grad_norm/")}
    names = {f"grad_norm/{p.name}/{n}" for p in trainer.phases for n, _ in p.module.named_parameters()}
    assert set(layers) == names == set(by_hand)
    for key, value in layers.items():
        assert value == pytest.approx(by_hand[key], rel=1e-5), key
    for phase in ("D", "G"):
        total = math.sqrt(sum(v**2 for k, v in layers.items() if k.startswith(f"grad_norm/{phase}/")))
        assert metrics[f"grad_norm/{phase}"] == pytest.approx(total, rel=1e-5) and total > 1e-3  # clipping was on
    total_only = train(make_cfg("trainer.max_steps=1"), tmp_path / "total")
    assert not [k for k in total_only if k.count("/") == 2 and k.startswith("grad_norm/")]


def test_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^on_nonfinite='ignore': must be one of stop, skip$"):
        TrainerSettings(on_nonfinite="ignore")
    with pytest.raises(ConfigError, match=r"^max_consecutive_skips=0: must be an integer >= 1"):
        TrainerSettings(max_consecutive_skips=0)
    with pytest.raises(ConfigError, match=r"^log_grad_norms='params': must be one of total, layer$"):
        TrainerSettings(log_grad_norms="params")


def test_cli_stop_is_one_line_and_leaves_the_checkpoint(tmp_path):
    """A run that really diverges (SGD at lr 1e4, no normalization) resumed from its step-1 checkpoint:
    exit 1 at step 2, one line naming the step and the term, no traceback, last.ckpt byte-identical."""
    args = ["model.g.norm=none", "model.d.norm=none", "optim=sgd", "optim.d.lr=1e4", "optim.g.lr=1e4"]
    run = tmp_path / "run"
    train(make_cfg(*args, "trainer.max_steps=1"), run)  # the earlier checkpoint, at step 1
    before = checkpoint_files(run)
    resume = ["trainer.max_steps=10", "trainer.resume=auto", f"hydra.run.dir={run}"]
    r = run_cli([*TINY, *TINY_WIDTH["ngf"], *args, *resume], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and re.search(r"\] - step 2, phase G: loss/G/adv is nan; this update was not", errors[0])
    assert before == checkpoint_files(run) and list(before) == ["last.ckpt"]
