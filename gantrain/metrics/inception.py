"""The standard FID feature extractor: torch-fidelity's port of the TensorFlow Inception v3 (the original FID code's
weights and bilinear resize to 299 x 299), so that FIDs compare with published numbers computed the same way.

Weights come from the torch hub cache (``~/.cache/torch/hub/checkpoints/``, filled by the first use online) or from an
explicit ``weights_path``; offline without either, building it fails with one line naming both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gantrain import checks

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = Path(WEIGHTS_URL).name


def cached_weights() -> Path:
    """Where torch's hub cache keeps the weights file (it may not be there)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] ``(B, 1|3, H, W)`` -> the 2048 pool features of the FID Inception v3.

    Quantised to uint8 as in a PNG (grey repeated to RGB), resized to 299 px by the network; frozen, in eval mode.

    Args:
        weights_path: the weights file (``weights-inception-2015-12-05-6726825d.pth``); null: torch's hub
            cache, downloading it there when online.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = self._weights(weights_path)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        except Exception as e:  # noqa: BLE001 - any file that does not load is the user's input
            reason = " ".join(str(e).split())[:200]
            checks.fail(
                "weights_path" if weights_path else "the cached weights",
                path,
                f"the FID Inception weights ({WEIGHTS_FILE})",
                f"{type(e).__name__}: {reason}",
            )
        self.net = net.requires_grad_(False).eval()

    @staticmethod
    def _weights(weights_path: str | None) -> Path:
        if weights_path:
            return checks.path("weights_path", weights_path, "file", f"the FID Inception weights: {WEIGHTS_FILE}")
        cache = cached_weights()
        if not cache.is_file():
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, str(cache), progress=False)
            except Exception as e:  # noqa: BLE001 - offline, proxy, disk: all mean "no weights here"
                cache.unlink(missing_ok=True)
                checks.fail(
                    "weights_path",
                    weights_path,
                    f"the path of a downloaded {WEIGHTS_FILE}",
                    f"the FID Inception weights are not in torch's hub cache ({cache}) and could not be downloaded "
                    f"from {WEIGHTS_URL} ({type(e).__name__}); or run once online so that they are cached",
                )
        return cache

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # fixed statistics, whatever the caller's mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)[0]
