"""The command line as users type it: from another working directory, multirun, console script,
one-line errors, and what lands in the run directory / TensorBoard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gantrain import checkpoint as ckpt_io
from gantrain.train import train
from tests.conftest import TINY, TINY_WIDTH, make_cfg
from tests.test_experiments import EXPECTED_LOGS

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*(exe or [sys.executable, "-m", "gantrain"]), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_from_another_directory_uses_default_run_dir(tmp_path):
    r = run_cli(["+experiment=dcgan", *TINY, *TINY_WIDTH["ngf"]], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "dcgan").iterdir())  # outputs/<experiment>/<timestamp>
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()  # Hydra's, with interpolations
    resolved = (run / "config.yaml").read_text()
    assert "${" not in resolved and "resolution: 32" in resolved
    assert (run / "samples" / "step_0000002.png").is_file()
    assert list(run.glob("events.out.tfevents.*"))


def test_multirun_sweeps_optimizers_one_tensorboard_run_each(tmp_path):
    """``-m optim=adam,rmsprop,sgd``: one run directory per optimizer, each with its own events file."""
    r = run_cli(
        [
            "-m",
            "+experiment=dcgan",
            "optim=adam,rmsprop,sgd",
            "optim.g.lr=1e-4",
            *TINY,
            *TINY_WIDTH["ngf"],
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == ["0_optim-adam", "1_optim-rmsprop", "2_optim-sgd"]  # the swept key only
    targets = []
    for run in runs:
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        ckpt = ckpt_io.load(run / "checkpoints" / "last.ckpt")
        targets.append(ckpt["config"]["optim"]["d"]["optimizer"]["_target_"])
        assert ckpt["config"]["optim"]["g"]["lr"] == 1e-4
    assert targets == ["torch.optim.adam.Adam", "torch.optim.rmsprop.RMSprop", "torch.optim.sgd.SGD"]


def test_console_script_composes_the_recipe(tmp_path):
    script = Path(sys.executable).parent / "gantrain"
    if not script.exists():
        pytest.skip("gantrain console script not installed in this environment")
    r = run_cli(["+experiment=wgan_gp", "--cfg", "job"], cwd=tmp_path, exe=[str(script)])
    assert r.returncode == 0, r.stderr
    assert "n_critic: 5" in r.stdout and "gantrain.losses.GradientPenalty" in r.stdout


def test_user_error_is_one_line_not_a_traceback(tmp_path):
    r = run_cli(
        ["data=folder", f"data.path={tmp_path}/missing", *TINY, *TINY_WIDTH["ngf"], f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
    )
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert f"data.path '{tmp_path}/missing' does not exist" in out
    assert "Traceback" not in out


def test_unknown_experiment_lists_options_on_the_cli(tmp_path):
    r = run_cli(["+experiment=nope"], cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "gantrain: error: experiment=nope: must be one of acgan, cgan_pd, cvae, dcgan, " in r.stderr
    assert "wgan_gp (the options in experiment/)" in r.stderr


def test_tensorboard_gets_scalars_samples_config_and_hparams(tmp_path):
    cfg = make_cfg("+experiment=wgan_gp", "trainer.sample_every_n_steps=1", "optim.d.lr=3e-4")
    train(cfg, tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    want = EXPECTED_LOGS | {"loss/D/gp"}
    assert want <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss/G")] == [1, 2]
    assert acc.Scalars("lr/D")[0].value == pytest.approx(3e-4)
    assert acc.Scalars("lr/G")[0].value == pytest.approx(cfg.optim.g.lr)
    assert [e.step for e in acc.Images("samples")] == [1, 2]  # every step; the final grid not twice
    assert any(t.startswith("config") for t in tags["tensors"])
    assert "_hparams_/session_start_info" in acc.summary_metadata


def run_script(name: str, args: list[str], cwd) -> None:
    """Run ``scripts/<name>`` in a subprocess (as a user would) and require success."""
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # whole processes at the recipes' sizes (~1 min on 2 busy cores)
def test_bench_script_runs_and_writes_its_section(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# x\n<!-- bench.py:begin -->\nold\n<!-- bench.py:end -->\ntail\n")
    args = ["--recipes", "vae", "--rounds", "1", "--steps", "1", "2", "--detail-rounds", "1", "--detail-steps", "1"]
    run_script("bench.py", [*args, "--write", str(doc)], tmp_path)
    text = doc.read_text()
    assert "| vae | (1, 2) |" in text and "| hand loop |" in text and "old" not in text and text.endswith("tail\n")


@pytest.mark.slow  # ~45 s: two short toy trainings through the script
def test_toy_benchmark_script_writes_its_table(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# x\n")
    args = ["--recipes", "toy_gan", "--data", "grid25", "--seeds", "0", "1", "--out", str(tmp_path / "runs")]
    args += ["--write", str(doc), "--", "trainer.max_steps=2", "model.g.width=8", "model.d.width=8"]
    run_script("toy_benchmark.py", args, tmp_path)
    text = doc.read_text()
    assert "| `toy_gan` | `grid25` |" in text and "PacGAN4 24.8 / 93.6" in text
    assert (tmp_path / "runs" / "toy_gan_grid25_s1" / "checkpoints" / "last.ckpt").is_file()


def test_recipe_grids_script_copies_the_last_grid(tmp_path, mnist_dir):
    doc, img = tmp_path / "bench.md", tmp_path / "img"
    folder = tmp_path / "png"
    for src in sorted((mnist_dir / "png").rglob("*.png"))[:20]:
        (folder / src.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / src.parent.name / src.name).write_bytes(src.read_bytes())
    args = ["--recipes", "lsgan", "--steps", "2", "--data-path", str(folder), "--img-dir", str(img)]
    args += ["--out", str(tmp_path / "runs"), "--write", str(doc), "--", *TINY_WIDTH["ngf"], TINY[0]]
    run_script("recipe_grids.py", args, tmp_path)
    assert (img / "lsgan_mnist_step2.png").is_file()
    assert "| `lsgan` | 2 |" in doc.read_text() and "img/lsgan_mnist_step2.png" in doc.read_text()


def test_vae_benchmark_script_trains_evaluates_and_writes_its_table(tmp_path, mnist_dir):
    doc = tmp_path / "bench.md"
    doc.write_text("# x\n")
    args = ["--runs", "vae_mlp", "--k", "3", "--data-root", str(mnist_dir), "--out", str(tmp_path / "runs")]
    args += [
        "--write",
        str(doc),
        "--",
        "trainer.max_steps=2",
        "model.g.encoder.hidden=[8]",
        "model.g.decoder.hidden=[8]",
    ]
    run_script("vae_benchmark.py", args, tmp_path)
    text = doc.read_text()
    assert "| `vae_mlp` |" in text and "k=3 on the 2,000 held-out images" in text and "98.6 nats" in text
    assert (tmp_path / "runs" / "vae_mlp" / "checkpoints" / "last.ckpt").is_file()
