"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Each YAML option starts with ``defaults: [/schema/<group>/<name>@_here_, _self_]`` so Hydra merges
it onto one of these dataclasses: a misspelled key in a YAML file, an experiment or on the
command line then fails with ``Key '...' not in '...'`` instead of being silently ignored.
A new option with new arguments adds a dataclass here and one ``store`` line.

Only the entry point (``gantrain.train``) reads the composed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from gantrain.trainer import TrainerSettings


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig(TrainerSettings):
    _target_: str = "gantrain.trainer.TrainerSettings"


# ----------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    _target_: str = MISSING
    batch_size: int = 64
    channels: int = 1
    resolution: int = 32  # the YAML files interpolate ${model.resolution}
    num_workers: int = 0
    in_memory: bool = True  # hold the whole dataset as one tensor on the device


@dataclass
class DigitsConfig(DataConfig):
    _target_: str = "gantrain.data.Digits"


@dataclass
class TorchvisionConfig(DataConfig):
    _target_: str = "gantrain.data.TorchvisionImages"
    name: str = MISSING  # mnist | fashion_mnist | cifar10
    root: str = "./data"
    split: str = "train"
    download: bool = True


@dataclass
class FolderConfig(DataConfig):
    _target_: str = "gantrain.data.ImageFolder"
    path: str = MISSING


# ----------------------------------------------------------------------------- model
@dataclass
class DCGANGeneratorConfig:
    _target_: str = "gantrain.models.dcgan.Generator"
    nz: int = 100
    ngf: int = 64
    channels: int = 3
    resolution: int = 32
    norm: str = "batch"


@dataclass
class DCGANDiscriminatorConfig:
    _target_: str = "gantrain.models.dcgan.Discriminator"
    ndf: int = 64
    channels: int = 3
    resolution: int = 32
    norm: str = "batch"


@dataclass
class DCGANConfig:
    _target_: str = "gantrain.models.GAN"
    resolution: int = 32
    channels: int = 3
    init: str = "normal_0.02"
    g: DCGANGeneratorConfig = field(default_factory=DCGANGeneratorConfig)
    d: DCGANDiscriminatorConfig = field(default_factory=DCGANDiscriminatorConfig)


# ----------------------------------------------------------------------------- loss
@dataclass
class BCEConfig:
    _target_: str = "gantrain.losses.BCELoss"
    saturating: bool = False


@dataclass
class WassersteinConfig:
    _target_: str = "gantrain.losses.WassersteinLoss"


@dataclass
class GradientPenaltyConfig:
    _target_: str = "gantrain.losses.GradientPenalty"
    weight: float = 10.0
    center: float = 1.0


@dataclass
class BCEObjectiveConfig:
    _target_: str = "gantrain.objectives.GANObjective"
    adversarial: BCEConfig = field(default_factory=BCEConfig)
    penalties: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GPPenalties:
    gp: GradientPenaltyConfig = field(default_factory=GradientPenaltyConfig)


@dataclass
class WGANGPObjectiveConfig:
    _target_: str = "gantrain.objectives.GANObjective"
    adversarial: WassersteinConfig = field(default_factory=WassersteinConfig)
    penalties: GPPenalties = field(default_factory=GPPenalties)


# ----------------------------------------------------------------------------- optim
@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True  # the entry point passes the network's parameters
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class AdamPairConfig:
    g: AdamConfig = field(default_factory=AdamConfig)
    d: AdamConfig = field(default_factory=AdamConfig)


# ----------------------------------------------------------------------------- root
@dataclass
class Config:
    seed: int = 0
    experiment_name: str = "default"  # names the run directory: outputs/<experiment_name>/<timestamp>
    model: Any = MISSING
    loss: Any = MISSING
    optim: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


SCHEMAS: dict[str, dict[str, Any]] = {
    "trainer": {"default": TrainerConfig},
    "data": {"digits": DigitsConfig, "torchvision": TorchvisionConfig, "folder": FolderConfig},
    "model": {"dcgan": DCGANConfig},
    "loss": {"bce": BCEObjectiveConfig, "wgan_gp": WGANGPObjectiveConfig},
    "optim": {"adam": AdamPairConfig},
}


def register() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="gantrain_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
