"""scripts/recipe_fid.py and scripts/limited_data.py end to end on a 64-image MNIST: train, score, write the table."""

from __future__ import annotations

import gzip
import importlib
import json
import re
import struct
import sys

import pytest
import torch

from gantrain.data.mnist import read_idx
from gantrain.extractors.mnist import MnistClassifier, MnistFeatures
from gantrain.metrics import features, scores
from gantrain.sampling import generate, load_model
from tests.conftest import REPO, shared_mnist

sys.path.insert(0, str(REPO / "scripts"))


def write_idx(path, data: torch.Tensor, magic: int) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{data.ndim}I", magic, *data.shape) + data.numpy().tobytes())


@pytest.fixture
def small_mnist(tmp_path):
    """The first 64 MNIST test images and labels as IDX files under raw/, as the benchmark reads them."""
    raw = shared_mnist() / "raw"
    (tmp_path / "mnist" / "raw").mkdir(parents=True)
    write_idx(
        tmp_path / "mnist/raw/t10k-images-idx3-ubyte.gz", read_idx(raw / "t10k-images-idx3-ubyte.gz", 2051)[:64], 2051
    )
    write_idx(
        tmp_path / "mnist/raw/t10k-labels-idx1-ubyte.gz", read_idx(raw / "t10k-labels-idx1-ubyte.gz", 2049)[:64], 2049
    )
    torch.manual_seed(0)
    torch.save({"state_dict": MnistClassifier().state_dict()}, tmp_path / "clf.pt")
    return tmp_path


def test_the_benchmark_trains_scores_and_writes_a_row(small_mnist, capsys, one_thread):
    bench = importlib.import_module("recipe_fid")
    md = small_mnist / "bench.md"
    md.write_text("# Benchmarks\n\nkept\n")
    argv = ["--recipes", "dcgan", "--steps", "2", "--num", "40", "--data", str(small_mnist / "mnist")]
    argv += ["--weights", str(small_mnist / "clf.pt"), "--out", str(small_mnist / "runs")]
    argv += ["--img-dir", str(small_mnist / "img"), "--write", str(md), "--"]
    argv += [
        "model.g.ngf=8",
        "model.d.ndf=8",
        "data.batch_size=8",
        "trainer.device=cpu",
        "trainer.ema.half_life_images=100",
    ]
    bench.main(argv)
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "<!-- recipe_fid.py:begin -->" in text
    row = re.search(
        r"^\| `dcgan` \| 2 \| 0 \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.e+-]+) \| ([0-9.]+) \| ([0-9.]+) \| ", text, re.M
    )
    assert row, text
    # The row's FID is the FID of 40 samples of the run's EMA generator against the 64 real images.
    extractor = MnistFeatures(str(small_mnist / "clf.pt"))
    ckpt = small_mnist / "runs" / "dcgan" / "seed0" / "checkpoints" / "last.ckpt"
    real = features(extractor, bench.mnist_t10k(small_mnist / "mnist", 32))
    ema = scores(real, features(extractor, generate(load_model(ckpt), 40, progress=False)))
    raw = scores(real, features(extractor, generate(load_model(ckpt, ema=False), 40, progress=False)))
    assert float(row.group(1)) == pytest.approx(ema["fid"], abs=0.006)
    assert float(row.group(2)) == pytest.approx(raw["fid"], abs=0.006) and ema["fid"] != raw["fid"]
    assert float(row.group(4)) == pytest.approx(ema["precision"], abs=6e-4)
    assert (
        small_mnist / "img" / "dcgan_mnist_seed0_step2.png"
    ).is_file() and "![dcgan](img/dcgan_mnist_seed0_step2.png)" in text
    assert "python scripts/recipe_fid.py --recipes dcgan --steps 2" in text
    # Run again: the finished run is scored again, not retrained, and the section is replaced, not added.
    log = small_mnist / "runs" / "dcgan" / "seed0" / "stdout.log"
    mtime = log.stat().st_mtime_ns
    capsys.readouterr()
    bench.main(argv)
    assert "finished run of the same config" in capsys.readouterr().err and log.stat().st_mtime_ns == mtime
    cached = json.loads((small_mnist / "runs" / "dcgan" / "seed0" / "scores.json").read_text())
    assert sorted(k.split(":")[1] for k in cached) == ["ema", "raw"]  # the second call read them back
    # Another config into the same folder: refused in one line, the finished run left as it was.
    with pytest.raises(SystemExit) as e:
        bench.main([*argv, "trainer.ema.half_life_images=50"])
    assert "holds another or an unfinished run; give another --out" in str(e.value) and log.stat().st_mtime_ns == mtime
    assert md.read_text().count("<!-- recipe_fid.py:begin -->") == 1 and md.read_text().count("| `dcgan` | 2 |") == 1


