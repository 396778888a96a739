"""gantrain.metrics: FID/KID/precision-recall (torch-fidelity) against direct computations, on hand-made
features and on real images with a small extractor; the Inception's one-line errors; the reference cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from gantrain.errors import ConfigError
from gantrain.metrics import InceptionFeatures, Metrics, features, scores
from tests.conftest import REPO, TINY
from tests.extractors import TinyFeatures


def direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + tr(S_x + S_y - 2 sqrtm(S_x S_y)) (Heusel et al. 2017), with scipy's sqrtm."""
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(sx @ sy).real
    return float(((mx - my) ** 2).sum() + np.trace(sx + sy - 2 * root))


def direct_kid(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), both sets of size m."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: kk.sum() - np.trace(kk)  # noqa: E731
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def direct_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaenniemi et al. 2019: a sample is covered when it lies in a ball around a sample of the other set
    whose radius is that sample's distance to its k-th nearest neighbour in its own set."""
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # noqa: E731
    radius = lambda a: np.sort(dist(a, a), axis=1)[:, k]  # noqa: E731 (column 0 is the point itself)
    precision = (dist(fake, real) <= radius(real)[None, :]).any(1).mean()
    recall = (dist(real, fake) <= radius(fake)[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_fid_equals_the_direct_computation_is_zero_on_equal_sets_and_symmetric():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    fid = scores(torch.from_numpy(x), torch.from_numpy(y), ["fid"])["fid"]
    assert fid == pytest.approx(direct_fid(x, y), rel=1e-6) and fid > 1
    assert scores(torch.from_numpy(y), torch.from_numpy(x), ["fid"])["fid"] == pytest.approx(fid, rel=1e-9)
    assert abs(scores(torch.from_numpy(x), torch.from_numpy(x), ["fid"])["fid"]) < 1e-9


def test_kid_is_the_unbiased_polynomial_kernel_mmd_on_a_hand_example():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, -1.0]])
    y = np.array([[2.0, 0.0], [0.0, 2.0], [1.5, 1.5], [-1.0, 0.5]])
    # One subset of all 4 features: the subset is a permutation of the set, which the estimate ignores.
    kid = scores(torch.from_numpy(x), torch.from_numpy(y), ["kid"], kid_subset_size=4, kid_subsets=1)["kid"]
    assert kid == pytest.approx(direct_kid(x, y), rel=1e-9)
    # By hand, 1-D, m = 2: k(a, b) = (ab + 1)^3. x = {0, 1}, y = {2, 3}:
    # within x: 2 k(0, 1) / (2 * 1) = 1; within y: 2 k(2, 3) / 2 = 343; across: 2 (1 + 1 + 27 + 64) / 4 = 46.5.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])
    assert scores(x, y, ["kid"], kid_subset_size=2, kid_subsets=1)["kid"] == pytest.approx(1 + 343 - 46.5)


def test_precision_and_recall_on_a_hand_worked_example():
    # 1-D features. Real 0, 1, 2, 3, 20, 21: each one's nearest real neighbour is 1 away (radius 1).
    # Fake 0.5, 2.9, 5, 10: nearest fake neighbours 2.4, 2.1, 2.1, 5 away.
    # Precision: 0.5 and 2.9 lie in a real ball, 5 and 10 do not -> 2/4.
    # Recall: 0..3 lie in the balls of 0.5/2.9, 20 and 21 are 10+ from every fake (10's radius is 5) -> 4/6.
    real = torch.tensor([0.0, 1, 2, 3, 20, 21]).unsqueeze(1)
    fake = torch.tensor([0.5, 2.9, 5, 10]).unsqueeze(1)
    out = scores(real, fake, ["pr"], pr_neighbourhood=1)
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(4 / 6)
    assert (out["precision"], out["recall"]) == pytest.approx(direct_pr(real.numpy(), fake.numpy(), 1))
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(80, 3)), rng.normal(size=(60, 3)) + 0.7
    out = scores(torch.from_numpy(a), torch.from_numpy(b), ["pr"], pr_neighbourhood=3)
    assert (out["precision"], out["recall"]) == pytest.approx(direct_pr(a, b, 3))


def mnist_pngs(mnist_dir: Path, n: int, offset: int) -> list[Path]:
    files = sorted((mnist_dir / "png").rglob("*.png"))
    picked = np.random.default_rng(offset).choice(len(files), n, replace=False)
    return [files[i] for i in sorted(picked)]


