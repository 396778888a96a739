"""Runs that can be left alone: signals end a run with a resumable checkpoint, one run per directory,
a refused run changes nothing, resume means the same run (also for a whole sweep), snapshots are kept,
and a full disk or a read-only directory is one line with the last checkpoint intact."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gantrain import checkpoint as ckpt_io
from gantrain import files
from gantrain.checkpoint import CheckpointError
from gantrain.rundir import RunDirectoryInUse, RunDirectoryLock
from gantrain.train import Interrupted, train
from tests.conftest import TINY, TINY_WIDTH, make_cfg
from tests.test_checkpoint import _assert_same_tensors

CLI = [sys.executable, "-m", "gantrain"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Every state a bit-exact resume restores (the tests of test_checkpoint.py compare the same keys).
STATE_KEYS = (
    "model",
    "optimizers",
    "schedulers",
    "scalers",
    "guard",
    "ema",
    "data",
    "iteration",
    "images_seen",
)


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return ckpt_io.load(run_dir / "checkpoints" / name)


def _assert_same_state(a: dict, b: dict) -> None:
    for key in STATE_KEYS:
        _assert_same_tensors(a.get(key), b.get(key), key)  # "ema" only with an EMA
    _assert_same_tensors(a["rng"]["torch"], b["rng"]["torch"], "rng")


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared:\n{out[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def tiny(*overrides: str) -> list[str]:
    """The command-line overrides of ``make_cfg(*overrides)`` for the default dcgan (later ones win)."""
    return [*TINY, *TINY_WIDTH["ngf"], *overrides]


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# Steps slow enough to signal mid-run, with a sample PNG per step to see where the run is.
SIGNAL_RUN = ["+experiment=dcgan", "trainer.max_steps=60", "trainer.ema.half_life_images=30"]
WATCH = ["trainer.sample_every_n_steps=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("straight")
    train(make_cfg(*SIGNAL_RUN), run_dir)
    return _ckpt(run_dir)


@pytest.mark.parametrize(
    ("sig", "code"),
    [
        (signal.SIGTERM, 143),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),  # the same path; SIGTERM runs by default
        pytest.param(signal.SIGUSR1, 138, marks=pytest.mark.slow),
    ],
)
def test_a_signal_saves_the_step_and_the_resumed_run_is_bit_identical(tmp_path, uninterrupted, sig, code):
    """Acceptance 1: the signal arrives after step k (not a checkpoint step: the interval is 1000); the
    run writes a checkpoint at step k, says how to resume, exits 128 + n; resuming to the end gives the
    uninterrupted run's weights, optimizer states, EMA, data position and RNG, bit for bit."""
    run_dir = tmp_path / "run"
    proc = _popen(tiny(*SIGNAL_RUN, *WATCH, f"hydra.run.dir={run_dir}"), tmp_path)
    _wait_for(run_dir / "samples" / "step_0000004.png", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out
    k = _ckpt(run_dir)["step"]
    assert 4 <= k < 60 and k % 1000
    (line,) = [x for x in out.splitlines() if "stopped by" in x]
    assert f"stopped by {signal.Signals(sig).name} after step {k}/60" in line
    assert f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in line
    assert f"hydra.run.dir={run_dir} trainer.resume=auto" in line and "+experiment=dcgan" in line
    assert out.count(str(run_dir / "checkpoints" / "last.ckpt")) == 1  # RunLog's last line leaves it to this one

    assert train(make_cfg(*SIGNAL_RUN, *WATCH, "trainer.resume=auto"), run_dir)["step"] == 60
    _assert_same_state(uninterrupted, _ckpt(run_dir))


def test_a_second_signal_while_saving_changes_nothing(tmp_path, monkeypatch, caplog):
    """A signal at step 3 asks for the stop; another one arrives in the middle of writing the checkpoint:
    the save completes, the checkpoint loads, and the run ends once, at step 3."""
    from gantrain.checkpoint import Checkpointing

    on_step_end, save_atomic = Checkpointing.on_step_end, ckpt_io.save_atomic

    def signal_at_step_3(self, trainer):
        on_step_end(self, trainer)
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def save_interrupted(obj, path):
        def write(f):
            torch.save(obj, f)
            os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: after torch.save returned

        return files.atomic_write(path, write)

    monkeypatch.setattr(Checkpointing, "on_step_end", signal_at_step_3)
    monkeypatch.setattr(ckpt_io, "save_atomic", save_interrupted)
    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING), pytest.raises(Interrupted) as stopped:
        train(make_cfg("trainer.max_steps=10"), tmp_path)
    monkeypatch.setattr(ckpt_io, "save_atomic", save_atomic)
    assert stopped.value.exit_code == 143 and "after step 3/10" in str(stopped.value)
    assert "already stopping" in caplog.text
    assert _ckpt(tmp_path)["step"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are put back


def test_a_second_process_on_a_run_directory_stops_at_once_naming_the_holder(tmp_path):
    """Acceptance 3: the second process exits non-zero within seconds with the lock message; the first
    finishes, and its checkpoint holds the config its config.yaml records."""
    run_dir = tmp_path / "run"
    first = _popen(  # long enough to outlast the second's start-up (a few seconds) after its first grid
        tiny("trainer.max_steps=250", *WATCH, f"hydra.run.dir={run_dir}"),
        tmp_path,
    )
    _wait_for(run_dir / "samples" / "step_0000001.png", first)
    start = time.monotonic()
    second = subprocess.run(
        [*CLI, *tiny("trainer.resume=auto", f"hydra.run.dir={run_dir}")],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1 and time.monotonic() - start < 60
    out = second.stdout + second.stderr
    assert "Traceback" not in out
    assert f"run directory '{run_dir}' is in use by another gantrain run (PID {first.pid} on " in out
    first_out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_out[-3000:]
    from omegaconf import OmegaConf

    recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    ckpt = _ckpt(run_dir)
    assert ckpt["step"] == 250 and ckpt["config"] == recorded and recorded["model"]["g"]["ngf"] == 8


def test_the_lock_is_exclusive_and_released(tmp_path):
    with RunDirectoryLock(tmp_path) as lock:
        lock.claim()
        assert (tmp_path / ".lock").read_text().startswith(f"PID {os.getpid()} on ")
        with pytest.raises(RunDirectoryInUse, match=f"in use by another gantrain run \\(PID {os.getpid()} on "):
            with RunDirectoryLock(tmp_path):
                pass
    with RunDirectoryLock(tmp_path):  # released on exit
        pass


def test_two_launches_in_the_same_second_get_two_directories(tmp_path):
    procs = [_popen(tiny("trainer.max_steps=1"), tmp_path) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    runs = sorted((tmp_path / "outputs" / "default").iterdir())
    assert len(runs) == 2 and all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)


def test_the_unique_resolver_gives_one_value_per_process():
    """Every ``${unique:}`` in one process resolves alike (run dir, sweep dir); another call of the id differs."""
    from omegaconf import OmegaConf

    from gantrain.rundir import unique_suffix

    cfg = OmegaConf.create({"run": "a_${unique:}", "sweep": "b_${unique:}"})
    assert cfg.run[2:] == cfg.sweep[2:] and len(cfg.run) == 8
    assert unique_suffix() != unique_suffix()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-step run written by the CLI (so it has .hydra/ and train.log too)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = subprocess.run(
        [*CLI, *tiny(f"hydra.run.dir={run_dir}")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "config.yaml", ".lock"} <= set(_files(run_dir))
    return run_dir


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"already holds a checkpoint .*trainer.resume=auto"),
        (
            ["trainer.resume=auto", "optim.d.lr=0.001"],
            r"these settings differ \(checkpoint -> now\):\s+optim.d.lr: 0.0002 -> 0.001",
        ),
    ],
    ids=["no-resume", "resume-with-another-lr"],
)
def test_a_refused_run_leaves_every_file_of_the_directory_byte_identical(finished_run, overrides, message):
    before = _files(finished_run)
    r = subprocess.run(
        [*CLI, *tiny("trainer.max_steps=4", *overrides, f"hydra.run.dir={finished_run}")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out
    assert len([x for x in out.splitlines() if x.strip()]) <= 5  # the message and the differences it lists
    import re

    assert re.search(message, out), out
    assert _files(finished_run) == before


@pytest.mark.parametrize(
    "change",
    [
        "optim.d.lr=0.001",
        pytest.param("optim.g.optimizer.betas=[0.0,0.99]", marks=pytest.mark.slow),
        "data.batch_size=4",
        "trainer.n_critic=2",
        pytest.param("seed=1", marks=pytest.mark.slow),
        pytest.param("loss=hinge", marks=pytest.mark.slow),
        pytest.param("model.g.ngf=16", marks=pytest.mark.slow),
        pytest.param("trainer.precision=bf16-mixed", marks=pytest.mark.slow),
        "data.holdout=100",
    ],
)
def test_resume_refuses_settings_that_make_it_another_run(tmp_path, change):
    train(make_cfg(), tmp_path)
    before = _files(tmp_path)
    key = change.split("=")[0]
    with pytest.raises(CheckpointError, match=rf"another run; these settings differ[^\n]*\n  {key}(\.\w+)*: "):
        train(make_cfg(change, "trainer.resume=auto", "trainer.max_steps=3"), tmp_path)
    assert _files(tmp_path) == before


def test_resume_may_extend_a_run_and_change_how_it_is_watched(tmp_path):
    """max_steps, logging, checkpointing and the device may change; config.yaml then records what ran."""
    train(make_cfg(), tmp_path)
    allowed = [
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=2",
        "trainer.sample_every_n_steps=3",
        "trainer.checkpoint_every_n_steps=7",
        "trainer.keep_checkpoints=1",
        "data.in_memory=false",
        "trainer.resume=auto",
    ]
    assert train(make_cfg(*allowed), tmp_path)["step"] == 4
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()
    assert _ckpt(tmp_path)["config"]["trainer"]["max_steps"] == 4


def test_step_snapshots_keep_the_newest_n(tmp_path):
    train(
        make_cfg("trainer.max_steps=10", "trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=3"), tmp_path
    )
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt",
        "step_0000006.ckpt",
        "step_0000008.ckpt",
        "step_0000010.ckpt",
    ]
    for step in (6, 8, 10):
        assert _ckpt(tmp_path, f"step_{step:07d}.ckpt")["step"] == step
    assert (folder / "last.ckpt").read_bytes() == (folder / "step_0000010.ckpt").read_bytes()
    # keep_checkpoints=0 (the default) writes none
    train(make_cfg("trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2"), tmp_path / "none")
    assert [p.name for p in (tmp_path / "none" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_temporary_files_of_an_interrupted_save_are_removed_at_the_next_start(tmp_path):
    train(make_cfg(), tmp_path)
    stale = tmp_path / "checkpoints" / ".last.ckpt.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "checkpoints" / "notes.txt"  # not ours: never touched
    keep.write_text("mine")
    train(make_cfg("trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    assert not stale.exists() and keep.read_text() == "mine"


def test_a_finished_job_resumed_again_does_nothing(tmp_path, caplog):
    metrics = train(make_cfg(), tmp_path)
    before = _files(tmp_path)
    with caplog.at_level(logging.INFO):
        again = train(make_cfg("trainer.resume=auto"), tmp_path)
    assert again["step"] == 2 and again["loss/G"] == metrics["loss/G"]  # the checkpoint's last logged values
    after = _files(tmp_path)
    assert after.keys() == before.keys()  # no new TensorBoard run, no new checkpoint
    changed = [k for k in after if after[k] != before[k]]
    assert changed == ["train.log"]  # one more line: nothing to do
    assert "nothing to do" in after["train.log"].decode().splitlines()[-1]


def _disk_full_after(nbytes: int):
    """An ``os.fdopen`` whose files take ``nbytes`` and then fail like a full disk."""
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    return lambda fd, mode="r", *a, **kw: Full(real(fd, mode, *a, **kw))


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_loadable(tmp_path, monkeypatch):
    train(make_cfg("trainer.checkpoint_every_n_steps=1"), tmp_path)
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(files.os, "fdopen", _disk_full_after(10_000))
    with pytest.raises(files.WriteError) as e:
        train(make_cfg("trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and f"cannot write '{tmp_path / 'checkpoints' / 'last.ckpt'}'" in msg
    size = len(before) / 2**20
    needs = float(msg.split("needs ")[1].split(" MiB")[0])
    assert abs(needs - size) < 0.05 and "free on its file system" in msg
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
    assert ckpt_io.load(tmp_path / "checkpoints" / "last.ckpt")["step"] == 2
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_an_interrupted_sweep_continues_with_resume_auto(tmp_path):
    """Acceptance 4: a 2-job sweep stopped during job 1 is rerun, the same command plus trainer.resume=auto:
    job 0 (finished) is not retrained, job 1 continues from its checkpoint to the end, in the same
    directories (trainer.resume does not enter the job directory names)."""
    sweep = tmp_path / "sweep"
    command = ["-m", *tiny("trainer.max_steps=20", "seed=0,1", *WATCH, f"hydra.sweep.dir={sweep}")]
    proc = _popen(command, tmp_path)
    deadline = time.monotonic() + 300
    while not list(sweep.glob("1_*/samples/step_0000003.png")):  # job 1 is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    (job0,), (job1,) = sweep.glob("0_*"), sweep.glob("1_*")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert _ckpt(job0)["step"] == 20 and 3 <= _ckpt(job1)["step"] < 20
    job0_before = (job0 / "checkpoints" / "last.ckpt").read_bytes()

    r = subprocess.run([*CLI, *command, "trainer.resume=auto"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == [job0, job1]
    assert (job0 / "checkpoints" / "last.ckpt").read_bytes() == job0_before  # not retrained
    assert "nothing to do" in (job0 / "train.log").read_text().splitlines()[-1]
    assert _ckpt(job1)["step"] == 20 and "resumed from" in (job1 / "train.log").read_text()
