"""Class-conditional sampling, sample grids and scores (issue 23): labels cycle, unconditional output unchanged,
one-line errors, one grid row per class, intra-FID and class accuracy."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from gantrain import checkpoint as ckpt_io
from gantrain.data import DataOption
from gantrain.errors import ConfigError
from gantrain.extractors import Classifier
from gantrain.extractors.mnist import MnistFeatures, to_classifier_input
from gantrain.losses import BCELoss
from gantrain.metrics import Metrics, features, scores
from gantrain.metrics.loop import direction
from gantrain.metrics.scores import intra_fid
from gantrain.models import GenerativeModel
from gantrain.objectives import GANObjective
from gantrain.pictures import class_rows, samples_picture
from gantrain.sampling import generate, load_model
from gantrain.train import train
from tests.conftest import REPO, make_cfg, shared_mnist
from tests.extractors import TinyFeatures


class Reference(DataOption):
    """Image data that is only its training images and labels, what Metrics reads (``DataOption.reference_images``)."""

    images = True

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.x, self.labels = images, labels

    def training_dataset(self) -> torch.Tensor:
        return self.x

    def training_labels(self) -> torch.Tensor | None:
        return self.labels


K, RES = 10, 32


class TinyCondG(nn.Module):
    """Class-dependent images: a small noise pattern (``0.1 * tanh``) around the grey level ``0.8 * (2y/(K-1) - 1)``,
    so :func:`classes` reads the label back from the mean."""

    def __init__(self, num_classes: int = K, channels: int = 1, resolution: int = RES):
        super().__init__()
        self.num_classes, self.channels, self.resolution, self.latent_shape = num_classes, channels, resolution, (4,)
        self.lin = nn.Linear(4, channels * resolution * resolution)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = 0.1 * torch.tanh(self.lin(z)).view(-1, self.channels, self.resolution, self.resolution)
        return x + (0.8 * (2 * y.float() / (self.num_classes - 1) - 1)).view(-1, 1, 1, 1)


def classes(images: torch.Tensor, num_classes: int = K) -> list[int]:
    """The labels TinyCondG drew ``images`` for."""
    return ((images.mean((1, 2, 3)) / 0.8 + 1) * (num_classes - 1) / 2).round().long().tolist()


class MeanClassifier(TinyFeatures):
    """TinyFeatures that also classify TinyCondG's images by their mean: a :class:`Classifier` of K classes."""

    num_classes = K

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return -((images.mean((1, 2, 3))[:, None] / 0.8 + 1) * (K - 1) / 2 - torch.arange(K)).abs()


def conditional_model(num_classes: int = K) -> GenerativeModel:
    torch.manual_seed(0)
    g = TinyCondG(num_classes)
    return GenerativeModel(g, None, conditional=True, num_classes=num_classes, channels=1, resolution=RES).eval()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train(make_cfg(), run_dir)  # tiny unconditional DCGAN on digits, 2 steps
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def cond_ckpt(ckpt_path, tmp_path_factory):
    """A checkpoint of a conditional TinyCondG model on the digits (the unconditional run's config otherwise)."""
    ckpt = ckpt_io.load(ckpt_path)
    ckpt["config"]["model"] = {
        "_target_": "gantrain.models.generative.GenerativeModel",
        "g": {"_target_": "tests.test_conditional_sampling.TinyCondG"},
        "d": None, "conditional": True, "num_classes": K, "channels": 1, "resolution": RES,
    }  # fmt: skip
    folder = tmp_path_factory.mktemp("cond")
    ckpt["config"]["metrics"] = {
        "_target_": "gantrain.metrics.Metrics", "which": ["fid", "kid"], "num_samples": 40, "num_reference": 300,
        "kid_subset_size": 40, "kid_subsets": 2, "cache_dir": str(folder / "cache"),
        "extractor": {"_target_": "tests.test_conditional_sampling.MeanClassifier"},
    }  # fmt: skip
    ckpt["model"], ckpt["ema"] = conditional_model().state_dict(), None
    torch.save(ckpt, folder / "cond.ckpt")
    return folder / "cond.ckpt"


# --- sampling ---------------------------------------------------------------------------------------------------


