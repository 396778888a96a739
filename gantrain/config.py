"""Config schemas derived from the targets' signatures, registered in Hydra's ConfigStore with the resolvers the
configs use; where the configs are (``CONFIG_MODULE``).

A default lives in one place: the signature of the class or function a config node builds.
``schema(Target, sub=schema(Other))`` (hydra-zen's ``builds(..., populate_full_signature=True)``)
turns that signature into a structured config, and each YAML option starts with
``defaults: [/schema/<group>/<name>@_here_, _self_]`` and holds only what differs from it. A
misspelled key in a YAML file, an experiment or on the command line then fails with
``Key '...' not in '...'``. The sub-nodes given here say which class fills each slot of a
composite (the GAN objective's ``gp`` slot holds a :class:`~gantrain.losses.GradientPenalty`), never
a value.

A user's own class needs no schema: a YAML file with its ``_target_`` and arguments is enough (see
the README, "Your own loss or model").
"""

from __future__ import annotations

import importlib.resources
import inspect
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra_zen import ZenField, builds, make_config
from omegaconf import MISSING, OmegaConf

from gantrain import augment, data, losses, optim
from gantrain.cli import CONFIG_MODULE
from gantrain.extractors.mnist import MnistFeatures
from gantrain.metrics import InceptionFeatures, Metrics
from gantrain.models import GenerativeModel, dcgan, mlp, resnet, vae
from gantrain.objectives import GANObjective
from gantrain.perceptual import PerceptualMatching
from gantrain.rundir import run_name, unique_suffix
from gantrain.sweep import swept_keys
from gantrain.trainer import TrainerSettings
from gantrain.vae_objective import BernoulliRecon, GaussianRecon, PerceptualRecon, VAEGANObjective, VAEObjective

# configs/ ships inside the package as `gantrain.configs` (pyproject's package-dir), so an installed
# wheel finds the recipes as well as an editable clone does; CONFIG_MODULE is written in gantrain.cli, which --help
# reads without importing torch.
CONFIG_DIR = Path(str(importlib.resources.files(CONFIG_MODULE)))


def schema(target: Any, **nodes: Any) -> type:
    """A structured config for ``target``: one field per parameter, defaults from its signature.

    A gantrain class that passes ``**kwargs`` on to its base (``Digits(**common)`` -> ``ImageData``)
    also gets the base's parameters.
    """
    base = target.__mro__[1] if isinstance(target, type) else object
    forwards = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    bases = (schema(base),) if forwards and base.__module__.startswith("gantrain") else ()
    # kw_only: required fields may follow the base's defaulted ones; the name shows in "Key 'x' not in ...".
    kw_only = {"zen_dataclass": {"kw_only": True, "cls_name": f"{target.__name__}Config"}}
    return builds(target, populate_full_signature=True, builds_bases=bases, **kw_only, **nodes)


def network_optim(optimizer: type) -> type:
    """``optim.<net>``: the torch optimizer (a ``_partial_``), its ``lr``, schedule, Lookahead and clipping."""
    torch_node = builds(
        optimizer,
        populate_full_signature=True,
        zen_partial=True,  # NetworkOptim.build passes the network's parameters
        # lr is optim.<net>.lr; foreach/fused come from optim.<net>.implementation; the rest are not for GANs.
        zen_exclude=("params", "lr", "foreach", "fused", "capturable", "differentiable", "maximize"),
    )
    lookahead = builds(optim.lookahead, populate_full_signature=True, zen_partial=True)
    return schema(optim.NetworkOptim, optimizer=torch_node, lookahead=lookahead)


def gan_objective(adversarial: type, target: type = GANObjective, **nodes: Any) -> type:
    """A GAN objective with every composable term its ``target`` takes in its slot (each off at its signature's
    weight 0)."""
    terms = dict(
        gp=losses.GradientPenalty,
        r1=losses.R1Penalty,
        r2=losses.R2Penalty,
        aux=losses.AuxiliaryClassifier,
        lecam=losses.LeCamPenalty,
        weight_clip=losses.WeightClip,
        fm=losses.FeatureMatching,
        perceptual=PerceptualMatching,
    )
    takes = inspect.signature(target).parameters
    slots = {name: schema(cls) for name, cls in terms.items() if name in takes}
    return schema(target, adversarial=schema(adversarial), **slots, **nodes)


