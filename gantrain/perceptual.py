"""A fixed, pretrained VGG16 feature extractor for perceptual terms (shared by GAN and VAE objectives).

Weights come from torchvision's normal download into the torch hub cache
(``~/.cache/torch/hub/checkpoints/vgg16-397923af.pth``) when online, or from a local file (``weights_path``). The
network is frozen (``requires_grad=False``), stays in eval mode whatever ``.train()`` is called with, and belongs to no
optimizer: gradients flow through it to its input only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gantrain import checks
from gantrain.losses import GeneratorTerm, mean_feature_distance

# Index of the ReLU after which features are taken, in torchvision's vgg16().features.
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}
WEIGHTS = ("imagenet", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _vgg16_features(layer: str, weights: str, weights_path: str | None) -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to ``layer``, with ``weights`` loaded (keys ``"0.weight"``, ...)."""
    checks.choice("layer", layer, VGG16_LAYERS)
    from torchvision.models.vgg import cfgs, make_layers

    # vgg16().features without building (and randomly initialising) the 120M-parameter classifier.
    features = make_layers(cfgs["D"], batch_norm=False)[: VGG16_LAYERS[layer] + 1]
    if checks.choice("weights", weights, WEIGHTS, "random: tests only") == "random":
        return features
    if weights_path:
        path = checks.path("weights_path", weights_path, "file", "a VGG16 state_dict: vgg16-397923af.pth")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
            checks.fail("weights_path", weights_path, "a readable torch state_dict", str(e))
    else:
        from torchvision.models import VGG16_Weights

        url = VGG16_Weights.IMAGENET1K_V1.url
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "no weights here"
            checks.fail(
                "weights_path",
                weights_path,
                f"the path of a downloaded {Path(url).name}",
                f"the ImageNet VGG16 weights are not in torchvision's cache ({cache}) and could not be downloaded "
                f"from {url} ({type(e).__name__}: {e}); or run once online so torchvision caches them",
            )
    if not isinstance(state, dict):
        checks.fail("weights_path", weights_path, "a state_dict", f"it holds a {type(state).__name__}")
    # Accept a whole torchvision vgg16 state_dict ("features.0.weight") or its features part ("0.weight").
    if any(k.startswith("features.") for k in state):
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    wanted = set(features.state_dict())
    missing = wanted - set(state)
    if missing:
        checks.fail("weights_path", weights_path, "VGG16 weights", f"missing {sorted(missing)[:4]}")
    features.load_state_dict({k: state[k] for k in wanted})
    return features


class VGG16Features(nn.Module):
    """Images in [-1, 1] ``(B, 1|3, H, W)`` -> VGG16 activations after ``layer`` (ImageNet-normalised input). Grey
    images are repeated to 3 channels. ``weights='random'`` keeps torchvision's random init (for tests only)."""

    def __init__(self, layer: str = "relu3_3", weights: str = "imagenet", weights_path: str | None = None):
        super().__init__()
        features = _vgg16_features(layer, weights, weights_path)
        for m in features.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # keep the graph to the input simple and safe
        self.net = features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # always eval: fixed statistics, whatever the caller's mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2  # [-1, 1] -> [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)


class PerceptualMatching(GeneratorTerm):
    """Feature matching in a fixed pretrained network: ``weight * ||E phi(x) - E phi(G(z))||^2``, phi = VGG16. With
    ``weight=0`` (off) nothing is loaded. Args as :class:`VGG16Features`; config key ``loss.perceptual``."""

    def __init__(
        self, weight: float = 0.0, layer: str = "relu3_3", weights: str = "imagenet", weights_path: str | None = None
    ):
        super().__init__()
        if weight < 0:
            checks.fail("weight", weight, ">= 0", "0 = off")
        self.weight = weight
        self.vgg = VGG16Features(layer, weights, weights_path) if weight > 0 else None

    def forward(self, d: nn.Module, real: torch.Tensor, fake: torch.Tensor, fake_features: torch.Tensor):
        with torch.no_grad():
            real_features = self.vgg(real)
        return self.weight * mean_feature_distance(real_features, self.vgg(fake))
