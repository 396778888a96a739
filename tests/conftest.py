"""Shared fixtures: compose the real config with Hydra's Compose API, shrunk for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode

from gantrain.config import CONFIG_DIR
from gantrain.train import compose_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Small enough for a 2-core CPU: 8-wide networks, batch 8, a handful of steps.
TINY = [
    "data.batch_size=8",
    "trainer.max_steps=2",
    "trainer.device=cpu",
    "trainer.num_samples=4",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]
# Width keys differ by model family: image GANs (DCGAN, ResNet), the MLP for 2-D data, the conv and
# MLP VAEs (whose networks are model.g.encoder / model.g.decoder), and a VAE-GAN's discriminator.
TINY_WIDTH = {
    "ngf": ["model.g.ngf=8", "model.d.ndf=8"],
    "width": ["model.g.width=16", "model.d.width=16"],
    "conv_vae": ["model.g.encoder.ndf=8", "model.g.decoder.ngf=8"],
    "mlp_vae": ["model.g.encoder.hidden=[16]", "model.g.decoder.hidden=[16]"],
    "d": ["model.d.ndf=8"],
}


def tiny_widths(model: DictConfig) -> list[str]:
    """The TINY_WIDTH overrides that fit a composed ``model`` config."""
    g = model.g
    if "ngf" in g:
        return TINY_WIDTH["ngf"]
    if "width" in g:
        return TINY_WIDTH["width"]
    widths = TINY_WIDTH["conv_vae"] if "ndf" in g.encoder else TINY_WIDTH["mlp_vae"]
    return widths + (TINY_WIDTH["d"] if model.get("d") is not None else [])


def offline_data(data: DictConfig) -> list[str]:
    """Overrides that point a recipe's torchvision MNIST (default: download into ./data) at the shared
    MNIST test set on disk, as tests run offline; none for other data."""
    if data.get("name") != "mnist" or data.get("root") != "./data":
        return []
    return [f"data.root={shared_mnist()}", "data.split=test", "data.download=false"]


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    if not tiny:
        return compose_config(*overrides)
    composed = compose_config(*overrides)
    return compose_config(*TINY, *tiny_widths(composed.model), *offline_data(composed.data), *overrides)


@pytest.fixture
def one_thread():
    """Tiny nets: one intra-op thread is faster, and avoids stalls when the 2 cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shared_mnist() -> Path:
    # The repo sits at <x>/main and the shared data at <x>/shared.
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"]
    if os.environ.get("GANTRAIN_SHARED_DATA"):
        env = Path(os.environ["GANTRAIN_SHARED_DATA"])
        candidates += [env / "mnist-t10k", env / "data" / "mnist-t10k", env]
    for c in candidates:
        if (c / "raw" / "t10k-images-idx3-ubyte.gz").is_file() and (c / "png").is_dir():
            return c
    pytest.skip("shared MNIST t10k files not found (../shared/data/mnist-t10k or $GANTRAIN_SHARED_DATA)")


@pytest.fixture
def mnist_dir() -> Path:
    return shared_mnist()


class HostCopies(TorchDispatchMode):
    """Records each copy of a host tensor to a GPU tensor: on CUDA a blocking one (``torch.tensor(..., device=)``)
    waits for everything queued before it, a whole-GPU synchronisation."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            if src.device.type == "cpu" and dst.device.type == "cuda":
                self.seen.append(f"{func}{tuple(src.shape)}")
        return out