def test_labels_cycle_and_the_noise_does_not_depend_on_them():
    model = conditional_model()
    assert classes(generate(model, 23, seed=1, batch_size=4, progress=False)) == [i % K for i in range(23)]
    two = generate(model, 7, seed=1, labels=[3, 5], progress=False)
    assert classes(two) == [3, 5, 3, 5, 3, 5, 3]
    assert classes(generate(model, 7, seed=1, batch_size=3, labels=[3, 5], progress=False)) == classes(two)
    threes = generate(model, 7, seed=1, labels=3, progress=False)
    assert classes(threes) == [3] * 7
    noise = model.noise(7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(two, model.sample(noise, torch.tensor([3, 5, 3, 5, 3, 5, 3])))  # the same noise as ever
    assert torch.equal(threes, model.sample(noise, torch.full((7,), 3)))


def test_unconditional_generate_is_unchanged(ckpt_path):
    model = load_model(ckpt_path)
    old_way = model.sample(model.noise(9, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(generate(model, 9, seed=4, batch_size=4, progress=False), old_way)


def test_library_refuses_classes_it_cannot_take(ckpt_path):
    with pytest.raises(ConfigError, match=r"^labels: this model is unconditional .*; drop labels$"):
        generate(load_model(ckpt_path), 2, labels=1, progress=False)
    with pytest.raises(ConfigError, match=r"^labels=10: out of range, this model has classes 0\.\.9$"):
        generate(conditional_model(), 2, labels=[1, 10], progress=False)


@pytest.mark.parametrize(
    "which, classes_, message",
    [
        ("ckpt_path", ["3"], "--class: this model is unconditional (it was not trained with labels); drop --class"),
        ("cond_ckpt", ["3", "10"], "--class=10: out of range, this model has classes 0..9"),
        ("cond_ckpt", ["-1"], "--class=-1: out of range, this model has classes 0..9"),
    ],
)
def test_cli_class_errors_are_one_line_and_write_nothing(request, capsys, tmp_path, which, classes_, message):
    ckpt = request.getfixturevalue(which)
    for out in (tmp_path / "x.pt", tmp_path / "pngs"):
        with pytest.raises(SystemExit) as exit_info:
            _script("sample").main(["--checkpoint", str(ckpt), "--num", "4", "--out", str(out), "--class", *classes_])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == f"sample.py: error: {message}"
        assert [line for line in err if not line.startswith(("usage:", " "))] == [err[-1]]
        assert not out.exists()


def test_cli_samples_the_classes_asked_for(capsys, tmp_path, cond_ckpt):
    cli = _script("sample")
    cli.main(["--checkpoint", str(cond_ckpt), "--num", "5", "--out", str(tmp_path / "a.pt"), "--class", "2", "7"])
    cli.main(["--checkpoint", str(cond_ckpt), "--num", "12", "--out", str(tmp_path / "b.pt"), "--batch-size", "5"])
    assert classes(torch.load(tmp_path / "a.pt")) == [2, 7, 2, 7, 2]
    assert classes(torch.load(tmp_path / "b.pt")) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # every class in turn


# --- training-time grid ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_classes, num_samples, per_row, shown",
    [
        (10, 64, 6, list(range(10))),  # 60 of the 64 drawn
        (10, 16, 4, [0, 3, 6, 9]),
        (10, 100, 10, list(range(10))),
        (10, 128, 12, list(range(10))),  # 120 of the 128 drawn
        (25, 64, 4, [0, 2, 3, 5, 6, 8, 10, 11, 13, 14, 16, 18, 19, 21, 22, 24]),
        (10, 2, 1, [0, 9]),  # fewer samples than a full row: one sample per row
        (25, 16, 4, [0, 8, 16, 24]),
        (8, 2500, 312, list(range(8))),
    ],
)
def test_grid_has_one_row_per_class(num_classes, num_samples, per_row, shown):
    labels, got_per_row = class_rows(num_classes, num_samples)
    assert got_per_row == per_row and labels.dtype == torch.int64
    assert labels.tolist() == [c for c in shown for _ in range(per_row)]


def test_sampler_draws_the_grid_rows_and_leaves_unconditional_pictures_alone(ckpt_path):
    drawn = []
    render = lambda x, per_row=None: drawn.append((x, per_row)) or torch.zeros(3, 2, 2)  # noqa: E731
    model = conditional_model()
    noise = model.noise(16, generator=torch.Generator().manual_seed(0))
    GANObjective(BCELoss()).sampler(model, render, noise, None)()
    (images, per_row), *_ = drawn
    assert per_row == 4 and classes(images) == [c for c in (0, 3, 6, 9) for _ in range(4)]
    assert torch.equal(images, model.sample(noise, class_rows(K, 16)[0]))
    plain = load_model(ckpt_path)
    noise = plain.noise(16, generator=torch.Generator().manual_seed(0))
    ref = plain.sample(noise)
    picture = samples_picture(plain, lambda x: x, noise)  # render(samples) as before: no per_row
    assert torch.equal(picture, ref)


# --- scores ---------------------------------------------------------------------------------------------------------


def test_conditional_tags_and_their_direction(tmp_path):
    metrics = Metrics(extractor=MeanClassifier(), which=["fid", "kid"], cache_dir=str(tmp_path))
    assert metrics.tags_for(conditional_model()) == ["metrics/fid", "metrics/kid", "metrics/intra_fid",
                                                     "metrics/class_accuracy"]  # fmt: skip
    assert metrics.tags_for(conditional_model(8)) == ["metrics/fid", "metrics/kid", "metrics/intra_fid"]  # 10 != 8
    assert Metrics(extractor=TinyFeatures(), which=["kid"]).tags_for(conditional_model()) == ["metrics/kid"]
    assert isinstance(MeanClassifier(), Classifier) and not isinstance(TinyFeatures(), Classifier)
    assert direction("metrics/class_accuracy") == "max" and direction("metrics/intra_fid") == "min"


def test_evaluate_script_reports_the_conditional_scores(capsys, cond_ckpt):
    _script("evaluate").main(["--checkpoint", str(cond_ckpt), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert {"fid", "kid", "intra_fid", "class_accuracy"} <= result.keys()
    assert result["class_accuracy"] == 100.0  # MeanClassifier reads TinyCondG's labels back
    assert result["intra_fid"] > 0 and result["num"] == 40
    _script("evaluate").main(["--checkpoint", str(cond_ckpt)])
    table = capsys.readouterr().out
    assert "  intra_fid " in table and "  class_accuracy 100" in table


@pytest.fixture(scope="module")
def mnist():
    """(images (N, 1, 32, 32), labels, a classifier trained on images 5,000..7,999 for 3 epochs: ~97% right on the
    last 5,000, what the fake generators below draw)."""
    sys.path.insert(0, str(REPO / "scripts"))
    script = importlib.import_module("mnist_classifier")
    images, labels = script.load_mnist_t10k(shared_mnist())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = script.train(images[5000:8000], labels[5000:8000], epochs=3, batch=32, seed=0)
    finally:
        torch.set_num_threads(n)
    return images, labels, net


class RealDigits(nn.Module):
    """A fake conditional "generator": real MNIST images of class ``(y + shift) % 10`` (the image is picked by the
    noise), so its class accuracy and intra-FID are known."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0):
        super().__init__()
        self.num_classes, self.channels, self.resolution, self.latent_shape = K, 1, RES, (1,)
        self.bank = [images[labels == c] for c in range(K)]
        self.shift = shift

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        picks = (z[:, 0].abs() * 1e4).long()
        return torch.stack([self.bank[(c + self.shift) % K][i % len(self.bank[(c + self.shift) % K])]
                            for c, i in zip(y.tolist(), picks.tolist())])  # fmt: skip


def test_class_accuracy_and_intra_fid_of_real_digits(mnist, tmp_path):
    images, labels, net = mnist
    path = tmp_path / "clf.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    extractor = MnistFeatures(str(path))
    assert isinstance(extractor, Classifier) and extractor.num_classes == 10
    reference = Reference(images[:5000], labels[:5000])
    metrics = Metrics(which=["fid"], num_samples=1000, num_reference=2000, extractor=extractor, batch_size=250,
                      cache_dir=str(tmp_path / "cache"))  # fmt: skip
    # generated: the last 5,000 images (the classifier's training images among them); reference: 2,000 of the first
    right, wrong = (GenerativeModel(RealDigits(images[5000:], labels[5000:], s), None, conditional=True,
                                    num_classes=K, channels=1, resolution=RES) for s in (0, 1))  # fmt: skip
    got_right, got_wrong = metrics.evaluate(right, reference, {"k": 1}), metrics.evaluate(wrong, reference, {"k": 1})
    assert got_right["metrics/class_accuracy"] > 95 and got_wrong["metrics/class_accuracy"] < 2
    # intra-FID by hand: each class's generated features (100 per class) against its reference features
    real_f, real_y = metrics.reference_features(reference), metrics.reference_labels(reference, None, K)
    assert real_y.tolist() == labels[:5000][torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:2000]
                                           .sort().values].tolist()  # fmt: skip
    y = torch.arange(1000) % K
    by_hand = {}
    for name, model in (("right", right), ("wrong", wrong)):
        generator = torch.Generator().manual_seed(0)  # Metrics.seed's, drawn batch by batch as the metrics do
        z = [model.noise(250, generator=generator) for _ in range(4)]
        fake_f = features(extractor, torch.cat([model.sample(zb, yb) for zb, yb in zip(z, y.split(250))]))
        fids = [scores(real_f[real_y == c], fake_f[y == c], ["fid"])["fid"] for c in range(K)]
        by_hand[name] = sum(fids) / K
        assert intra_fid(real_f, real_y, fake_f, y) == pytest.approx(by_hand[name], rel=1e-9)
    assert got_right["metrics/intra_fid"] == pytest.approx(by_hand["right"], rel=1e-6)
    assert got_wrong["metrics/intra_fid"] == pytest.approx(by_hand["wrong"], rel=1e-6)
    print(f"class accuracy {got_right['metrics/class_accuracy']:.1f}% / {got_wrong['metrics/class_accuracy']:.1f}%; "
          f"intra-FID {by_hand['right']:.2f} / {by_hand['wrong']:.2f}; FID {got_right['metrics/fid']:.2f}")  # fmt: skip
    assert by_hand["wrong"] > 5 * by_hand["right"]
    # all samples together: the same images whatever their labels, so FID hardly moves
    assert got_wrong["metrics/fid"] == pytest.approx(got_right["metrics/fid"], rel=0.2)
    # the cache keeps the labels (its key names the format that does)
    [entry] = (tmp_path / "cache").glob("*.pt")
    saved = torch.load(entry, weights_only=True)
    assert torch.equal(saved["labels"], real_y) and saved["about"]["format"] == 2
    again = Metrics(which=["fid"], num_samples=1000, num_reference=2000, extractor=extractor,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert torch.equal(again.reference_labels(Reference(images[:5000]), {"k": 1}, K), real_y)


def test_unlabelled_reference_is_one_line(tmp_path):
    images = torch.zeros(20, 1, RES, RES)
    data = Reference(images)
    metrics = Metrics(
        which=["fid"], num_samples=40, num_reference=20, extractor=TinyFeatures(), cache_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=r"^reference=None: intra_fid .* the training data has no class labels"):
        metrics.reference_labels(data, {"k": 2}, K)
    data.labels = torch.arange(20) % 5  # classes 5..9 have no reference images
    with pytest.raises(ConfigError, match=r"^num_samples=40: intra_fid needs >= 2 images of each .*\[4, 4, 4, 4, 4, 0"):
        Metrics(which=["fid"], num_samples=40, num_reference=20, extractor=TinyFeatures(),
                cache_dir=str(tmp_path)).reference_labels(data, {"k": 3}, K)  # fmt: skip


ACGAN_FIXTURE = REPO / "tests" / "fixtures" / "acgan_mnist_g16.ckpt"  # tests/fixtures/make_acgan_mnist.py


def test_sample_py_class_3_of_a_trained_acgan_draws_threes(mnist, tmp_path):
    """``scripts/sample.py --class 3`` as a user runs it, on a trained conditional checkpoint (the acgan recipe,
    16-wide, 2,000 steps on the MNIST test set): the classifier labels the images it writes 3, and the other
    classes' images mostly as theirs; a class out of range is one line and writes nothing."""
    import subprocess

    images, labels, net = mnist

    def sample(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(REPO / "scripts" / "sample.py"), "--checkpoint", str(ACGAN_FIXTURE), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    done = sample("--num", "200", "--class", "3", "--out", str(tmp_path / "threes.pt"))
    assert done.returncode == 0, done.stderr[-2000:]
    every = sample("--num", "500", "--out", str(tmp_path / "all.pt"))  # every class in turn: sample i of class i % 10
    assert every.returncode == 0, every.stderr[-2000:]
    with torch.no_grad():
        threes = net.eval()(to_classifier_input(torch.load(tmp_path / "threes.pt"))).argmax(1)
        each = net(to_classifier_input(torch.load(tmp_path / "all.pt"))).argmax(1)
    share, overall = (threes == 3).double().mean().item(), (each == torch.arange(500) % 10).double().mean().item()
    print(f"sample.py --class 3: {100 * share:.1f}% labelled 3; every class in turn: {100 * overall:.1f}% right")
    assert share >= 0.9  # measured: 100%
    assert overall >= 0.6  # measured: 73.6% (a 16-wide G after 2,000 steps; chance: 10%)
    wrong = sample("--num", "4", "--class", "10", "--out", str(tmp_path / "x.pt"))
    assert wrong.returncode == 2 and not (tmp_path / "x.pt").exists()
    assert wrong.stderr.strip().splitlines()[-1].endswith("--class=10: out of range, this model has classes 0..9")
