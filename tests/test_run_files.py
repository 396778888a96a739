"""Issue 26, item 4: ``metrics.jsonl`` beside the TensorBoard events, ``train.log`` with the progress lines also under a
tqdm bar, a line before the first step and the first progress line right after it (or while it still runs), and a stop
that names each path once."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from types import SimpleNamespace

import pytest

from gantrain.errors import CheckpointError
from gantrain.rundir import HeldLines, log_file
from gantrain.runlog import METRICS_FILE, RunLog
from gantrain.train import train
from tests.conftest import make_cfg
from tests.test_logs import PROGRESS, Clock, FakeTTY, fake_trainer, messages, progress_steps, run_fake


def run_to_end(log: RunLog, trainer, clock: Clock) -> None:
    """:func:`run_fake` from the trainer's step (a resumed one) to ``max_steps``, a second a step."""
    log.on_fit_start(trainer)
    while trainer.step < trainer.settings.max_steps:
        clock.t += 1.0
        trainer.step, trainer.images_seen = trainer.step + 1, trainer.images_seen + 64
        trainer.collector.add("loss/D", 0.5)
        log.on_step_end(trainer)
    log.on_fit_end(trainer)
    log.teardown(trainer)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_metrics_jsonl_has_a_line_per_logged_step_and_per_evaluation(tmp_path):
    clock, trainer = Clock(), fake_trainer(max_steps=5, log_every_n_steps=2)
    log = RunLog(tmp_path, terminal=False, clock=clock)
    evaluate_at = {4: {"metrics/fid": 12.5, "best/metrics/fid": 12.5}}

    class Evaluating:  # what Evaluation does before RunLog's on_step_end: hand over the step's values
        def on_step_end(self, trainer) -> None:
            if trainer.step in evaluate_at:
                log.on_evaluation(trainer, evaluate_at[trainer.step], None)

    before = time.time()
    log.on_fit_start(trainer)
    for step in range(1, 6):
        clock.t, trainer.step, trainer.images_seen = float(step), step, 64 * step
        trainer.collector.add("loss/D", 0.5)
        trainer.collector.add("loss/G", float("nan") if step == 5 else 2.0)
        Evaluating().on_step_end(trainer)
        log.on_step_end(trainer)
    log.on_fit_end(trainer)
    log.teardown(trainer)
    after = time.time()
    got = rows(tmp_path)
    assert [(r["step"], r["images_seen"]) for r in got] == [(2, 128), (4, 256), (4, 256), (5, 320)]
    assert all(before - 0.01 <= r["wall_time"] <= after + 0.01 for r in got)
    assert got[0] == {"step": 2, "images_seen": 128, "wall_time": got[0]["wall_time"], "loss/D": 0.5, "loss/G": 2.0,
                      "perf/images_per_s": 64.0}  # fmt: skip
    assert {k: v for k, v in got[2].items() if k != "wall_time"} == {"step": 4, "images_seen": 256, **evaluate_at[4]}
    assert got[3]["loss/G"] is None and got[3]["loss/D"] == 0.5  # a non-finite value is null: the file stays JSON


def test_a_resumed_run_appends_and_re_run_steps_appear_again(tmp_path):
    """The second process resumes from step 2 (its checkpoint) after the first logged up to 4: the file keeps every
    byte of the first and gets 3, 4 (again, as TensorBoard shows them again) and 5."""
    clock = Clock()
    first = fake_trainer(max_steps=4, log_every_n_steps=1)
    run_fake(RunLog(tmp_path, terminal=False, clock=clock), first, clock, seconds_per_step=1.0)
    written = (tmp_path / METRICS_FILE).read_bytes()
    resumed = fake_trainer(max_steps=5, log_every_n_steps=1)
    resumed.step, resumed.images_seen = 2, 128
    run_to_end(RunLog(tmp_path, terminal=False, clock=clock), resumed, clock)
    assert (tmp_path / METRICS_FILE).read_bytes().startswith(written)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 3, 4, 5]


def test_other_ranks_write_no_metrics_file(tmp_path):
    clock, trainer = Clock(), fake_trainer(max_steps=2, log_every_n_steps=1)
    run_fake(RunLog(tmp_path, terminal=False, clock=clock, is_main=False), trainer, clock, seconds_per_step=1.0)
    assert not (tmp_path / METRICS_FILE).exists()


