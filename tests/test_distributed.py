"""Data-parallel training (gantrain.distributed) on the CPU with gloo: 2 processes on this machine.

The ranks are started as ``torchrun`` starts them (``RANK``/``WORLD_SIZE``/``MASTER_*`` in the environment),
or by ``torchrun`` itself; each test's processes get their own port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gantrain.checkpoint import CheckpointError, Checkpointing, check_world_size
from tests.conftest import REPO, TINY, TINY_WIDTH

PYTHON = sys.executable
WORKER = REPO / "tests" / "ddp_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives rank ``rank`` (without torchrun's agent)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    env.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    return env


def spawn(args: list[str], world_size: int = 2, **kwargs) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(args, env=rank_env(r, world_size, port), cwd=REPO, **kwargs) for r in range(world_size)]


def equivalence(tmp_path: Path, scenarios: list[str]) -> tuple[dict, dict, dict]:
    """(rank 0's, rank 1's, the 1-process reference's) results of ``tests/ddp_worker.py`` for ``scenarios``."""
    out, ref = tmp_path / "ddp.pt", tmp_path / "ref.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    procs = spawn([PYTHON, str(WORKER), str(out), *scenarios])
    procs.append(subprocess.Popen([PYTHON, str(WORKER), str(ref), *scenarios], env=env, cwd=REPO))
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    return load(out), load(f"{out}.rank1"), load(ref)


def assert_equivalent(ddp: dict, other: dict, ref: dict) -> None:
    """Same weights and gradients as the reference (1e-9 relative), rank 1 bit-identical to rank 0."""
    for kind in ("weights", "grads"):
        assert ddp[kind].keys() == ref[kind].keys()
        for name, want in ref[kind].items():
            got = ddp[kind][name]
            assert got.dtype == torch.float64
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item()), f"{kind} {name}"
            assert torch.equal(got, other[kind][name]), f"{kind} {name} differs between the ranks"
    # one all-reduce per optimizer step, whatever the accumulation (one bucket per tiny network): no_sync works
    assert ddp["allreduces"] == ddp["steps"]
    assert ddp["hygiene"] and all(ddp["hygiene"])  # params and grads equal on both ranks after every phase


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    """dcgan with accumulation (no_sync honoured), and a conditional one (labels on reals and fakes: a projection D
    with ACGAN's head, RpGAN, R2); a D loss that is only R1 without find_unused_parameters
    (the unused-parameter trap) stops with one line; with BatchNorm, every rank holds the same buffers."""
    rank0, rank1, ref = equivalence(
        tmp_path, ["dcgan/2", "conditional/2", "r1_only/find_unused_off", "dcgan_batchnorm"]
    )
    for name in ("dcgan/2", "conditional/2"):  # conditional: labels travel with their images, fakes with theirs
        assert_equivalent(rank0[name], rank1[name], ref[name])
    assert "d.head.embed.weight" in ref["conditional/2"]["grads"] and "g.embed.weight" in ref["conditional/2"]["grads"]
    bn = rank0["dcgan_batchnorm"]  # BatchNorm's running statistics are rank 0's on both ranks after every phase
    assert len(bn["hygiene"]) == 3 * 2 * 3 and all(bn["hygiene"])
    error = rank0["r1_only/find_unused_off"]["error"]
    assert "the loss gave d.head.linear.bias no gradient" in error and "\n" not in error
    assert "trainer.ddp.find_unused_parameters=true" in error


def test_two_ranks_equal_one_process_with_lecam_and_ada(tmp_path):
    """LeCam's averages are of all ranks' outputs (all-reduced after each D step), so 2 ranks with accumulation give
    the 1-process reference's weights and gradients, which its anchors enter from the second step on. ADA adjusting
    after every D step (accumulation 2): the ranks' r_t sums are all-reduced, so both ranks hold the p of the
    1-process run with both ranks' images, bit for bit, and train as it does."""
    rank0, rank1, ref = equivalence(tmp_path, ["lecam/2", "ada/2"])
    assert_equivalent(rank0["lecam/2"], rank1["lecam/2"], ref["lecam/2"])
    ps = rank0["ada/2"]["augment_p"]
    assert len(ps) == 3 and ps == rank1["ada/2"]["augment_p"] == ref["ada/2"]["augment_p"]
    step = 2 * 2 * 4 / 64  # ranks * micro-batches * images / speed_images
    assert all(abs(b - a) == step for a, b in zip([0.5, *ps], ps))  # moved each D step, by all ranks' images
    assert_equivalent(rank0["ada/2"], rank1["ada/2"], ref["ada/2"])


@pytest.mark.slow
def test_two_ranks_equal_one_process_every_recipe(tmp_path):
    """dcgan (norm off), wgan_gp (GP: double backward) and vae, with accumulation 1 and 2; a D loss that is
    only R1 (its gradient misses D's last bias) with find_unused_parameters."""
    names = [f"{n}/{k}" for n in ("dcgan", "wgan_gp", "vae", "conditional") for k in (1, 2)] + ["r1_only"]
    rank0, rank1, ref = equivalence(tmp_path, names)
    for name in names:
        assert_equivalent(rank0[name], rank1[name], ref[name])
    assert "d.head.linear.bias" not in ref["r1_only"]["grads"]  # no gradient in one process either: Adam skips it


