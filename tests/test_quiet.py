"""Issue 26, item 6: a warning only where the user can act on it. A recipe whose model has no D says nothing about
``optim.d``; a resume with a longer ``trainer.max_steps`` warns about the LR horizon only for schedules that end there
(cosine, linear). The lines stay where they mean something."""

from __future__ import annotations

import logging

import pytest

from gantrain.build import build
from gantrain.train import train
from tests.conftest import make_cfg


def test_a_vae_without_d_says_nothing_about_optim_d(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gantrain"):
        build(make_cfg("+experiment=vae_mlp"), tmp_path)
    assert "optim" in make_cfg("+experiment=vae_mlp") and "d" in make_cfg("+experiment=vae_mlp").optim
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


def test_a_d_the_loss_does_not_train_is_still_named(tmp_path, caplog):
    """The VAE-GAN model has a D; a plain VAE loss leaves it untrained: that is worth a line (pick loss=vaegan)."""
    with caplog.at_level(logging.INFO, logger="gantrain"):
        build(make_cfg("+experiment=vaegan", "loss=vae"), tmp_path)
    assert "optim.d: not used, VAEObjective trains only ['g']" in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "kind, warned",
    [("constant", False), ("step", False), ("exponential", False), ("cosine", True), ("linear", True)],
)
def test_lr_horizon_warning_only_for_schedules_that_end_there(tmp_path, caplog, one_thread, kind, warned):
    schedule = [f"optim.g.schedule.kind={kind}", f"optim.d.schedule.kind={kind}"]
    train(make_cfg(*schedule, "trainer.max_steps=2"), tmp_path)
    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg(*schedule, "trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    assert metrics["step"] == 3
    horizon = [r.getMessage() for r in caplog.records if "horizon" in r.getMessage()]
    expected = "trainer.resume: trainer.max_steps changed from 2 to 3; the LR schedules of D/G keep the checkpoint's "
    assert horizon == ([expected + "horizon (2 steps)"] if warned else []), horizon
