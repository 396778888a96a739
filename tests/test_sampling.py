"""Sampling from a real checkpoint: exact tensors, seeds, batching, the three output kinds, and the CLI."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision.utils import make_grid

from gantrain import checkpoint as ckpt_io
from gantrain.checkpoint import CheckpointError
from gantrain.errors import GantrainError
from gantrain.sampling import generate, load_model, output_kind, write_samples
from gantrain.train import train
from tests.conftest import REPO, make_cfg

SCRIPT = REPO / "scripts" / "sample.py"


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train(make_cfg(), run_dir)  # tiny DCGAN on digits, 2 steps: (1, 32, 32) images
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def model(ckpt_path):
    return load_model(ckpt_path, "cpu")


def _reference(ckpt_path: Path, n: int, seed: int) -> torch.Tensor:
    """Samples computed by hand from the checkpoint, without gantrain.sampling."""
    ckpt = ckpt_io.load(ckpt_path)
    ref = instantiate(ckpt["config"]["model"])
    ref.load_state_dict(ckpt["model"])
    ref.eval()
    return ref.sample(ref.noise(n, "cpu", generator=torch.Generator().manual_seed(seed)))


def _cli():
    """scripts/sample.py as a module, to call ``main(argv)`` in-process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("sample_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_model_restores_weights_in_eval_mode(ckpt_path, model):
    state = ckpt_io.load(ckpt_path)["model"]
    assert not model.training
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running BatchNorm stats included


def test_pt_equals_samples_recomputed_from_checkpoint(tmp_path, ckpt_path, model):
    n = 6
    [path] = write_samples(generate(model, n, seed=3), tmp_path / "s.pt")
    x = torch.load(path)
    assert x.shape == (n, 1, 32, 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, _reference(ckpt_path, n, seed=3))


def test_seed_decides_the_samples(model):
    a, b, c = generate(model, 5, seed=0), generate(model, 5, seed=0), generate(model, 5, seed=1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(generate(model, 5, seed=0), a)


def test_batching_does_not_change_the_samples(model):
    # All latents are drawn before decoding and eval-mode BatchNorm is per sample, so only float
    # rounding differs (CPU conv kernels may change algorithm with the batch size: ~1e-9 seen).
    whole = generate(model, 10, seed=7, batch_size=256)
    chunked = generate(model, 10, seed=7, batch_size=4)  # batches of 4, 4, 2
    assert chunked.shape == (10, 1, 32, 32)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_png_is_one_grid_of_all_samples(tmp_path, model):
    n = 10
    images = generate(model, n)
    [path] = write_samples(images, tmp_path / "grid.png")
    expected = make_grid(torch.zeros(n, 1, 32, 32), nrow=math.ceil(math.sqrt(n)))  # (3, H, W)
    with Image.open(path) as im:
        assert im.size == (expected.shape[2], expected.shape[1])  # PIL: (W, H)
        assert im.mode == "RGB"
        pixels = np.asarray(im)
    # Top-left cell: normalize with value_range (-1, 1) is (x + 1) / 2; padding is 2 px.
    cell = pixels[2:34, 2:34, 0].astype(int)
    assert np.abs(cell - np.round((images[0, 0].numpy() + 1) / 2 * 255)).max() <= 1


def test_folder_has_one_png_per_sample(tmp_path, model):
    n = 7
    images = generate(model, n, seed=5)
    out = tmp_path / "samples.jpg"  # any suffix but .pt/.png names a folder
    paths = write_samples(images, out)
    assert out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(n)] == [p.name for p in paths]
    with Image.open(out / "000004.png") as im:
        assert im.mode == "L" and im.size == (32, 32)
        pixels = np.asarray(im).astype(int)
    expected = np.round((images[4, 0].numpy().astype(np.float64) + 1) / 2 * 255)
    assert np.abs(pixels - expected).max() <= 1
    assert np.abs(pixels - expected).mean() < 0.01  # off by one only at rare float ties
    write_samples(images[:3], out)  # an existing folder is fine; older files stay
    assert len(list(out.iterdir())) == n


def test_failed_write_keeps_the_old_file(tmp_path, model, monkeypatch):
    path = tmp_path / "s.pt"
    old = generate(model, 2, seed=0)
    write_samples(old, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_samples(generate(model, 2, seed=1), path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]  # no temp file left behind


def test_library_errors(tmp_path, model):
    with pytest.raises(CheckpointError, match=r"checkpoint: checkpoint '.*nope.ckpt' does not exist"):
        load_model(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"--checkpoint: '.*bad.ckpt' is not a readable checkpoint"):
        load_model(bad, what="--checkpoint")
    with pytest.raises(GantrainError, match=r"^num=0: must be an integer >= 1$"):
        generate(model, 0)
    with pytest.raises(GantrainError, match=r"^batch_size=0: must be an integer >= 1$"):
        generate(model, 3, batch_size=0)
    (tmp_path / "taken.png").mkdir()
    with pytest.raises(GantrainError, match=r"is an existing folder, but a .png path names a file"):
        output_kind(tmp_path / "taken.png")
    with pytest.raises(GantrainError, match=r"PNG output needs 1 or 3 channels, these samples have 2"):
        write_samples(torch.zeros(1, 2, 4, 4), tmp_path / "two")


def test_cli_from_another_directory(tmp_path, ckpt_path):
    args = [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(ckpt_path),
        "--num",
        "10",
        "--batch-size",
        "4",
        "--seed",
        "2",
        "--device",
        "cpu",
        "--out",
        "out.pt",
    ]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = torch.load(tmp_path / "out.pt")  # OUT is relative to the cwd
    torch.testing.assert_close(out, _reference(ckpt_path, 10, seed=2), rtol=0, atol=1e-6)  # batches 4, 4, 2

    args[args.index(str(ckpt_path))] = str(tmp_path / "missing.ckpt")
    done = subprocess.run([*args, "--force"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        done.stderr.splitlines()[-1]
        == f"sample.py: error: --checkpoint: checkpoint '{tmp_path / 'missing.ckpt'}' does not exist"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num", "0"], "sample.py: error: --num=0: must be >= 1"),
        (["--num", "3", "--batch-size", "0"], "sample.py: error: --batch-size=0: must be >= 1"),
    ],
)
def test_cli_rejects_bad_counts(capsys, ckpt_path, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(["--checkpoint", str(ckpt_path), "--out", str(tmp_path / "x.pt"), *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message
    assert not (tmp_path / "x.pt").exists()


def test_cli_truncated_checkpoint_is_one_line(capsys, ckpt_path, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(ckpt_path.read_bytes()[:5000])  # e.g. a copy cut short
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(["--checkpoint", str(bad), "--num", "2", "--out", str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"sample.py: error: --checkpoint: '{bad}' is not a readable checkpoint (")
    assert [line for line in err if not line.startswith(("usage:", " "))] == [err[-1]]  # usage, then one line
    assert not (tmp_path / "x.pt").exists()


def test_toy_checkpoint_samples_points(tmp_path):
    train(make_cfg("+experiment=toy_gan", "trainer.max_steps=1"), tmp_path / "run")
    model = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    points = generate(model, 10, seed=0)
    assert points.shape == (10, 2) and torch.isfinite(points).all()
    write_samples(points, tmp_path / "points.pt", progress=False)
    assert torch.equal(torch.load(tmp_path / "points.pt"), points)
    with pytest.raises(GantrainError, match=r"shape \(10, 2\), not images .*write a .pt file"):
        write_samples(points, tmp_path / "points.png", progress=False)


def test_ema_weights_are_sampled_by_default(tmp_path):
    run_dir = tmp_path / "run"
    train(make_cfg("trainer.ema.half_life_images=4", "trainer.max_steps=3"), run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = ckpt_io.load(ckpt_path)
    assert ckpt["ema"]["module"] == "g"
    averaged, raw = load_model(ckpt_path), load_model(ckpt_path, ema=False)
    for name, value in ckpt["ema"]["average"].items():
        assert torch.equal(averaged.g.state_dict()[name], value), name
        assert torch.equal(raw.g.state_dict()[name], ckpt["model"][f"g.{name}"]), name
    assert not torch.equal(averaged.g.net[0].weight, raw.g.net[0].weight)
    for a, b in zip(averaged.d.parameters(), raw.d.parameters()):  # only G is averaged
        assert torch.equal(a, b)

    cli = _cli()
    cli.main(["--checkpoint", str(ckpt_path), "--num", "3", "--out", str(tmp_path / "ema.pt")])
    cli.main(["--checkpoint", str(ckpt_path), "--num", "3", "--out", str(tmp_path / "raw.pt"), "--no-ema"])
    z = torch.Generator().manual_seed(0)
    assert torch.equal(torch.load(tmp_path / "ema.pt"), averaged.sample(averaged.noise(3, "cpu", generator=z)))
    assert not torch.equal(torch.load(tmp_path / "ema.pt"), torch.load(tmp_path / "raw.pt"))


# ----------------------------------------------------------------------------- units of what leaves gantrain
@pytest.mark.parametrize(
    ("data", "overrides", "scale"),
    [("grid25", [], 4.0), ("ring8", ["data.radius=2"], 2.0)],  # grid25: centres at {-4..4}^2; ring8: radius 2
)
def test_sample_script_writes_points_in_the_datas_units(tmp_path, data, overrides, scale):
    """A generator whose output is a known model-unit point: sample.py writes that point times the data's scale."""
    run = tmp_path / "run"
    train(make_cfg("+experiment=toy_gan", f"data={data}", *overrides, "trainer.max_steps=2"), run)
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    point = torch.tensor([0.75, -0.5])  # model units
    last = max(int(k.split(".")[2]) for k in ckpt["model"] if k.startswith("g.net."))  # the output Linear
    for state, prefix in ((ckpt["model"], "g."), (ckpt["ema"]["average"], "")):  # raw weights and their EMA
        state[f"{prefix}net.{last}.weight"].zero_()
        state[f"{prefix}net.{last}.bias"].copy_(point)
    torch.save(ckpt, path)
    out = tmp_path / "points.pt"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(path), "--num", "50", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    points = torch.load(out)
    assert points.shape == (50, 2)
    torch.testing.assert_close(points, (point * scale).expand(50, 2), rtol=0, atol=1e-6)
    model = load_model(path)  # the Python API: the same units
    torch.testing.assert_close(generate(model, 5, progress=False), (point * scale).expand(5, 2), rtol=0, atol=1e-6)
    data_option = instantiate(ckpt["config"]["data"])  # the one conversion, used by the run's own metric too
    torch.testing.assert_close(data_option.to_data_units(point[None]), (point * scale)[None])


def test_images_keep_their_range_when_sampled(model):
    """Image data converts nothing: samples equal the model's own [-1, 1] output."""
    z = model.noise(4, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, 4, seed=0, progress=False), model.sample(z))
