"""The MNIST classifier (scripts/mnist_classifier.py) and its feature extractor (gantrain.extractors.mnist)."""

from __future__ import annotations

import importlib
import re
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from gantrain.errors import ConfigError
from gantrain.extractors.mnist import FEATURES, MnistClassifier, MnistFeatures, to_classifier_input
from tests.conftest import REPO, shared_mnist

sys.path.insert(0, str(REPO / "scripts"))
HOLDOUT = 9000  # train on the first 1,000 images for 3 epochs: seconds, and still far above chance


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, float]:
    """(weights file, the accuracy the script printed), trained once for this module."""
    script = importlib.import_module("mnist_classifier")
    out = tmp_path_factory.mktemp("clf") / "mnist.pt"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = StringIO()
    try:
        with redirect_stdout(printed):
            script.main(
                [
                    "--data",
                    str(shared_mnist()),
                    "--out",
                    str(out),
                    "--epochs",
                    "3",
                    "--holdout",
                    str(HOLDOUT),
                    "--batch-size",
                    "32",
                ]
            )
    finally:
        torch.set_num_threads(n)
    match = re.search(r"held-out accuracy ([0-9.]+)% on the last 9000 of 10000", printed.getvalue())
    assert match, printed.getvalue()
    return out, float(match.group(1))


@pytest.fixture
def untrained(tmp_path) -> Path:
    """A weights file of the right form (random init): enough for shapes and modes."""
    torch.manual_seed(0)
    path = tmp_path / "untrained.pt"
    torch.save({"state_dict": MnistClassifier().state_dict()}, path)
    return path


@pytest.mark.slow
def test_the_extractor_classifies_the_held_out_digits_as_the_script_reported(trained):
    weights, reported = trained
    images, labels = importlib.import_module("mnist_classifier").load_mnist_t10k(shared_mnist())
    net = MnistFeatures(str(weights)).net
    with torch.no_grad():
        predicted = net(to_classifier_input(images[-HOLDOUT:])).argmax(1)  # one pass, not the script's batches
    acc = (predicted == labels[-HOLDOUT:]).double().mean().item()
    assert abs(100 * acc - reported) < 0.006  # printed with 2 decimals
    assert torch.load(weights, weights_only=True)["heldout_accuracy"] == pytest.approx(acc, abs=1 / HOLDOUT)
    assert acc > 0.5  # 10 classes: chance is 0.1


def test_features_have_one_row_per_image_at_any_size_and_channels(untrained):
    extractor = MnistFeatures(str(untrained))
    torch.manual_seed(0)
    grey = torch.rand(5, 1, 32, 32) * 2 - 1
    for shape in [(5, 1, 28, 28), (5, 1, 32, 32), (5, 3, 32, 32), (5, 1, 64, 64), (5, 3, 64, 64)]:
        feats = extractor(torch.rand(shape) * 2 - 1)
        assert feats.shape == (5, FEATURES) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    # An RGB image of three equal channels is the grey image (luma weights sum to 1).
    torch.testing.assert_close(extractor(grey.expand(-1, 3, -1, -1)), extractor(grey), atol=1e-5, rtol=1e-5)
    # A 64 px image made of 2x2 blocks of a 32 px one comes back to nearly it; features barely move.
    big = grey.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert (to_classifier_input(big) - grey).abs().max() < 1e-5
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def test_a_missing_or_foreign_weights_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^weights_path='.*nope\.pt': must be an existing file \(train one with"):
        MnistFeatures(str(tmp_path / "nope.pt"))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "other.pt"
    torch.save({"state_dict": torch.nn.Linear(3, 2).state_dict()}, foreign)
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bare)
    for path in (text, foreign, bare):
        with pytest.raises(ConfigError) as e:
            MnistFeatures(str(path))
        assert str(e.value).startswith(f"weights_path='{path}': must be ") and "\n" not in str(e.value)


def test_the_script_does_not_replace_weights_without_force(tmp_path, capsys):
    script = importlib.import_module("mnist_classifier")
    out = tmp_path / "mnist.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        script.main(["--out", str(out), "--data", str(shared_mnist())])
    assert e.value.code == 2 and out.read_bytes() == b"keep me"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mnist_classifier.py: error: --out {out}: exists; pass --force to replace it"