def test_a_real_run_writes_metrics_jsonl_and_appends_on_resume(tmp_path, one_thread):
    train(make_cfg("trainer.max_steps=2"), tmp_path)
    train(make_cfg("trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    got = rows(tmp_path)
    # data.batch_size=8, drawn by D's step and by G's
    assert [(r["step"], r["images_seen"]) for r in got] == [(1, 16), (2, 32), (3, 48)]
    assert {"loss/D", "loss/G", "lr/D", "lr/G", "perf/images_per_s"} <= set(got[0])


def test_under_a_bar_train_log_gets_the_progress_lines_and_the_console_does_not(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(sys, "stderr", FakeTTY())  # the bar's stream
    console = io.StringIO()
    handler = logging.StreamHandler(console)  # what Hydra's job_logging puts on the root logger
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with log_file(tmp_path / "train.log"):
            clock, trainer = Clock(), fake_trainer(max_steps=4, log_every_n_steps=2, log_every_n_seconds=0)
            run_fake(RunLog(tmp_path, terminal=True, clock=clock), trainer, clock, seconds_per_step=1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert handler.filters == []  # the console is as it was after the block
    shown, logged = console.getvalue().splitlines(), (tmp_path / "train.log").read_text().splitlines()
    assert progress_steps(shown) == [] and not [line for line in shown if line.startswith("step 1/4")]
    assert progress_steps(logged) == [2, 4]
    assert any(line.endswith("step 1/4: first step done in 1 s") for line in logged)
    assert shown[0] == "starting step 1 of 4" and shown[-1].startswith("finished at step 4: ")
    assert logged[-1].endswith(shown[-1])


def test_a_line_before_the_first_step_and_one_right_after_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    clock, trainer = Clock(), fake_trainer(max_steps=30, log_every_n_steps=10, log_every_n_seconds=0, compile=True)
    run_fake(RunLog(tmp_path, terminal=False, clock=clock), trainer, clock, seconds_per_step=2.5)
    lines = messages(caplog)
    assert lines[:2] == [
        "starting step 1 of 30; the first step compiles the networks (trainer.compile=True)",
        "step 1/30: first step done in 2.5 s",
    ]
    assert progress_steps(lines) == [10, 20, 30]
    resumed = fake_trainer(max_steps=40, log_every_n_steps=10)
    resumed.step = 30
    caplog.clear()
    run_fake(RunLog(tmp_path, terminal=False, clock=clock), resumed, clock, seconds_per_step=1.0)
    assert messages(caplog)[:2] == ["resuming at step 31 of 40", "step 31/40: first step done in 1 s"]


def test_a_slow_first_step_gets_a_line_after_log_every_n_seconds(tmp_path, caplog):
    """The timer's line (real time) while step 1 runs, once; none once a step has finished."""
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    clock, trainer = Clock(), fake_trainer(max_steps=2, log_every_n_steps=1, log_every_n_seconds=0.2)
    log = RunLog(tmp_path, terminal=False, clock=clock)
    log.on_fit_start(trainer)
    time.sleep(0.6)  # the first step (a compile, say)
    trainer.step, clock.t = 1, 0.6
    trainer.collector.add("loss/D", 0.5)
    trainer.collector.add("loss/G", 2.0)
    log.on_step_end(trainer)
    time.sleep(0.4)
    log.teardown(trainer)
    lines = messages(caplog)
    assert lines[:3] == [
        "starting step 1 of 2",
        "step 0/2: step 1 still running after 0.2 s",
        "step 1/2: first step done in 0.6 s",
    ]
    assert sum("still running" in line for line in lines) == 1
    assert PROGRESS.search(lines[3]) and lines[3].startswith("step 1/2: ")


def test_a_stop_names_each_path_once(tmp_path, caplog):
    """RunLog's last line leaves the run directory and checkpoint to the stop line that follows (with the resume
    command); it still names the samples and TensorBoard."""
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    clock, trainer = Clock(), fake_trainer(max_steps=3, log_every_n_steps=1)
    trainer.stop_reason = "SIGTERM"
    checkpoints = SimpleNamespace(path=ckpt, folder=ckpt.parent)
    run_fake(RunLog(tmp_path, terminal=False, clock=clock, checkpoints=checkpoints), trainer, clock, 1.0)
    last = messages(caplog)[-1]
    assert last == f"stopped (SIGTERM) at step 3; view with: tensorboard --logdir {tmp_path.resolve()}"
    trainer = fake_trainer(max_steps=3, log_every_n_steps=1)
    caplog.clear()
    run_fake(RunLog(tmp_path, terminal=False, clock=clock, checkpoints=checkpoints), trainer, clock, 1.0)
    assert f"run directory {tmp_path.resolve()}, checkpoint {ckpt.resolve()};" in messages(caplog)[-1]


def test_a_run_with_nothing_left_to_do_says_nothing_about_starting(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gantrain.runlog")
    clock, trainer = Clock(), fake_trainer(max_steps=3, log_every_n_seconds=0.1)
    trainer.step = 3  # a checkpoint already at max_steps
    log = RunLog(tmp_path, terminal=False, clock=clock)
    log.on_fit_start(trainer)
    time.sleep(0.3)
    log.on_fit_end(trainer)
    log.teardown(trainer)
    assert [m for m in messages(caplog) if "start" in m or "step 4" in m or "running" in m] == []


def test_train_log_starts_with_the_lines_logged_while_the_run_was_built(tmp_path, caplog):
    """What the run says before it passed its checks (loading, building: here resume=auto finding no checkpoint;
    on a GPU, which network stays eager under trainer.compile) is held and written first into train.log, in order;
    a run refused at that point adds nothing to an existing train.log."""
    caplog.set_level(logging.INFO)
    train(make_cfg("trainer.max_steps=1", "trainer.resume=auto"), tmp_path)
    log_path = tmp_path / "train.log"
    lines = log_path.read_text().splitlines()
    assert lines[0].endswith("loading the data and building the networks")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert lines[1].endswith(f"trainer.resume=auto: no checkpoint at {ckpt}, starting from scratch")
    assert lines[2].endswith(f"run directory: {tmp_path.resolve()}")
    assert sum("loading the data" in line for line in lines) == 1  # written once, not again by the open file
    before = log_path.read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(make_cfg("trainer.max_steps=1"), tmp_path)  # no resume: refused before train.log opens
    assert log_path.read_bytes() == before
    assert not [h for h in logging.getLogger().handlers if isinstance(h, HeldLines)]