def test_a_missing_classifier_or_data_is_one_line_before_any_training(small_mnist, tmp_path, capsys):
    bench = importlib.import_module("recipe_fid")
    common = ["--recipes", "dcgan", "--steps", "2", "--out", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as e:
        bench.main([*common, "--data", str(small_mnist / "mnist"), "--weights", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"recipe_fid.py: error: --weights '{tmp_path / 'none.pt'}': must be")
    with pytest.raises(SystemExit) as e:
        bench.main([*common, "--data", str(tmp_path), "--weights", str(small_mnist / "clf.pt")])
    assert e.value.code == 2 and "no t10k-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_hand_loop_row_is_scored_and_a_moved_output_folder_is_not_retrained(small_mnist, capsys, one_thread):
    bench = importlib.import_module("recipe_fid")
    common = ["--recipes", "dcgan", "--steps", "2", "--num", "40", "--data", str(small_mnist / "mnist"), "--hand"]
    common += ["--weights", str(small_mnist / "clf.pt")]
    tiny = ["--", "model.g.ngf=8", "model.d.ndf=8", "data.batch_size=8", "trainer.device=cpu"]
    bench.main([*common, "--out", str(small_mnist / "runs"), *tiny])
    row = re.search(r"^\| hand-written DCGAN loop \| 2 \| 0 \| ([0-9.]+) \| — \| ", capsys.readouterr().out, re.M)
    g = small_mnist / "runs" / "hand_dcgan" / "seed0" / "g.pt"
    assert row and g.is_file()
    # The row's FID is that of 40 samples of the loop's saved G against the 64 real images.
    extractor = MnistFeatures(str(small_mnist / "clf.pt"))
    real = features(extractor, bench.mnist_t10k(small_mnist / "mnist", 32))
    fake = features(extractor, generate(bench.hand_generator(g), 40, progress=False))
    assert float(row.group(1)) == pytest.approx(scores(real, fake)["fid"], abs=0.006)
    # The output folder moved: both runs are found finished and scored again, nothing is retrained.
    (small_mnist / "runs").rename(small_mnist / "moved")
    mtime = (small_mnist / "moved" / "hand_dcgan" / "seed0" / "g.pt").stat().st_mtime_ns
    bench.main([*common, "--out", str(small_mnist / "moved"), *tiny])
    err = capsys.readouterr().err
    assert "finished hand loop of the same arguments" in err and "finished run of the same config" in err
    assert (small_mnist / "moved" / "hand_dcgan" / "seed0" / "g.pt").stat().st_mtime_ns == mtime
    # Another hand-loop length into that folder: refused in one line, the saved G left as it was.
    with pytest.raises(SystemExit) as e:
        bench.main([*common[:3], "3", *common[4:], "--out", str(small_mnist / "moved"), *tiny, "trainer.max_steps=2"])
    assert "holds another or an unfinished run" in str(e.value)
    assert (small_mnist / "moved" / "hand_dcgan" / "seed0" / "g.pt").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("extra", [["--hand-lr", "4e-4"], ["--hand", "--hand-lr", "0"]], ids=["without-hand", "zero"])
def test_a_hand_loop_lr_without_the_hand_loop_or_not_positive_is_one_line(small_mnist, tmp_path, capsys, extra):
    bench = importlib.import_module("recipe_fid")
    with pytest.raises(SystemExit) as e:
        bench.main(["--recipes", "dcgan", "--steps", "2", "--out", str(tmp_path / "runs"), *extra])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err == f"recipe_fid.py: error: --hand-lr {float(extra[-1])}: needs --hand, and > 0"
    assert not (tmp_path / "runs").exists()


def test_the_limited_data_benchmark_scores_each_augmentation_and_draws_adas_p(small_mnist, capsys, one_thread):
    """scripts/limited_data.py on 16 of the 64 images: a `none` and an `ada` run trained side by side, each row's
    scores those of its checkpoint, the ratio line their quotient, p at the end the checkpoint's, the p curve the
    logged augment/p, and a rerun scores the finished runs without training them again."""
    bench = importlib.import_module("limited_data")
    md = small_mnist / "bench.md"
    argv = ["--limits", "16", "--augments", "none", "ada", "--seeds", "0", "--steps", "4", "--num", "40"]
    argv += ["--data", str(small_mnist / "mnist"), "--weights", str(small_mnist / "clf.pt")]
    argv += ["--out", str(small_mnist / "runs"), "--img-dir", str(small_mnist / "img"), "--write", str(md)]
    argv += ["--width", "8", "--"]  # model.g.ngf and model.d.ndf
    argv += ["data.batch_size=8", "trainer.device=cpu", "trainer.log_every_n_steps=1"]
    bench.main(argv)
    text = md.read_text()
    fid = {}
    for aug in ("none", "ada"):
        run = small_mnist / "runs" / "limit16" / aug / "seed0"
        (saved,) = json.loads((run / "scores.json").read_text()).values()
        fid[aug] = saved["fid"]
        row = f"| 16 | `{aug}` | 0 | {saved['fid']:.2f} | {saved['kid']:.4g} | {saved['precision']:.3f} | "
        assert row in text, text
        config = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["config"]
        assert config["data"]["limit"] == 16
        assert config["model"]["g"]["ngf"] == config["model"]["d"]["ndf"] == 8  # --width
    ckpt = torch.load(small_mnist / "runs/limit16/ada/seed0/checkpoints/last.ckpt", weights_only=False)
    p = ckpt["augment"]["p"].item()
    assert f"| 16 | `ada` | 0 | {fid['ada']:.2f} |" in text and f" | {p:.3f} | " in text
    assert f"reaches {fid['ada'] / fid['none']:.3f}× no augmentation's mean FID" in text
    curve = bench.p_curve(small_mnist / "runs/limit16/ada/seed0")
    assert [s for s, _ in curve] == [1, 2, 3, 4] and curve[-1][1] == pytest.approx(p, abs=1e-7)
    svg = (small_mnist / "img" / "limited_data_w16_ada_p.svg").read_text()
    assert svg.count("<polyline") == 2 and "limit 16, seed 0" in svg  # the axes and the one ada run's curve
    assert (
        "![ADA p](img/limited_data_w16_ada_p.svg)" in text
        and (small_mnist / "img/limited_data_w16_16_none_seed0.png").is_file()
    )
    capsys.readouterr()
    bench.main(argv)  # both finished: scored again from scores.json, nothing trained
    assert "$ " not in capsys.readouterr().err and md.read_text() == text
    bench.main([*argv[: argv.index("--")], "--tag", "w8", *argv[argv.index("--") :]])  # a second table beside it
    assert "![ADA p](img/w8_ada_p.svg)" in md.read_text() and (small_mnist / "img/w8_16_none_seed0.png").is_file()
    assert (
        md.read_text().startswith(text.rstrip()) and (small_mnist / "img/limited_data_w16_ada_p.svg").read_text() == svg
    )


def test_a_resumed_runs_wall_time_leaves_out_the_time_between_its_sessions(tmp_path):
    bench = importlib.import_module("recipe_fid")
    log = tmp_path / "train.log"
    log.write_text(
        "[2026-12-04 08:00:00,000][gantrain][INFO] - run directory: /r\n"
        "[2026-12-04 08:00:30,500][gantrain.runlog][INFO] - step 10/20: loss/D=1, 400 img/s, ETA 0:00:30\n"
        "[2026-12-04 08:01:40,000][gantrain.runlog][INFO] - finished at step 10\n"
        "resume the run with: ...\n"
        "[2026-12-04 09:00:00,000][gantrain][INFO] - loading the data and building the networks\n"
        "[2026-12-04 09:00:05,000][gantrain][INFO] - run directory: /r\n"
        "[2026-12-04 09:00:25,000][gantrain.runlog][INFO] - step 20/20: loss/D=1, 450 img/s, ETA 0:00:00\n"
    )
    assert bench.log_wall_and_speed(log) == (100.0 + 25.0, 450.0)  # 08:00:00-08:01:40, then 09:00:00-09:00:25


def test_a_run_stopped_by_a_signal_then_continued_to_its_end_counts_as_finished():
    bench = importlib.import_module("recipe_fid")
    stopped = (
        "[2026-12-04 10:20:00,000][gantrain.runlog][INFO] - step 1100/2000: loss/D=1, 400 img/s, ETA 0:05:00\n"
        "[2026-12-04 10:21:42,594][gantrain][WARNING] - stopped by SIGTERM after step 1121/2000; checkpoint: c\n"
    )
    continued = "[2026-12-04 14:18:16,161][gantrain.runlog][INFO] - step 3000/3000: loss/D=0.04, 370 img/s\n"
    assert not bench.log_says_finished(stopped)
    assert bench.log_says_finished(stopped + continued)
    again = stopped.replace("1100/2000", "3100/4000").replace("1121/2000", "3121/4000")
    assert not bench.log_says_finished(stopped + continued + again)  # continued to 4,000 steps, stopped again
    assert not bench.log_says_finished(continued.replace("3000/3000", "2999/3000"))