def vae_model(encoder: type, decoder: type, d: Any = None) -> type:
    return schema(GenerativeModel, g=schema(vae.VAE, encoder=schema(encoder), decoder=schema(decoder)), d=d)


VAE_TERMS = dict(bce=schema(BernoulliRecon), gaussian=schema(GaussianRecon), perceptual=schema(PerceptualRecon))
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "ttur": torch.optim.Adam,  # two learning rates, set in its YAML
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "trainer": {"default": schema(TrainerSettings)},
    "data": {
        "digits": schema(data.Digits),
        "torchvision": schema(data.TorchvisionImages),
        "folder": schema(data.ImageFolder),
        "ring8": schema(data.Ring),
        "grid25": schema(data.Grid),
    },
    "model": {
        "dcgan": schema(GenerativeModel, g=schema(dcgan.Generator), d=schema(dcgan.Discriminator)),
        "resnet": schema(GenerativeModel, g=schema(resnet.Generator), d=schema(resnet.Discriminator)),
        "mlp": schema(GenerativeModel, g=schema(mlp.Generator), d=schema(mlp.Discriminator)),
        "vae": vae_model(vae.ConvEncoder, vae.ConvDecoder),
        "vae_mlp": vae_model(vae.MLPEncoder, vae.MLPDecoder),
        "vaegan": vae_model(vae.ConvEncoder, vae.ConvDecoder, d=schema(dcgan.Discriminator)),
    },
    "loss": {
        "bce": gan_objective(losses.BCELoss),
        "wasserstein": gan_objective(losses.WassersteinLoss),
        "wgan_gp": gan_objective(losses.WassersteinLoss),
        "hinge": gan_objective(losses.HingeLoss),
        "lsgan": gan_objective(losses.LeastSquaresLoss),
        "ragan": gan_objective(losses.RelativisticAverageLoss),
        "rpgan": gan_objective(losses.RelativisticPairingLoss),
        "vae": schema(VAEObjective, **VAE_TERMS),
        "vae_gaussian": schema(VAEObjective, **VAE_TERMS),
        "vaegan": gan_objective(losses.BCELoss, target=VAEGANObjective),
    },
    "optim": {name: make_config(g=network_optim(cls), d=network_optim(cls)) for name, cls in OPTIMIZERS.items()},
    # metrics.extractor is any nn.Module; the Inception option (configs/metrics/extractor/inception.yaml) is checked
    "augment": {
        "none": schema(augment.NoAugment),
        "diffaugment": schema(augment.DiffAugment),
        "ada": schema(augment.ADA),
    },
    "metrics": {"default": schema(Metrics)},
    "metrics/extractor": {"inception": schema(InceptionFeatures), "mnist": schema(MnistFeatures)},
}

# The root: the groups are filled by the defaults list of configs/train.yaml.
# Typed, so ``seed=abc`` fails when the config is composed, as any other key of the wrong type.
Config = make_config(
    seed=ZenField(int, 0),
    experiment_name=ZenField(str, "default"),  # names the run directory: outputs/<experiment_name>/<timestamp>
    model=MISSING,
    loss=MISSING,
    optim=MISSING,
    data=MISSING,
    trainer=MISSING,
    augment=MISSING,  # every D input, real and fake, in both phases (none: D sees the batch itself)
    metrics=ZenField(Any, None),  # null: no FID/KID/PR (metrics=fid turns them on)
)


def register() -> None:
    """Put every schema into Hydra's ConfigStore and register the resolvers (idempotent)."""
    # `${unique:}` in the default hydra.run.dir: two launches in the same second get two directories.
    # Cached in the config (as Hydra's ${now:}), so that a launcher's jobs in other processes (submitit, joblib)
    # resolve the sweep directory the launcher made, and the resolver pickles by reference.
    OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    # `${swept_keys:}` in hydra.sweep.subdir: the sweep's process fills its cache (SweepReport), the jobs read it
    OmegaConf.register_new_resolver("swept_keys", swept_keys, use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="gantrain_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
