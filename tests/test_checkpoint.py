"""Resume bit-equality, same-seed repeatability, atomic writes and clear checkpoint errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gantrain import checkpoint as ckpt_io
from gantrain.checkpoint import CheckpointError
from gantrain.train import train
from tests.conftest import make_cfg


def _load(run_dir: Path) -> dict:
    return ckpt_io.load(run_dir / "checkpoints" / "last.ckpt")


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize(
    "experiment, extra",
    [
        ("dcgan", []),
        ("wgan_gp", []),
        ("wgan", []),  # weight clipping after each D step
        ("hinge_sngan", ["loss.r1.gamma=1", "loss.r1.every=3"]),  # spectral-norm u/v buffers, lazy R1
        ("toy_wgan_gp", ["loss.fm.weight=1"]),  # the mixture stream's own RNG; feature matching
        ("toy_gan", ["data=grid25", "model.d.minibatch_kernels=4", "model.g.dropout=0.2"]),
        ("vae", ["data.binarize=dynamic", "loss.kl_warmup_steps=3"]),  # reparameterisation noise, binarization
        ("vae_mlp", ["loss.free_bits=0.1", "data.holdout=100"]),
        ("vaegan", []),
    ],
)
def test_resume_is_bit_identical(tmp_path, experiment, extra):
    n = 4
    common = [f"+experiment={experiment}", "trainer.checkpoint_every_n_steps=100", *extra]
    train(make_cfg(*common, f"trainer.max_steps={n}"), tmp_path / "straight")
    half = tmp_path / "halves"
    train(make_cfg(*common, f"trainer.max_steps={n // 2}"), half)
    assert _load(half)["step"] == n // 2
    train(make_cfg(*common, f"trainer.max_steps={n}", "trainer.resume=auto"), half)

    straight, resumed = _load(tmp_path / "straight"), _load(half)
    assert resumed["step"] == n
    for key in ("model", "optimizers", "data", "iteration", "images_seen"):
        _assert_same_tensors(straight.get(key), resumed.get(key), key)  # "ema" only with an EMA
    _assert_same_tensors(straight["rng"]["torch"], resumed["rng"]["torch"], "rng")


class Crash(Exception):
    pass


@pytest.mark.parametrize(
    "experiment, extra",
    [
        (  # every optimization option at once: schedules with warm-up, Lookahead, EMA, accumulation
            "wgan_gp",
            [
                "optim.d.schedule.kind=cosine",
                "optim.d.schedule.warmup_steps=3",
                "optim.g.schedule.kind=linear",
                "optim.d.lookahead.k=3",
                "optim.g.lookahead.k=2",
                "trainer.ema.half_life_images=20",
                "trainer.accumulate_grad_batches=2",
                "trainer.gradient_clip_val=1.0",
            ],
        ),
        (
            "dcgan",
            [
                "optim=sgd",
                "optim.g.schedule.kind=step",
                "optim.g.schedule.step_size=2",
                "trainer.ema.half_life_images=50",
            ],
        ),
        ("dcgan", ["trainer.precision=16-mixed", "optim.d.lookahead.k=2"]),  # the scalers' state (fp16 on CPU)
        ("toy_gan", ["optim=ttur", "optim.d.schedule.kind=exponential", "trainer.ema.half_life_images=100"]),
        (  # the VAE through the same machinery: schedule, Lookahead, EMA, accumulation, bf16
            "vae",
            [
                "optim.g.schedule.kind=cosine",
                "optim.g.lookahead.k=2",
                "trainer.ema.half_life_images=30",
                "trainer.accumulate_grad_batches=2",
                "trainer.precision=bf16-mixed",
            ],
        ),
    ],
)
def test_resume_after_a_crash_is_bit_identical_with_every_optimization_option(tmp_path, monkeypatch, experiment, extra):
    """A run killed after its step-3 checkpoint and resumed equals the uninterrupted 6-step run, bit for bit.

    Same ``max_steps`` in both, so the LR schedules have the same horizon; the crash is real (an
    exception out of the loop right after the periodic checkpoint is written).
    """
    from gantrain.checkpoint import Checkpointing

    common = [f"+experiment={experiment}", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3", *extra]
    train(make_cfg(*common), tmp_path / "straight")

    on_step_end = Checkpointing.on_step_end

    def crash_after_checkpoint(self, trainer):
        on_step_end(self, trainer)
        if trainer.step == 3:
            raise Crash

    monkeypatch.setattr(Checkpointing, "on_step_end", crash_after_checkpoint)
    with pytest.raises(Crash):
        train(make_cfg(*common), tmp_path / "crashed")
    monkeypatch.undo()
    assert _load(tmp_path / "crashed")["step"] == 3
    train(make_cfg(*common, "trainer.resume=auto"), tmp_path / "crashed")

    straight, resumed = _load(tmp_path / "straight"), _load(tmp_path / "crashed")
    assert resumed["step"] == 6
    keys = ("model", "optimizers", "schedulers", "scalers", "guard", "ema", "data", "iteration", "images_seen")
    for key in keys:
        _assert_same_tensors(straight.get(key), resumed.get(key), key)  # "ema" only with an EMA
    _assert_same_tensors(straight["rng"]["torch"], resumed["rng"]["torch"], "rng")
    if "trainer.ema.half_life_images" in " ".join(extra):
        assert straight["ema"]["module"] == "g"
        name = next(iter(straight["ema"]["average"]))
        assert not torch.equal(straight["ema"]["average"][name], straight["model"][f"g.{name}"])


def test_resume_from_explicit_path_and_periodic_checkpoint(tmp_path):
    train(make_cfg("trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1"), tmp_path / "a")
    path = tmp_path / "a" / "checkpoints" / "last.ckpt"
    metrics = train(make_cfg("trainer.max_steps=3", f"trainer.resume={path}"), tmp_path / "b")
    assert metrics["step"] == 3
    assert _load(tmp_path / "b")["step"] == 3
    assert _load(tmp_path / "a")["step"] == 2  # the source checkpoint is not touched


def test_same_seed_gives_identical_checkpoints(tmp_path):
    for name in ("a", "b"):
        train(make_cfg("seed=7"), tmp_path / name)
    train(make_cfg("seed=8"), tmp_path / "c")
    a, b, c = (_load(tmp_path / n) for n in "abc")
    _assert_same_tensors(a["model"], b["model"], "model")
    _assert_same_tensors(a["optimizers"], b["optimizers"], "optimizers")
    assert (tmp_path / "a/checkpoints/last.ckpt").read_bytes() == (tmp_path / "b/checkpoints/last.ckpt").read_bytes()
    assert not torch.equal(a["model"]["g.net.0.weight"], c["model"]["g.net.0.weight"])


def test_checkpoint_holds_everything_needed(tmp_path):
    train(make_cfg(), tmp_path)
    ckpt = _load(tmp_path)
    assert {"model", "optimizers", "rng", "data", "config", "step", "iteration", "settings"} <= ckpt.keys()
    assert set(ckpt["optimizers"]) == {"D", "G"}
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["config"]["model"]["g"]["ngf"] == 8  # the resolved config
    assert "${" not in str(ckpt["config"])


def test_checkpoint_from_another_model_fails_clearly(tmp_path):
    train(make_cfg(), tmp_path)
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match=r"another run; these settings differ \(.*\):\n  model.g.ngf: 8 -> 16"):
        train(make_cfg("model.g.ngf=16", "trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"loss.adversarial._target_: 'gantrain.losses.BCELoss' -> 'gantrain.losses.HingeLoss'",
    ):
        train(make_cfg("loss=hinge", "trainer.max_steps=3", "trainer.resume=auto"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before  # nothing overwritten


def test_missing_and_corrupt_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match=r"trainer.resume: checkpoint '.*nope.ckpt' does not exist"):
        train(make_cfg(f"trainer.resume={tmp_path / 'nope.ckpt'}"), tmp_path / "r")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"'.*bad.ckpt' is not a readable checkpoint"):
        train(make_cfg(f"trainer.resume={bad}"), tmp_path / "r")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match=r"is not a gantrain checkpoint"):
        train(make_cfg(f"trainer.resume={other}"), tmp_path / "r")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    assert train(make_cfg("trainer.resume=auto"), tmp_path)["step"] == 2


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "v": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "v": 2}, path)
    monkeypatch.undo()
    assert ckpt_io.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_a_run_dir_with_a_checkpoint_is_not_overwritten_without_resume(tmp_path):
    train(make_cfg(), tmp_path)
    before = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match=r"already holds a checkpoint .*trainer.resume=auto"):
        train(make_cfg("trainer.max_steps=3"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == before
