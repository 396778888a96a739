"""Shared fixtures: compose the real config with Hydra's Compose API, shrunk for CPU tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from gantrain.train import CONFIG_DIR, compose_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Small enough for a 2-core CPU: 8-wide networks, batch 8, a handful of steps.
TINY = [
    "model.g.ngf=8",
    "model.d.ndf=8",
    "data.batch_size=8",
    "trainer.max_steps=2",
    "trainer.device=cpu",
    "trainer.num_samples=4",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    return compose_config(*(TINY if tiny else []), *overrides)


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