def test_library_and_direct_computation_agree_on_mnist_with_a_small_extractor(mnist_dir, tmp_path):
    """The whole library path (a reference folder read by Metrics, features(), scores()) against features
    computed here image by image with PIL and the scores computed directly, to 1e-4."""
    real_files, fake_files = mnist_pngs(mnist_dir, 150, 0), mnist_pngs(mnist_dir, 120, 1)
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, f in enumerate(real_files):
        (folder / f"{i:03d}.png").write_bytes(f.read_bytes())
    load = lambda f: torch.from_numpy(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 127.5 - 1)  # noqa: E731
    fake_images = torch.stack([load(f) for f in fake_files]).unsqueeze(1)
    extractor = TinyFeatures(dim=6)
    metrics = Metrics(
        extractor=extractor, reference=str(folder), num_reference=150, cache_dir=str(tmp_path / "cache"),
        kid_subset_size=120, kid_subsets=1, batch_size=32,
    )  # fmt: skip
    data = SimpleNamespace(images=True, channels=1, resolution=28)
    real = metrics.reference_features(data)
    got = metrics.scores(real, features(extractor, fake_images, batch_size=50))
    with torch.no_grad():
        x = torch.cat([extractor(load(f)[None, None]) for f in real_files]).double().numpy()
        y = torch.cat([extractor(img[None]) for img in fake_images]).double().numpy()
    assert np.abs(real.double().numpy() - x).max() < 1e-5
    assert got["metrics/fid"] == pytest.approx(direct_fid(x, y), rel=1e-4) and got["metrics/fid"] > 0.01
    # KID's one subset of 120 of the 150 real features: the same subset drawn directly (torch-fidelity's RNG use)
    rng = np.random.RandomState(0)
    xs, ys = x[rng.choice(150, 120, replace=False)], y[rng.choice(120, 120, replace=False)]
    assert got["metrics/kid"] == pytest.approx(direct_kid(xs, ys), rel=1e-4)
    p, r = direct_pr(x, y, 3)
    assert (got["metrics/precision"], got["metrics/recall"]) == pytest.approx((p, r), abs=1e-4)


def test_reference_features_are_cached_and_recomputed_when_images_or_extractor_change(mnist_dir, tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, f in enumerate(mnist_pngs(mnist_dir, 20, 2)):
        (folder / f"{i:03d}.png").write_bytes(f.read_bytes())
    data, cache = SimpleNamespace(images=True, channels=1, resolution=28), tmp_path / "cache"
    make = lambda seed: Metrics(extractor=TinyFeatures(seed=seed), reference=str(folder), cache_dir=str(cache))  # noqa: E731
    first = make(0).reference_features(data)
    assert len(list(cache.glob("*.pt"))) == 1
    entry = next(cache.glob("*.pt"))
    torch.save({"features": torch.full_like(first, 7.0)}, entry)  # a cached value is used as it is
    assert torch.equal(make(0).reference_features(data), torch.full_like(first, 7.0))
    other = make(1).reference_features(data)  # other weights: another entry
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.equal(other, first)
    (folder / "000.png").unlink()  # other images: another entry
    assert len(make(0).reference_features(data)) == 19 and len(list(cache.glob("*.pt"))) == 3


def test_inception_offline_without_weights_is_one_line_naming_both(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    with pytest.raises(ConfigError) as e:
        InceptionFeatures()
    message = str(e.value)
    assert "\n" not in message and message.startswith("weights_path=None: must be the path of a downloaded weights-")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in message


def _offline(*args, **kwargs):
    raise OSError("no network")


def test_inception_weights_of_another_network_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save(TinyFeatures().state_dict(), bad)
    with pytest.raises(ConfigError) as e:
        InceptionFeatures(weights_path=str(bad))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"weights_path='{bad}': must be the FID Inception weights")


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "gantrain", *TINY, "model.g.ngf=8", "model.d.ndf=8", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )  # fmt: skip


def test_the_command_line_stops_before_training_with_one_line(tmp_path):
    """Offline without weights, and with a weights file of another network: one line each, exit 1, nothing trained."""
    r = run_cli(["metrics=fid", f"hydra.run.dir={tmp_path}/a"], tmp_path, TORCH_HOME=str(tmp_path / "torch"))
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "weights_path" in line]
    assert len(lines) == 1 and "metrics.extractor.weights_path=None: must be the path of a downloaded" in lines[0]
    assert "hub/checkpoints/weights-inception-2015-12-05-6726825d.pth" in lines[0]
    assert not (tmp_path / "a" / "checkpoints").exists()
    bad = tmp_path / "other.pth"
    torch.save(TinyFeatures().state_dict(), bad)
    r = run_cli(["metrics=fid", f"metrics.extractor.weights_path={bad}", f"hydra.run.dir={tmp_path}/b"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert f"metrics.extractor.weights_path='{bad}': must be the FID Inception weights" in r.stderr + r.stdout
