"""Readable without a terminal (issue 11, item 6): plain progress lines when stdout is not a terminal,
no progress-bar debris in redirected output, a bar that fits 80 columns, and a last line that says
where the run's files are."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from gantrain import runlog
from gantrain.build import build
from gantrain.cadence import Cadence
from gantrain.data.stream import stack
from gantrain.errors import ConfigError
from gantrain.runlog import RunLog
from gantrain.stats import Collector
from gantrain.trainer import TrainerSettings
from tests.conftest import TINY, TINY_WIDTH, make_cfg

PROGRESS = re.compile(r"step (\d+)/(\d+): loss/D=\S+, loss/G=\S+, \d+ img/s, ETA \d+:\d\d:\d\d$")


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal (what a console's stdout/stderr are)."""

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fake_trainer(**settings) -> SimpleNamespace:
    """What RunLog reads of a Trainer, without a model."""
    s = TrainerSettings(device="cpu", **settings)
    return SimpleNamespace(
        settings=s,
        cadence=Cadence.of(s, [SimpleNamespace(name="G", interval=1, counts_as_step=True)]),
        step=0,
        images_seen=0,
        collector=Collector(),
        scalers={},
        guard=SimpleNamespace(skipped_steps={}, nonfinite_skips={}),
        callbacks=[],
        stop_reason=None,
    )


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gantrain.runlog"]


def progress_steps(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in map(PROGRESS.search, lines) if m]


# ----------------------------------------------------------------------------- acceptance 6: a redirected run
def test_redirected_run_logs_plain_progress_lines_and_no_carriage_returns(tmp_path):
    """``python -m gantrain ... > out.txt 2>&1`` (the default progress_bar=true): a line every 10 steps,
    no ``\\r`` anywhere, the same lines in train.log, and a last line naming the run's files."""
    run, out = tmp_path.resolve() / "run", tmp_path / "out.txt"
    overrides = [
        *TINY,
        *TINY_WIDTH["ngf"],
        "trainer.progress_bar=true",
        "trainer.max_steps=30",
        "trainer.log_every_n_steps=10",
        "trainer.log_every_n_seconds=0",
        "trainer.sample_every_n_steps=20",  # grids at 20 and at the end (30): the last line names 30's
        f"hydra.run.dir={run}",
    ]
    with out.open("wb") as f:
        r = subprocess.run(
            [sys.executable, "-m", "gantrain", *overrides],
            cwd=tmp_path,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            timeout=300,
        )
    raw = out.read_bytes()
    assert r.returncode == 0, raw.decode()[-3000:]
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    assert progress_steps(lines) == [10, 20, 30], lines
    assert all(m.group(2) == "30" for m in map(PROGRESS.search, lines) if m)
    last = lines[-1]
    ckpt, grid = run / "checkpoints" / "last.ckpt", run / "samples" / "step_0000030.png"
    assert "finished at step 30: " in last, lines
    assert f"run directory {run}," in last
    assert f"checkpoint {ckpt}," in last and ckpt.is_file()
    assert f"samples {grid};" in last and grid.is_file()
    assert last.endswith(f"tensorboard --logdir {run}")
    logged = (run / "train.log").read_text().splitlines()
    ours = [line for line in lines if PROGRESS.search(line) or "finished at step" in line]
    assert [line for line in logged if line in ours] == ours


