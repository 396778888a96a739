"""Shared fixtures: compose the real config with Hydra's Compose API, shrunk for CPU tests."""

from __future__ import annotations

from pathlib import Path

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
