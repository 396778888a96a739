"""Evaluation in the loop (trainer.eval_every_n_steps, best.ckpt by trainer.monitor, resume), a sweep ranked by
the monitored metric with a readable hparams table, and scripts/evaluate.py on a GAN checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gantrain import checkpoint as ckpt_io
from gantrain.metrics.suite import describe, fingerprint
from gantrain.train import monitored, train
from tests.conftest import REPO, TINY, make_cfg
from tests.extractors import TinyFeatures

SEARCHPATH = f"hydra.searchpath=[file://{REPO}/tests/configs]"  # tests/configs/metrics/extractor/tiny.yaml


def eval_overrides(cache: Path, *more: str) -> list[str]:
    """FID/KID/PR in TinyFeatures' features every 10 steps, monitored."""
    return [
        "metrics=fid", "metrics/extractor=tiny", SEARCHPATH, "metrics.num_samples=64", "metrics.num_reference=300",
        f"metrics.cache_dir={cache}", "trainer.eval_every_n_steps=10", "trainer.monitor=metrics/fid",
        "trainer.log_every_n_steps=5", "trainer.sample_every_n_steps=100", *more,
    ]  # fmt: skip


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` in the run's event files (all of them: a resume adds one)."""
    found = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
        if tag in acc.Tags()["scalars"]:
            found += [(e.step, e.value) for e in acc.Scalars(tag)]
    return found


def test_in_loop_evaluation_keeps_the_best_checkpoint_and_resume_keeps_the_best(tmp_path, one_thread):
    cfg = make_cfg(*eval_overrides(tmp_path / "cache", "trainer.max_steps=20"))
    metrics = train(cfg, tmp_path / "run")
    fids = scalars(tmp_path / "run", "metrics/fid")
    assert [step for step, _ in fids] == [10, 20]
    assert {"metrics/kid", "metrics/precision", "metrics/recall"} <= set(metrics)
    best_step, best = min(fids, key=lambda f: f[1])
    assert fids[0][1] != fids[1][1]
    assert monitored(cfg, metrics) == pytest.approx(best, rel=1e-6)  # what a sweeper gets: the best, not the last
    saved = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert saved["step"] == best_step and saved["best"]["value"] == pytest.approx(best, rel=1e-6)
    assert ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.ckpt")["best"] == saved["best"]

    # 10 steps, then resumed to 20: step 10 is evaluated once, the best is kept, and the values are the same.
    half = make_cfg(*eval_overrides(tmp_path / "cache", "trainer.max_steps=10"))
    train(half, tmp_path / "resumed")
    cont = make_cfg(*eval_overrides(tmp_path / "cache", "trainer.max_steps=20", "trainer.resume=auto"))
    resumed = train(cont, tmp_path / "resumed")
    again = scalars(tmp_path / "resumed", "metrics/fid")
    assert [step for step, _ in again] == [10, 20]
    assert [v for _, v in again] == pytest.approx([v for _, v in fids], rel=1e-5)
    assert monitored(cont, resumed) == pytest.approx(best, rel=1e-5)
    assert ckpt_io.load(tmp_path / "resumed" / "checkpoints" / "best.ckpt")["step"] == best_step


def test_evaluation_changes_nothing_the_run_trains(tmp_path, one_thread):
    """Building the extractor, sampling and scoring draw no training RNG: the same weights with and without."""
    with_eval = make_cfg(*eval_overrides(tmp_path / "cache", "trainer.max_steps=10", "trainer.eval_every_n_steps=5"))
    train(with_eval, tmp_path / "a")
    train(make_cfg("trainer.max_steps=10"), tmp_path / "b")
    a, b = (ckpt_io.load(tmp_path / r / "checkpoints" / "last.ckpt")["model"] for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_toy_metrics_and_a_vae_heldout_elbo_go_through_the_same_path(tmp_path, one_thread):
    toy = make_cfg(
        "+experiment=toy_gan", "trainer.max_steps=4", "trainer.eval_every_n_steps=2", "trainer.monitor=toy/hq"
    )
    metrics = train(toy, tmp_path / "toy")
    assert [s for s, _ in scalars(tmp_path / "toy", "toy/modes")] == [2, 4]
    assert (tmp_path / "toy" / "checkpoints" / "best.ckpt").is_file() and "best/toy/hq" in metrics
    vae = make_cfg("+experiment=vae_mlp", "data.holdout=32", "trainer.max_steps=4", "trainer.monitor=metrics/elbo")
    metrics = train(vae, tmp_path / "vae")
    assert [s for s, _ in scalars(tmp_path / "vae", "metrics/elbo")] == [4]  # eval_every_n_steps=0: at the end
    assert metrics["metrics/elbo"] < 0 and monitored(vae, metrics) == metrics["metrics/elbo"]


def hparams_of(run_dir: Path) -> tuple[dict, list[str]]:
    """The hparams row (name -> value) and the registered metric tags of a run's event file."""
    (events,) = run_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    content = acc.summary_metadata
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"].plugin_data.content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"].plugin_data.content)
    row = {
        k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        for k, v in start.session_start_info.hparams.items()
    }
    tags = [m.name.tag for m in experiment.experiment.metric_infos]
    return row, tags


def test_a_sweep_returns_each_jobs_monitored_metric_and_readable_hparams(tmp_path):
    sweep = tmp_path / "sweep"
    words = ["-m", *TINY, "model.g.ngf=8", "model.d.ndf=8", "trainer.max_steps=10", "optim.d.lr=1e-4,4e-4"]
    words += eval_overrides(tmp_path / "cache", f"hydra.sweep.dir={sweep}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gantrain", *words], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    returned = [float(v) for v in re.findall(r"best metrics/fid=(\S+) at step \d+ in ", r.stdout + r.stderr)]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 == len(returned)
    for job, value in zip(jobs, returned):
        assert value == pytest.approx(min(v for _, v in scalars(job, "metrics/fid")), rel=1e-5)
        row, tags = hparams_of(job)
        assert "optim.d.lr" in row and not any("_target_" in k or "_partial_" in k for k in row)
        assert row["experiment"] == "default" and row["seed"] == 0
        assert "trainer.max_steps" not in row  # the same in every job: no column
        assert {"metrics/fid", "metrics/kid", "metrics/precision", "metrics/recall"} <= set(tags)
    assert sorted(hparams_of(j)[0]["optim.d.lr"] for j in jobs) == pytest.approx([1e-4, 4e-4])
    # the sweep's ranking: each job's best FID (lowest first) and the step of that best
    best = {str(j.resolve()): min((v, s) for s, v in scalars(j, "metrics/fid")) for j in jobs}
    rows = [line.split() for line in (sweep / "ranking.txt").read_text().splitlines()[2:]]
    assert [r[3] for r in rows] == sorted(best, key=best.get)
    assert [(float(r[1]), int(r[2])) for r in rows] == [pytest.approx(best[r[3]], rel=1e-5) for r in rows]
    (events,) = jobs[0].glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    command = next(v for k, v in texts.items() if k.startswith("command"))
    assert command.split()[:4] == ["python", "-m", "gantrain", "data.batch_size=8"]  # job 0's own command, no -m
    assert "optim.d.lr=0.0001" in command.split() and "optim.d.lr=1e-4,4e-4" not in command
    code = next(v for k, v in texts.items() if k.startswith("code"))
    assert re.search(r"[0-9a-f]{40}|not a git checkout", code)


def test_evaluate_script_scores_a_gan_checkpoint(tmp_path, one_thread, capsys):
    train(make_cfg("trainer.max_steps=3", "trainer.ema.half_life_images=100"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    spec = importlib.util.spec_from_file_location("evaluate", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--checkpoint", str(ckpt), "--num", "64", "--metrics", "extractor={_target_:tests.extractors.TinyFeatures}"]
    args += [f"cache_dir={tmp_path / 'cache'}"]

    def run(*more: str) -> str:
        script.main([*args, *more])
        return capsys.readouterr().out

    table = run()
    assert "(step 3, EMA weights): 64 samples vs the run's training data, TinyFeatures features" in table
    weights = fingerprint(TinyFeatures())[:12]
    protocol = "1797 reference images (training data) at 32x32 px (model resolution), TinyFeatures features "
    protocol += f"(weights sha256 {weights})"
    assert table.splitlines()[1] == f"  protocol: {protocol}"
    lines = {line.split()[0]: float(line.split()[1]) for line in table.splitlines()[2:]}
    assert set(lines) == {"fid", "kid", "precision", "recall"} and lines["fid"] > 0
    out = json.loads(run("--json"))
    assert out["fid"] == pytest.approx(lines["fid"], rel=1e-5) and out["num"] == 64 and out["weights"] == "EMA"
    raw = json.loads(run("--json", "--no-ema"))
    assert raw["weights"] == "raw" and raw["fid"] != out["fid"]
    fewer = json.loads(run("--json", "--metrics", "extractor={_target_:tests.extractors.TinyFeatures}", "which=[fid]"))
    assert set(fewer) & {"fid", "kid", "precision", "recall"} == {"fid"}
    assert describe(out["protocol"]) == protocol and out["protocol"]["reference_resolution"] == "model"
    tiny = "extractor={_target_:tests.extractors.TinyFeatures}"
    native = json.loads(run("--json", "--metrics", tiny, "reference_resolution=native"))  # the digits' own 8 px
    assert native["protocol"] == {**out["protocol"], "reference_resolution": "native", "size": [8, 8]}
    assert native["fid"] != pytest.approx(out["fid"], rel=1e-3)
    # a run of a gantrain before reference_resolution: its metrics config lacks the key, which still may be set
    older = ckpt_io.load(ckpt)
    older["config"]["metrics"] = {
        "_target_": "gantrain.metrics.Metrics",
        "extractor": {"_target_": "tests.extractors.TinyFeatures"},
    }
    ckpt_io.save_atomic(older, tmp_path / "older.ckpt")
    again = json.loads(
        run("--json", "--checkpoint", str(tmp_path / "older.ckpt"), "--metrics", "reference_resolution=native")
    )
    assert again["protocol"] == native["protocol"] and again["fid"] == pytest.approx(native["fid"], rel=1e-5)
    with pytest.raises(SystemExit):
        run("--metrics", tiny, "reference_resolution=28")
    assert capsys.readouterr().err.splitlines()[-1] == (
        "evaluate.py: error: --metrics reference_resolution=28: must be one of model, native (model: as the model "
        "sees them; native: as stored)"
    )


@pytest.mark.slow  # two trainings in a subprocess, ~25 s
def test_the_readme_optuna_sweep_runs_and_optimizes_the_monitored_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("gantrain -m hydra/sweeper="))
    words = [w.replace("n_trials=20", "n_trials=2") for w in shlex.split(line)[1:]]
    words += [*TINY, "model.g.ngf=8", "model.d.ndf=8", "trainer.max_steps=4", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    words += eval_overrides(tmp_path / "cache", "trainer.eval_every_n_steps=2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "gantrain", *words], capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    returned = [float(v) for v in re.findall(r"best metrics/fid=(\S+) at step \d+ in ", out)]
    best = re.search(r"Best value: (\S+)", out)
    assert len(returned) == 2 and best and float(best.group(1)) == pytest.approx(min(returned), rel=1e-5)