def test_loading_images_bar_only_on_a_terminal(monkeypatch):
    """The "loading images" bar writes to stderr: nothing at all when stderr is a file, a bar on a terminal."""

    class Images(Dataset):
        def __len__(self) -> int:
            return 5001  # above the bar's threshold

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.full((1, 2, 2), float(i))

    for stream, shows_bar in ((io.StringIO(), False), (FakeTTY(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        data = stack(Images(), torch.device("cpu"), num_workers=0, seed=0)
        assert data.shape == (5001, 1, 2, 2) and data[5000, 0, 0, 0] == 5000
        assert ("loading images" in stream.getvalue()) == shows_bar


# ----------------------------------------------------------------------------- the bar in 80 columns
@pytest.mark.parametrize(
    "losses, shown",
    [
        ({"loss/D": -1234.5, "loss/D/gp": 1.0, "loss/G": -1.2345e-5}, "D=-1.23e+03 G=-1.23e-05"),  # GAN, widest numbers
        (
            {"loss/recon": 98.71, "loss/recon/bce": 98.71, "loss/kl": 25.31, "loss/VAE": 124.0},
            "recon=98.7 kl=25.3 VAE=124",
        ),
        (
            {"loss/recon": 98.71, "loss/kl": 25.31, "loss/G": -12.34, "loss/D": 0.6931},
            "recon=98.7 kl=25.3 G=-12.3 D=0.693",
        ),
    ],
    ids=["gan", "vae", "vaegan"],
)
def test_bar_fits_an_80_column_terminal(tmp_path, monkeypatch, losses, shown):
    """Step 12345 of 100000, hours left, 5-6 digit images/s: the whole postfix shows and the line fits."""
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((80, 24)))
    clock, trainer = Clock(), fake_trainer(max_steps=100_000)
    log = RunLog(tmp_path, terminal=True, clock=clock)
    log.on_fit_start(trainer)
    for name, value in losses.items():
        trainer.collector.add(name, value)
    clock.t, trainer.images_seen = 1.0, 123_456
    log.log_stats(trainer)
    line = log.bar.format_meter(**{**log.bar.format_dict, "n": 12_345, "elapsed": 5000.0})
    log.teardown(trainer)
    assert len(line) <= 80, line
    assert line.startswith("12345/100000 |") and "| ETA 9:51:4" in line, line
    assert line.endswith(f", {shown} 123456 img/s"), line  # nothing cut off


# ----------------------------------------------------------------------------- plain lines: when and what
def run_fake(log: RunLog, trainer, clock: Clock, seconds_per_step: float) -> None:
    """``max_steps`` steps of ``seconds_per_step`` each, 64 images a step, loss/D=0.5, loss/G=2."""
    log.on_fit_start(trainer)
    for _ in range(trainer.settings.max_steps):
        clock.t += seconds_per_step
        trainer.step, trainer.images_seen = trainer.step + 1, trainer.images_seen + 64
        for name, value in (("loss/D", 0.5), ("loss/D/gp", 9.0), ("loss/G", 2.0)):
            trainer.collector.add(name, value)
        log.on_step_end(trainer)
    log.on_fit_end(trainer)
    log.teardown(trainer)


@pytest.mark.parametrize(
    "max_steps, seconds, expected",
    [
        (21, 30.0, [2, 10, 18, 21]),  # first, then one per >= 30 s (a log step every 8 s), and the final step
        (20, 30.0, [2, 10, 18, 20]),  # the final step was a log step held back by the rate limit: logged at the end
        (20, 0.0, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]),  # 0: every log step
    ],
)
def test_plain_lines_at_most_one_per_interval(tmp_path, caplog, max_steps, seconds, expected):
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    clock = Clock()
    trainer = fake_trainer(max_steps=max_steps, log_every_n_steps=2, log_every_n_seconds=seconds)
    run_fake(RunLog(tmp_path, terminal=False, clock=clock), trainer, clock, seconds_per_step=4.0)
    lines = messages(caplog)
    assert progress_steps(lines) == expected, lines
    # 4 s a step: 10 steps left -> 40 s; 2 steps x 64 images in the 8 s since the last log -> 16 img/s.
    if 10 in expected:
        assert f"step 10/{max_steps}: loss/D=0.5, loss/G=2, 16 img/s, ETA 0:00:{4 * (max_steps - 10)}" in lines
    assert lines[-1] == f"finished at step {max_steps}: run directory {tmp_path.resolve()}; view with: " + (
        f"tensorboard --logdir {tmp_path.resolve()}"
    )


@pytest.mark.parametrize(
    "terminal, progress_bar, is_main, lines",
    [
        (True, True, True, "file"),  # the bar is the display: the lines go to train.log only
        (True, False, True, "console"),  # progress_bar=false on a terminal: plain lines
        (False, True, True, "console"),  # redirected: plain lines, the bar stays off
        (False, False, False, None),  # other ranks log nothing
    ],
)
def test_plain_lines_or_bar(tmp_path, caplog, monkeypatch, terminal, progress_bar, is_main, lines):
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    bar_stream = FakeTTY()
    monkeypatch.setattr(sys, "stderr", bar_stream)
    clock, trainer = (
        Clock(),
        fake_trainer(max_steps=6, progress_bar=progress_bar, log_every_n_steps=1, log_every_n_seconds=0),
    )
    run_fake(RunLog(tmp_path, terminal=terminal, clock=clock, is_main=is_main), trainer, clock, seconds_per_step=1.0)
    logged = messages(caplog)
    assert progress_steps(logged) == ([1, 2, 3, 4, 5, 6] if lines else [])
    file_only = [r.getMessage() for r in caplog.records if getattr(r, "gantrain_file_only", False)]
    assert progress_steps(file_only) == ([1, 2, 3, 4, 5, 6] if lines == "file" else [])
    assert ("ETA" in bar_stream.getvalue()) == (terminal and progress_bar and is_main)
    assert any(m.startswith("finished at step 6") for m in logged) == is_main


def test_terminal_means_stdout_and_stderr(monkeypatch):
    """The bar (stderr) and the console log (stdout) must both be terminals, else plain lines."""
    for out, err, expected in (
        (FakeTTY(), FakeTTY(), True),
        (io.StringIO(), FakeTTY(), False),
        (FakeTTY(), io.StringIO(), False),
    ):
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert runlog.console_is_terminal() == expected


def test_log_every_n_seconds_is_checked():
    with pytest.raises(ConfigError, match=r"^log_every_n_seconds=-1: must be >= 0"):
        TrainerSettings(log_every_n_seconds=-1)
    with pytest.raises(
        ConfigError, match=r"^trainer\.log_every_n_seconds=-0\.5: must be >= 0 \(0 = a line every log step\)$"
    ):
        build(make_cfg("trainer.log_every_n_seconds=-0.5"), "unused")