@pytest.mark.parametrize(
    ("env", "shown"), [({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3"), ({"WORLD_SIZE": "2"}, "RANK is not set")]
)
def test_a_rank_outside_the_world_size_is_one_line_not_a_hang(tmp_path, env, shown):
    """RANK=3 WORLD_SIZE=2 used to wait for the missing ranks in init_process_group, silently, for hours."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run(
        [PYTHON, "-m", "gantrain", *TINY, *TINY_WIDTH["ngf"], f"hydra.run.dir={tmp_path / 'run'}"],
        env={**clean, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env},
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = (
        f"{shown} with WORLD_SIZE=2: each process needs a RANK from 0 to 1; launch with torchrun --nproc_per_node=2, "
        "which sets both, or unset WORLD_SIZE for one process"
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr + run.stdout, run.stderr[-2000:]
    assert line in run.stderr + run.stdout
    assert not any((tmp_path / "run").glob("*"))  # nothing written (Hydra may have made the empty directory)


def test_a_checkpoint_resumes_only_with_its_rank_count(tmp_path):
    check_world_size(2, 2, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError) as e:
        check_world_size(2, 1, tmp_path / "last.ckpt")
    assert "written by 2 (torchrun --nproc_per_node=2)" in str(e.value) and "this run has one process" in str(e.value)
    assert Checkpointing(tmp_path, world_size=2).world_size == 2


TINY_DCGAN = [  # BatchNorm in both networks (its buffers are broadcast each step) and an EMA generator
    "+experiment=dcgan",
    *TINY,
    *TINY_WIDTH["ngf"],
    "trainer.ema.half_life_images=100",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.sample_every_n_steps=2",
]


def gantrain(*overrides: str) -> list[str]:
    return ["-m", "gantrain", *TINY_DCGAN, *overrides]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def trained_state(run_dir: Path) -> dict:
    """What must be bit-identical between a resumed and an uninterrupted run: weights, EMA, optimizers, step."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return {k: ckpt[k] for k in ("step", "images_seen", "model", "ema", "optimizers", "data", "world_size")}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["images_seen"] == b["images_seen"] and a["data"] == b["data"]
    assert a["world_size"] == b["world_size"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["ema"]["average"].items():
        assert torch.equal(tensor, b["ema"]["average"][name]), name
    for phase, state in a["optimizers"].items():
        for i, s in state["state"].items():
            assert all(torch.equal(v, b["optimizers"][phase]["state"][i][k]) for k, v in s.items()), phase


@pytest.mark.slow
def test_torchrun_writes_once_and_resumes_bit_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    done = torchrun(*gantrain("trainer.max_steps=4", f"hydra.run.dir={whole}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(whole.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (whole / "checkpoints").iterdir()] == ["last.ckpt"]
    assert sorted(p.name for p in (whole / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert not list(tmp_path.glob("*/*/.lock"))  # no rank made a directory of its own

    first = torchrun(*gantrain("trainer.max_steps=2", f"hydra.run.dir={split}"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(*gantrain("trainer.max_steps=4", f"hydra.run.dir={split}", "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(trained_state(whole), trained_state(split))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = subprocess.run(
        [PYTHON, *gantrain("trainer.max_steps=6", f"hydra.run.dir={split}", "trainer.resume=auto")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 1
    errors = [line for line in (one.stdout + one.stderr).splitlines() if "ERROR" in line or "rror:" in line]
    assert len(errors) == 1 and "written by 2 (torchrun --nproc_per_node=2)" in errors[0], one.stdout + one.stderr


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    run, whole = tmp_path / "run", tmp_path / "whole"
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    port = free_port()
    procs = [
        subprocess.Popen(
            [PYTHON, *gantrain("trainer.max_steps=1000", f"hydra.run.dir={run}")],
            env=rank_env(r, 2, port), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        for r, log in enumerate(logs)
    ]  # fmt: skip
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():  # training is under way (step 2)
        assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in procs] == [143, 143], logs[0].read_text()[-3000:]
    outputs = [("", log.read_text()) for log in logs]
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["step"]
    assert 2 <= step < 1000
    assert f"stopped by SIGTERM after step {step}/1000" in outputs[0][1]
    assert f"rank 1 stopped by SIGTERM after step {step}" in outputs[1][1]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]

    resume = spawn([PYTHON, *gantrain(f"trainer.max_steps={step + 2}", f"hydra.run.dir={run}", "trainer.resume=auto")])
    straight = spawn([PYTHON, *gantrain(f"trainer.max_steps={step + 2}", f"hydra.run.dir={whole}")])
    assert [p.wait(timeout=600) for p in resume + straight] == [0, 0, 0, 0]
    assert_same_state(trained_state(whole), trained_state(run))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "parallel"])
def test_a_sweep_runs_its_jobs_in_parallel_processes(tmp_path, launcher):
    """hydra/launcher=submitit_local (submitit's local executor) and =parallel (joblib, 2 at a time): each job
    in its own process and run directory, with its own seed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [
        f"hydra/launcher={launcher}",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}",
    ]
    done = subprocess.run(
        [PYTHON, "-m", "gantrain", "-m", *args, *TINY_DCGAN, "trainer.max_steps=2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/checkpoints"))
    assert [r.name.split("_")[0] for r in runs] == ["0", "1"]
    ckpts = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=False) for r in runs]
    assert [c["config"]["seed"] for c in ckpts] == [0, 1] and [c["step"] for c in ckpts] == [2, 2]
    assert not torch.equal(ckpts[0]["model"]["g.net.0.weight"], ckpts[1]["model"]["g.net.0.weight"])
    pids = {next(r.glob("events.out.tfevents.*")).name.split(".")[-2] for r in runs}  # the writer's process
    assert len(pids) == 2


@pytest.mark.slow
def test_submitit_tasks_train_data_parallel(tmp_path):
    """Two tasks of one submitit job join one process group from submitit's variables (SLURM's on a cluster)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(
        [PYTHON, "-m", "gantrain", "-m", *args, "hydra.sweep.subdir=run", *TINY_DCGAN, "trainer.max_steps=2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 2
    assert ckpt["images_seen"] == 2 * 2 * 2 * 8  # steps x phases (D, G) x ranks x batch
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
