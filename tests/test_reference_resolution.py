"""metrics.reference_resolution: ``native`` scores against the reference images at their own size (MNIST's 28 px,
a folder's files as stored), ``model`` (the default) as before; the protocol each score was computed under is
recorded in the checkpoint, and a resumed run scored under another one says so."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gantrain import checkpoint as ckpt_io
from gantrain.data import DataOption, Digits, TorchvisionImages
from gantrain.errors import ConfigError
from gantrain.metrics import Evaluation, Metrics
from gantrain.metrics.evaluators import Combined
from gantrain.metrics.suite import describe, fingerprint
from gantrain.settings import EvaluationSettings
from gantrain.train import train
from tests.conftest import REPO, make_cfg
from tests.extractors import TinyFeatures
from tests.test_metrics import direct_fid

SEARCHPATH = f"hydra.searchpath=[file://{REPO}/tests/configs]"  # metrics/extractor=tiny: TinyFeatures(dim=8)


class Replay(nn.Module):
    """A stand-in generator: draws noise as a model does, and returns the first of its fixed images (B, 1, 32, 32) in
    [-1, 1] (all of them: one batch of metrics.batch_size >= metrics.num_samples)."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("images", images)

    def noise(self, n: int, device, generator=None) -> torch.Tensor:
        return torch.randn(n, 4, device=device, generator=generator)

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[: len(z)]


def mnist_28px(mnist_dir: Path) -> torch.Tensor:
    """The t10k images (N, 1, 28, 28) read from the IDX bytes here, byte k -> k / 127.5 - 1."""
    raw = gzip.open(mnist_dir / "raw" / "t10k-images-idx3-ubyte.gz").read()
    pixels = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32)
    return torch.from_numpy(pixels / 127.5 - 1)


def test_native_scores_against_the_28px_images_and_model_as_before(mnist_dir, tmp_path):
    """MNIST trained at 32 px: native FID == the FID computed here from the 28 px IDX images' features; model FID ==
    the FID against the pipeline's 32 px images, with the cache key of before; the resampling alone moves it."""
    data = TorchvisionImages(name="mnist", root=str(mnist_dir), split="test", download=False, resolution=32, channels=1)
    pipeline = data.reference_images()[0]
    generated = torch.stack([pipeline[i] for i in range(9000, 9200)])  # real images at 32 px as the "samples"
    extractor, cache, key = TinyFeatures(dim=6), tmp_path / "cache", {"name": "mnist", "resolution": 32}

    def make(**mode) -> Metrics:
        return Metrics(
            which=["fid"], num_samples=200, num_reference=300, extractor=extractor, batch_size=256,
            cache_dir=str(cache), **mode,
        )  # fmt: skip

    native, model = make(reference_resolution="native"), make()
    native_fid = native.evaluate(Replay(generated), data, key)["metrics/fid"]
    model_fid = model.evaluate(Replay(generated), data, key)["metrics/fid"]

    picked = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:300].sort().values  # Metrics' subset
    with torch.no_grad():
        fake = extractor(generated).double().numpy()
        real_native = extractor(mnist_28px(mnist_dir)[picked]).double().numpy()
        real_model = extractor(torch.stack([pipeline[i] for i in picked.tolist()])).double().numpy()
    assert np.abs(native.reference_features(data, key).double().numpy() - real_native).max() < 1e-5
    assert native_fid == pytest.approx(direct_fid(real_native, fake), rel=1e-4)
    assert model_fid == pytest.approx(direct_fid(real_model, fake), rel=1e-4)
    # the same digits on both sides but for the 28 -> 32 px resampling: it alone moves the FID (in these coarse
    # features by 4%; in the MNIST classifier's by far more, see the README)
    assert (native_fid, model_fid) == pytest.approx((0.18771, 0.19610), rel=1e-3)

    # model keeps the cache entry of before this key existed: the same about dict, hence the same file
    about = {"data": key, "num_reference": 300, "extractor": fingerprint(extractor), "format": 2}
    old_key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()[:24]
    assert (cache / f"{old_key}.pt").is_file() and len(list(cache.glob("*.pt"))) == 2
    assert model.protocol == {**native.protocol, "reference_resolution": "model", "size": [32, 32]}
    assert native.protocol == {
        "reference": "training data", "num_reference": 300, "reference_resolution": "native", "size": [28, 28],
        "extractor": "tests.extractors.TinyFeatures", "extractor_sha256": fingerprint(extractor),
    }  # fmt: skip
    assert describe(native.protocol) == (
        f"300 reference images (training data) at 28x28 px (native resolution), TinyFeatures features "
        f"(weights sha256 {fingerprint(extractor)[:12]})"
    )


