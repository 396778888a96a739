"""Run directory names are valid override values that say what a run (a sweep's job) changes; every command gantrain
prints works pasted into a shell; a sweep resumed with a larger trainer.max_steps finds its jobs; a sweep ends on its
jobs ranked by trainer.monitor; each job's TEXT tab has its own command."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gantrain.rundir import hydra_value, run_name
from gantrain.sweep import ranking
from gantrain.train import train
from tests.conftest import make_cfg
from tests.test_long_runs import CLI, ENV, WATCH, _ckpt, _popen, _wait_for, tiny

# `python` in a pasted command is the one running the tests
SHELL_ENV = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV.get('PATH', '')}"}


def _value(override: str):
    return OverridesParser.create().parse_override(override).value()


def test_run_names_are_valid_override_values_without_the_keys_a_resume_may_change():
    task = [
        "+experiment=dcgan",
        "optim.d.lr=3e-4",
        "trainer.max_steps=200",
        "trainer.resume=auto",
        "trainer.log_every_n_steps=5",
        "model.g.channels=[64,128]",
        "data.path=../shared/data/mnist t10k",
        "hydra.run.dir=x",
        "seed=1",
    ]
    name = run_name(task, "_")
    assert name == "_optim.d.lr-3e-4_model.g.channels-_64_128__data.path-.._shared_data_mnist_t10k_seed-1"
    path = f"/abs/outputs/dcgan/2026-12-04_08-45-00_3f9a1c{name}"
    assert _value(f"hydra.run.dir={path}") == path  # pasted as it is, no quotes
    assert _value(f"trainer.resume={path}/checkpoints/last.ckpt") == f"{path}/checkpoints/last.ckpt"
    # a sweep job: the swept keys only, whatever the order on the command line
    assert (
        run_name(["data=ring8", "seed=1", "optim.d.lr=0.0004"], "_", "optim.d.lr,seed") == "_seed-1_optim.d.lr-0.0004"
    )
    assert run_name(["trainer.max_steps=20", "trainer.resume=auto"], "_") == ""
    assert run_name(["trainer.max_steps=20", "seed=1"], "_", "trainer.max_steps") == ""  # swept, but may change
    long = run_name([f"data.path=/{'d' * 200}"])
    assert len(long) == 109 and long == run_name([f"data.path=/{'d' * 200}"]) != run_name([f"data.path=/{'d' * 201}"])


@pytest.mark.parametrize(
    ("path", "as_is"),
    [("/a/b/0_optim.d.lr-0.0001", True), ("C:\\runs\\x\\", True), ("/a b/lr=3e-4,x", False)]
    + [('it\'s "q"', False), ("tail\\'", False), ("123", False), ("[1]", False)],
)
def test_hydra_value_reads_back_as_the_same_string(path, as_is):
    assert _value(f"k={hydra_value(path)}") == path
    assert (hydra_value(path) == path) == as_is


def _resumed_at(run_dir: Path) -> int:
    """The step the run in ``run_dir`` last resumed from its own last.ckpt (its train.log)."""
    ckpt = re.escape(str(run_dir.resolve() / "checkpoints" / "last.ckpt"))
    return int(re.findall(rf"resumed from {ckpt} at step (\d+)$", (run_dir / "train.log").read_text(), re.M)[-1])


def _resume_line(out: str) -> str:
    (line,) = re.findall(r"resume with: (.*)$", out, flags=re.M)
    return line


def test_the_printed_resume_command_of_a_stopped_run_resumes_it_pasted_into_a_shell(tmp_path):
    """A run with overrides in its default directory, stopped by SIGTERM: its resume line, run verbatim through a
    shell from another directory, continues it in the same directory to the end."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    overrides = tiny("+experiment=dcgan", "trainer.max_steps=30", "optim.d.optimizer.betas=[0.5,0.99]", *WATCH)
    proc = _popen(overrides, start)
    _wait_for(start / "outputs", proc)
    deadline = time.monotonic() + 120
    while not list((start / "outputs" / "dcgan").glob("*/samples/step_0000003.png")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    (run_dir,) = (start / "outputs" / "dcgan").iterdir()
    assert run_dir.name.endswith("_optim.d.optimizer.betas-_0.5_0.99_")  # trainer.max_steps is no part of it
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    stopped_at = _ckpt(run_dir)["step"]
    assert 3 <= stopped_at < 30
    line = _resume_line(out)
    assert f"hydra.run.dir={run_dir.resolve()} trainer.resume=auto" in line
    assert "'optim.d.optimizer.betas=[0.5,0.99]'" in line

    r = subprocess.run(line, shell=True, cwd=elsewhere, env=SHELL_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert _ckpt(run_dir)["step"] == 30 and _resumed_at(run_dir) == stopped_at
    assert list(elsewhere.iterdir()) == [] and list((start / "outputs" / "dcgan").iterdir()) == [run_dir]
    # the last line's TensorBoard command, pasted (with --inspect: read the logdir, list its tags and exit)
    (tensorboard,) = re.findall(r"view with: (tensorboard --logdir .*)$", r.stdout + r.stderr, flags=re.M)
    assert shlex.split(tensorboard) == ["tensorboard", "--logdir", str(run_dir.resolve())]
    tb = subprocess.run(
        f"{tensorboard} --inspect", shell=True, env=SHELL_ENV, capture_output=True, text=True, timeout=120
    )
    assert tb.returncode == 0 and f"These tags are in {run_dir.resolve()}:" in tb.stdout, tb.stdout + tb.stderr
    assert "   loss/G\n" in tb.stdout


def _command_text(job: Path) -> str:
    """The TEXT tab's command of the job's last session (the newest events file)."""
    events = sorted(job.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)[-1]
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("command")]
    return acc.Tensors(tag)[0].tensor_proto.string_val[0].decode().strip()


def test_a_sweep_stopped_in_job_1_resumes_with_more_steps_in_its_directories_and_ends_on_a_ranking(tmp_path):
    sweep = tmp_path / "sweep"
    command = ["-m", *tiny("trainer.max_steps=12", "optim.d.lr=1e-4,2e-4", *WATCH, f"hydra.sweep.dir={sweep}")]
    proc = _popen(command, tmp_path)
    deadline = time.monotonic() + 300
    while not list(sweep.glob("1_*/samples/step_0000003.png")):  # job 1 is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    job0, job1 = sweep / "0_optim.d.lr-0.0001", sweep / "1_optim.d.lr-0.0002"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    stopped_at = _ckpt(job1)["step"]
    assert _ckpt(job0)["step"] == 12 and 3 <= stopped_at < 12
    assert not (sweep / "ranking.txt").exists()  # the sweep did not end

    more = [*command, "trainer.max_steps=16", "trainer.resume=auto"]
    r = subprocess.run([*CLI, *more], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == [job0, job1]
    for job, start in ((job0, 12), (job1, stopped_at)):
        assert _ckpt(job)["step"] == 16 and _resumed_at(job) == start

    # the ranking: each job's returned loss/G (the last logged, saved in its checkpoint) and step, lowest first
    saved = {str(job.resolve()): _ckpt(job)["metrics"]["loss/G"] for job in (job0, job1)}
    table = (sweep / "ranking.txt").read_text()
    lines = table.splitlines()
    assert lines[:2] == ["2 jobs ranked by loss/G (lower is better):", "rank    loss/G  step  run directory"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2"] and [r[2] for r in rows] == ["16", "16"]
    assert [r[3] for r in rows] == sorted(saved, key=saved.get)
    assert [float(r[1]) for r in rows] == pytest.approx(sorted(saved.values()), rel=1e-5)
    assert table in out  # the same table ends the sweep's output

    # each job's TEXT tab: the command of that job alone
    overrides = yaml.safe_load((job1 / ".hydra" / "overrides.yaml").read_text())
    assert _command_text(job1) == shlex.join(["python", "-m", "gantrain", *overrides])
    assert "optim.d.lr=0.0002" in overrides and "trainer.max_steps=16" in overrides
    assert not any("," in o or o == "-m" for o in overrides)


def test_a_runs_results_name_the_step_of_its_best_also_when_resumed_with_nothing_to_do(tmp_path, one_thread):
    toy = ["+experiment=toy_gan", "trainer.max_steps=6", "trainer.eval_every_n_steps=2", "trainer.monitor=toy/hq"]
    metrics = train(make_cfg(*toy), tmp_path)
    best = _ckpt(tmp_path)["best"]
    assert metrics["best/toy/hq"] == best["value"] and metrics["best/toy/hq/step"] == best["step"] in (2, 4, 6)
    again = train(make_cfg(*toy, "trainer.resume=auto"), tmp_path)  # nothing to do
    assert again["best/toy/hq/step"] == best["step"] and again["step"] == 6


def test_the_ranking_puts_the_best_first_for_the_monitors_direction_and_nan_last(tmp_path):
    results = {"0_a-1": 0.25, "1_a-2": float("nan"), "2_a-3": 0.75, "3_a-4": 0.5}
    for i, (name, value) in enumerate(results.items()):
        (tmp_path / name).mkdir()
        result = {"monitor": "toy/hq", "mode": "max", "value": value, "step": 10 * i}
        (tmp_path / name / "result.json").write_text(json.dumps(result))
    (tmp_path / "5_unfinished").mkdir()
    text, rows = ranking(tmp_path)
    assert [Path(r["run_dir"]).name for r in rows] == ["2_a-3", "3_a-4", "0_a-1", "1_a-2"]
    assert text.splitlines() == [
        "4 jobs ranked by toy/hq (higher is better):",
        "rank  toy/hq  step  run directory",
        f"   1    0.75    20  {tmp_path.resolve() / '2_a-3'}",
        f"   2     0.5    30  {tmp_path.resolve() / '3_a-4'}",
        f"   3    0.25     0  {tmp_path.resolve() / '0_a-1'}",
        f"   4     nan    10  {tmp_path.resolve() / '1_a-2'}",
    ]
