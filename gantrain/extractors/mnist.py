"""A small MNIST digit classifier whose penultimate layer is a feature space for FID/KID/precision-recall.

Inception features know ImageNet, not digits, and need a download; this network is trained offline in a few CPU
minutes by ``scripts/mnist_classifier.py`` (on ``../shared/data/mnist-t10k``) and selected with
``metrics.extractor._target_=gantrain.extractors.mnist.MnistFeatures metrics.extractor.weights_path=PATH``. Its
"classifier FIDs" compare only runs scored with the same weights file, not published Inception FIDs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gantrain import checks

RESOLUTION = 32  # the classifier's input side; 28 and 64 px images are resized to it
FEATURES = 128  # the penultimate layer's width: the dimension of the features
DEFAULT_WEIGHTS = "outputs/mnist_classifier.pt"  # where scripts/mnist_classifier.py writes (git-ignored)


class MnistClassifier(nn.Module):
    """Three conv-ReLU-maxpool blocks (32, 64, 128 channels) and a 128-wide hidden layer; 32x32 grey in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 px
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 px
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 px
        )  # fmt: skip
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Generator output ``(N, 1|3, H, W)`` in [-1, 1] -> ``(N, 1, 32, 32)``: RGB to grey (ITU-R 601 luma, as
    ``data.channels=1`` converts), then a resize to 32 px: bilinear up (28 px), box-averaged down (64 px)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if x.shape[-1] > RESOLUTION or x.shape[-2] > RESOLUTION:
        x = F.adaptive_avg_pool2d(x, RESOLUTION)
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return x


def load_classifier(weights_path: str) -> MnistClassifier:
    """The classifier with the weights ``scripts/mnist_classifier.py`` saved; one-line errors name the file."""
    hint = f"train one with: python scripts/mnist_classifier.py --out {weights_path}"
    path = checks.path("weights_path", weights_path, "file", hint)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        checks.fail("weights_path", weights_path, "a file written by scripts/mnist_classifier.py", f"{e}"[:200])
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    net = MnistClassifier()
    if not isinstance(state, dict):
        checks.fail("weights_path", weights_path, "a file written by scripts/mnist_classifier.py", "no state_dict")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        reason = str(e).strip().splitlines()[0]
        checks.fail("weights_path", weights_path, "the weights of this MNIST classifier", reason)
    return net.requires_grad_(False).eval()


class MnistFeatures(nn.Module):
    """Images in [-1, 1] ``(N, 1|3, H, W)``, any side -> penultimate features ``(N, 128)``; frozen, in eval mode. A
    :class:`~gantrain.extractors.Classifier` of the 10 digits too (``classify``: the logits), so a conditional model
    scored with it gets ``metrics/class_accuracy``.

    Args:
        weights_path: written by ``scripts/mnist_classifier.py``; relative to the launch directory.
    """

    num_classes = 10

    def __init__(self, weights_path: str = DEFAULT_WEIGHTS):
        super().__init__()
        from gantrain.data.folder import absolute

        self.net = load_classifier(str(absolute(weights_path)))
        self.eval()

    def train(self, mode: bool = True) -> MnistFeatures:
        return super().train(False)  # fixed features whatever the caller's mode (dropout off)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_classifier_input(images))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The digit logits ``(N, 10)`` of images as :meth:`forward` takes them."""
        return self.net(to_classifier_input(images))