def test_native_digits_are_8px_and_a_folder_keeps_its_own_size_or_says_why_not(mnist_dir, tmp_path):
    from sklearn.datasets import load_digits

    images, labels = Digits(resolution=32, channels=3, batch_size=8).reference_images(native=True)
    expected = torch.from_numpy(load_digits().images).float() / 8 - 1  # 0..16 -> [-1, 1]
    assert images[5].shape == (3, 8, 8) and torch.allclose(images[5], expected[5].expand(3, 8, 8), atol=1e-6)
    assert len(images) == 1797 and labels[5] == 5

    folder = tmp_path / "reference"
    folder.mkdir()
    for i, f in enumerate(sorted((mnist_dir / "png").rglob("*.png"))[:12]):
        (folder / f"{i:03d}.png").write_bytes(f.read_bytes())
    data = Digits(resolution=32, channels=1, batch_size=8)
    metrics = Metrics(extractor=TinyFeatures(), reference=str(folder), reference_resolution="native", num_reference=12)
    metrics.cache_dir = tmp_path / "cache"
    real = metrics.reference_features(data)
    load = lambda f: torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 127.5 - 1)  # noqa: E731
    with torch.no_grad():
        by_hand = TinyFeatures()(torch.stack([load(f) for f in sorted(folder.glob("*.png"))])[:, None])
    assert metrics.protocol["size"] == [28, 28] and torch.allclose(real, by_hand, atol=1e-5)

    Image.new("L", (30, 20)).save(folder / "zzz.png")  # another size: refused, in one line naming two files
    with pytest.raises(ConfigError) as e:
        Metrics(extractor=TinyFeatures(), reference=str(folder), reference_resolution="native").reference_features(data)
    assert str(e.value) == (
        f"reference_resolution='native': must be model (the images under '{folder}' differ in size ('000.png' is "
        "28x28, 'zzz.png' is 30x20): native needs one size; model resizes each to 32 px)"
    )
    assert e.value.key == "reference_resolution"

    class Own(DataOption):  # a user's own option that does not say what its images' own size is
        images = True

    with pytest.raises(ConfigError) as e:
        Own().reference_images(native=True)
    assert str(e.value) == (
        "reference_resolution='native': must be model (Own does not say what its images' own size is)"
    )


def test_a_bad_value_is_one_line_naming_the_key_and_the_allowed_values(tmp_path):
    assert make_cfg("metrics=fid").metrics.reference_resolution == "model"  # the default, from the signature
    cfg = make_cfg("metrics=fid", "metrics/extractor=tiny", SEARCHPATH, "metrics.reference_resolution=natve")
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run")
    assert str(e.value) == (
        "metrics.reference_resolution='natve': must be one of model, native (model: as the model sees them; native: "
        "as stored)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_checkpoint_records_the_protocol_and_a_resume_under_another_says_so(mnist_dir, tmp_path, caplog):
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, f in enumerate(sorted((mnist_dir / "png").rglob("*.png"))[:30]):
        (folder / f"{i:03d}.png").write_bytes(f.read_bytes())

    def run(max_steps: int, *more: str) -> dict:
        overrides = [
            "metrics=fid", "metrics/extractor=tiny", SEARCHPATH, "metrics.num_samples=16", "metrics.which=[fid]",
            f"metrics.cache_dir={tmp_path / 'cache'}", f"metrics.reference={folder}",
            "metrics.reference_resolution=native", "trainer.eval_every_n_steps=2", "trainer.monitor=metrics/fid",
            f"trainer.max_steps={max_steps}", *more,
        ]  # fmt: skip
        train(make_cfg(*overrides), tmp_path / "run")
        return ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.ckpt")

    saved = run(2)
    weights = fingerprint(TinyFeatures(dim=8))
    protocol = {
        "reference": str(folder.resolve()), "num_reference": 30, "reference_resolution": "native", "size": [28, 28],
        "extractor": "tests.extractors.TinyFeatures", "extractor_sha256": weights,
    }  # fmt: skip
    assert saved["metrics_protocol"] == protocol and saved["best"]["protocol"] == protocol
    assert saved["best"]["step"] == 2

    for f in sorted(folder.glob("*.png"))[20:]:  # other reference images, the same config
        f.unlink()
    caplog.set_level(logging.WARNING, logger="gantrain.metrics.loop")
    resumed = run(4, "trainer.resume=auto")
    now = {**protocol, "num_reference": 20}
    warnings = [r.getMessage() for r in caplog.records if r.name == "gantrain.metrics.loop"]
    assert warnings == [
        f"trainer.monitor: the checkpoint's best metrics/fid={saved['best']['value']:.6g} (step 2) was scored under "
        f"another metrics protocol ({describe(protocol)}; now {describe(now)}): the best starts afresh",
        f"metrics: the checkpoint was scored under another protocol (num_reference differ): {describe(protocol)}; "
        f"now {describe(now)}: its scores and these do not compare",
    ]
    assert resumed["metrics_protocol"] == now and resumed["best"]["step"] == 4 and resumed["best"]["protocol"] == now


def test_a_best_saved_before_protocols_were_recorded_is_kept():
    protocol = {"reference": "training data", "num_reference": 300, "reference_resolution": "model", "size": [32, 32]}
    protocol |= {"extractor": "tests.extractors.TinyFeatures", "extractor_sha256": "0" * 64}
    evaluation = Evaluation(Combined([], protocol), EvaluationSettings(10, "metrics/fid", "auto"))
    old = {"monitor": "metrics/fid", "mode": "min", "value": 12.5, "step": 20}
    evaluation.load_state_dict(dict(old))
    assert evaluation.state_dict() == old
    evaluation.load_state_dict({**old, "protocol": {**protocol, "size": [28, 28]}})
    assert evaluation.state_dict() is None
    evaluation.load_state_dict({**old, "protocol": protocol})
    assert evaluation.state_dict() == {**old, "protocol": protocol}
