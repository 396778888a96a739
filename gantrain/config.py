"""Typed schemas for the config groups, registered in Hydra's ConfigStore.

Each YAML option starts with ``defaults: [/schema/<group>/<name>@_here_, _self_]`` so Hydra merges
it onto one of these dataclasses: a misspelled key in a YAML file, an experiment or on the
command line then fails with ``Key '...' not in '...'`` instead of being silently ignored.
A new option with new arguments adds a dataclass here and one ``store`` line.

Only the entry point (``gantrain.train``) reads the composed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

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
    binarize: str = "none"  # none | static (once, fixed seed) | dynamic (every batch): pixels -> -1/+1
    holdout: int = 0  # the last N images (file order) never trained on; ImageData.heldout() returns them


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


# 2-D Gaussian mixtures (gantrain.toy): points, not images, so no channels/resolution/loader keys.
@dataclass
class RingConfig:
    _target_: str = "gantrain.toy.Ring"
    batch_size: int = 256
    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.01
    num_eval_samples: int = 2500
    normalize: bool = True  # the model sees points / max |centre coordinate|


@dataclass
class GridConfig:
    _target_: str = "gantrain.toy.Grid"
    batch_size: int = 256
    size: int = 5
    spacing: float = 2.0
    std: float = 0.05
    num_eval_samples: int = 2500
    normalize: bool = True  # the model sees points / max |centre coordinate|


# ----------------------------------------------------------------------------- model
@dataclass
class DCGANGeneratorConfig:
    _target_: str = "gantrain.models.dcgan.Generator"
    nz: int = 100
    ngf: int = 64
    channels: int = 3
    resolution: int = 32
    norm: str = "batch"
    dropout: float = 0.0


@dataclass
class DCGANDiscriminatorConfig:
    _target_: str = "gantrain.models.dcgan.Discriminator"
    ndf: int = 64
    channels: int = 3
    resolution: int = 32
    norm: str = "batch"
    spectral_norm: bool = False
    minibatch_std: int = 0  # group size of the minibatch-stddev feature (0: off)
    minibatch_kernels: int = 0  # minibatch-discrimination kernels (0: off)
    minibatch_kernel_dim: int = 16


@dataclass
class DCGANConfig:
    _target_: str = "gantrain.models.GAN"
    resolution: int = 32
    channels: int = 3
    init: str = "normal_0.02"
    g: DCGANGeneratorConfig = field(default_factory=DCGANGeneratorConfig)
    d: DCGANDiscriminatorConfig = field(default_factory=DCGANDiscriminatorConfig)


@dataclass
class ResNetGeneratorConfig:
    _target_: str = "gantrain.models.resnet.Generator"
    nz: int = 128
    ngf: int = 128
    channels: int = 3
    resolution: int = 32
    dropout: float = 0.0


@dataclass
class ResNetDiscriminatorConfig:
    _target_: str = "gantrain.models.resnet.Discriminator"
    ndf: int = 128
    channels: int = 3
    resolution: int = 32
    norm: str = "none"
    spectral_norm: bool = False
    minibatch_std: int = 0
    minibatch_kernels: int = 0
    minibatch_kernel_dim: int = 16


@dataclass
class ResNetConfig:
    _target_: str = "gantrain.models.GAN"
    resolution: int = 32
    channels: int = 3
    init: str = "xavier"
    g: ResNetGeneratorConfig = field(default_factory=ResNetGeneratorConfig)
    d: ResNetDiscriminatorConfig = field(default_factory=ResNetDiscriminatorConfig)


@dataclass
class MLPGeneratorConfig:
    _target_: str = "gantrain.models.mlp.Generator"
    nz: int = 2
    width: int = 256
    depth: int = 3
    out_dim: int = 2
    dropout: float = 0.0
    norm: str = "none"


@dataclass
class MLPDiscriminatorConfig:
    _target_: str = "gantrain.models.mlp.Discriminator"
    in_dim: int = 2
    width: int = 256
    depth: int = 3
    norm: str = "none"
    spectral_norm: bool = False
    minibatch_std: int = 0
    minibatch_kernels: int = 0
    minibatch_kernel_dim: int = 16
    pack: int = 1  # PacGAN: samples per D decision


@dataclass
class MLPConfig:
    _target_: str = "gantrain.models.GAN"
    dim: int = 2  # sample size; g.out_dim and d.in_dim interpolate it. No resolution/channels: not images
    init: str = "xavier"
    g: MLPGeneratorConfig = field(default_factory=MLPGeneratorConfig)
    d: MLPDiscriminatorConfig = field(default_factory=MLPDiscriminatorConfig)


# VAE family (gantrain.models.vae): the VAE is the container's g; d is null (vae, vae_mlp) or a
# discriminator (vaegan).
@dataclass
class ConvEncoderConfig:
    _target_: str = "gantrain.models.vae.ConvEncoder"
    channels: int = 1
    resolution: int = 32
    ndf: int = 64
    latent_dim: int = 32
    norm: str = "none"


@dataclass
class ConvDecoderConfig:
    _target_: str = "gantrain.models.vae.ConvDecoder"
    channels: int = 1
    resolution: int = 32
    ngf: int = 64
    latent_dim: int = 32
    norm: str = "none"


@dataclass
class MLPEncoderConfig:
    _target_: str = "gantrain.models.vae.MLPEncoder"
    channels: int = 1
    resolution: int = 28
    hidden: List[int] = field(default_factory=lambda: [400])
    latent_dim: int = 40
    activation: str = "relu"


@dataclass
class MLPDecoderConfig:
    _target_: str = "gantrain.models.vae.MLPDecoder"
    channels: int = 1
    resolution: int = 28
    hidden: List[int] = field(default_factory=lambda: [400])
    latent_dim: int = 40
    activation: str = "relu"


@dataclass
class VAEConfig:
    _target_: str = "gantrain.models.vae.VAE"
    latent_dim: int = 32
    likelihood: str = "bernoulli"  # bernoulli (decoder logits) | gaussian (decoder means)
    encoder: Any = MISSING
    decoder: Any = MISSING


@dataclass
class ConvVAEConfig(VAEConfig):
    encoder: ConvEncoderConfig = field(default_factory=ConvEncoderConfig)
    decoder: ConvDecoderConfig = field(default_factory=ConvDecoderConfig)


@dataclass
class MLPVAEConfig(VAEConfig):
    encoder: MLPEncoderConfig = field(default_factory=MLPEncoderConfig)
    decoder: MLPDecoderConfig = field(default_factory=MLPDecoderConfig)


@dataclass
class VAEModelConfig:
    _target_: str = "gantrain.models.GAN"
    resolution: int = 32
    channels: int = 1
    latent_dim: int = 32
    init: str = "torch"
    g: ConvVAEConfig = field(default_factory=ConvVAEConfig)
    d: Optional[Any] = None


@dataclass
class MLPVAEModelConfig(VAEModelConfig):
    resolution: int = 28
    latent_dim: int = 40
    g: MLPVAEConfig = field(default_factory=MLPVAEConfig)


@dataclass
class VAEGANModelConfig(VAEModelConfig):
    d: DCGANDiscriminatorConfig = field(default_factory=DCGANDiscriminatorConfig)


# ----------------------------------------------------------------------------- loss
@dataclass
class BCEConfig:
    _target_: str = "gantrain.losses.BCELoss"
    saturating: bool = False
    label_smoothing: float = 0.0  # one-sided: D's real target is 1 - label_smoothing
    instance_noise: float = 0.0  # std of Gaussian noise on every D input


@dataclass
class WassersteinConfig:
    _target_: str = "gantrain.losses.WassersteinLoss"


@dataclass
class HingeConfig:
    _target_: str = "gantrain.losses.HingeLoss"


@dataclass
class LeastSquaresConfig:
    _target_: str = "gantrain.losses.LeastSquaresLoss"
    a: float = 0.0  # D's target for fakes
    b: float = 1.0  # D's target for reals
    c: float = 1.0  # G's target for fakes


# Composable terms: every objective has all of them, each off at weight/strength 0.
@dataclass
class GradientPenaltyConfig:
    _target_: str = "gantrain.losses.GradientPenalty"
    weight: float = 0.0  # lambda; WGAN-GP uses 10
    center: float = 1.0
    every: int = 1  # lazy regularisation: every k-th D step, weight x k


@dataclass
class R1Config:
    _target_: str = "gantrain.losses.R1Penalty"
    gamma: float = 0.0
    every: int = 1


@dataclass
class WeightClipConfig:
    _target_: str = "gantrain.losses.WeightClip"
    clip: float = 0.0  # original WGAN: 0.01


@dataclass
class FeatureMatchingConfig:
    _target_: str = "gantrain.losses.FeatureMatching"
    weight: float = 0.0


@dataclass
class PerceptualConfig:
    _target_: str = "gantrain.perceptual.PerceptualMatching"
    weight: float = 0.0
    layer: str = "relu3_3"  # relu1_2 | relu2_2 | relu3_3 | relu4_3
    weights: str = "imagenet"  # imagenet | random (tests)
    weights_path: Optional[str] = None  # a local vgg16 state_dict instead of torchvision's download/cache


@dataclass
class GANObjectiveConfig:
    _target_: str = "gantrain.objectives.GANObjective"
    adversarial: Any = MISSING
    gp: GradientPenaltyConfig = field(default_factory=GradientPenaltyConfig)
    r1: R1Config = field(default_factory=R1Config)
    weight_clip: WeightClipConfig = field(default_factory=WeightClipConfig)
    fm: FeatureMatchingConfig = field(default_factory=FeatureMatchingConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)


@dataclass
class BCEObjectiveConfig(GANObjectiveConfig):
    adversarial: BCEConfig = field(default_factory=BCEConfig)


@dataclass
class WassersteinObjectiveConfig(GANObjectiveConfig):
    adversarial: WassersteinConfig = field(default_factory=WassersteinConfig)


@dataclass
class HingeObjectiveConfig(GANObjectiveConfig):
    adversarial: HingeConfig = field(default_factory=HingeConfig)


@dataclass
class LeastSquaresObjectiveConfig(GANObjectiveConfig):
    adversarial: LeastSquaresConfig = field(default_factory=LeastSquaresConfig)


# VAE objectives (gantrain.vae_objective): reconstruction terms, each off at weight 0.
@dataclass
class BernoulliReconConfig:
    _target_: str = "gantrain.vae_objective.BernoulliRecon"
    weight: float = 0.0


@dataclass
class GaussianReconConfig:
    _target_: str = "gantrain.vae_objective.GaussianRecon"
    weight: float = 0.0
    sigma: Optional[float] = None  # fixed sigma on [0, 1] pixels; null: the per-image ML sigma (sigma-VAE)


@dataclass
class PerceptualReconConfig:
    _target_: str = "gantrain.vae_objective.PerceptualRecon"
    weight: float = 0.0
    layer: str = "relu3_3"
    weights: str = "imagenet"
    weights_path: Optional[str] = None


@dataclass
class VAEObjectiveConfig:
    _target_: str = "gantrain.vae_objective.VAEObjective"
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0
    bce: BernoulliReconConfig = field(default_factory=BernoulliReconConfig)
    gaussian: GaussianReconConfig = field(default_factory=GaussianReconConfig)
    perceptual: PerceptualReconConfig = field(default_factory=PerceptualReconConfig)


@dataclass
class VAEGANObjectiveConfig(BCEObjectiveConfig):
    _target_: str = "gantrain.vae_objective.VAEGANObjective"
    feature_weight: float = 1.0
    beta: float = 1.0
    kl_warmup_steps: int = 0
    free_bits: float = 0.0


# ----------------------------------------------------------------------------- optim
# optim.<net> (g, d): a torch.optim `_partial_` target plus our per-network keys below, which the
# entry point pops off before instantiating the optimizer (gantrain.optim has the classes they feed).
OPTIM_EXTRA_KEYS = ("schedule", "lookahead", "gradient_clip_val", "gradient_clip_algorithm", "implementation")


@dataclass
class ScheduleConfig:
    _target_: str = "gantrain.optim.Schedule"
    kind: str = "constant"  # constant | step | cosine | exponential | linear
    warmup_steps: int = 0  # linear warm-up: optimizer step i < W runs at lr * (i + 1) / W
    step_size: int = 1000  # step: multiply the lr by gamma every step_size optimizer steps
    gamma: float = 0.5  # step, exponential
    min_lr: float = 0.0  # cosine: the lr at the end of the run


@dataclass
class LookaheadConfig:
    k: int = 0  # slow-weight update every k optimizer steps (Zhang et al. 2019 use 5); 0: off
    alpha: float = 0.5  # slow weights move alpha of the way to the fast ones


@dataclass
class NetworkOptimConfig:
    _target_: str = MISSING  # a torch.optim class
    _partial_: bool = True  # the entry point passes the network's parameters
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lookahead: LookaheadConfig = field(default_factory=LookaheadConfig)
    gradient_clip_val: Optional[float] = None  # null: trainer.gradient_clip_val; 0: no clipping for this network
    gradient_clip_algorithm: Optional[str] = None  # null: trainer.gradient_clip_algorithm; norm | value
    implementation: str = "auto"  # auto (fused/foreach on CUDA where torch has them) | default | foreach | fused


@dataclass
class AdamConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.Adam"
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass
class AdamWConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.AdamW"
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # decoupled
    amsgrad: bool = False


@dataclass
class RMSpropConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.RMSprop"
    lr: float = 5e-5
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False


@dataclass
class SGDConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdagradConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.Adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10


@dataclass
class AdadeltaConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.Adadelta"
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 0.0


@dataclass
class AdamaxConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.Adamax"
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class NAdamConfig(NetworkOptimConfig):
    _target_: str = "torch.optim.NAdam"
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 0.004


# One pair class per optim option: optim.g and optim.d are independent nodes.
@dataclass
class AdamPairConfig:
    g: AdamConfig = field(default_factory=AdamConfig)
    d: AdamConfig = field(default_factory=AdamConfig)


@dataclass
class AdamWPairConfig:
    g: AdamWConfig = field(default_factory=AdamWConfig)
    d: AdamWConfig = field(default_factory=AdamWConfig)


@dataclass
class RMSpropPairConfig:
    g: RMSpropConfig = field(default_factory=RMSpropConfig)
    d: RMSpropConfig = field(default_factory=RMSpropConfig)


@dataclass
class SGDPairConfig:
    g: SGDConfig = field(default_factory=SGDConfig)
    d: SGDConfig = field(default_factory=SGDConfig)


@dataclass
class AdagradPairConfig:
    g: AdagradConfig = field(default_factory=AdagradConfig)
    d: AdagradConfig = field(default_factory=AdagradConfig)


@dataclass
class AdadeltaPairConfig:
    g: AdadeltaConfig = field(default_factory=AdadeltaConfig)
    d: AdadeltaConfig = field(default_factory=AdadeltaConfig)


@dataclass
class AdamaxPairConfig:
    g: AdamaxConfig = field(default_factory=AdamaxConfig)
    d: AdamaxConfig = field(default_factory=AdamaxConfig)


@dataclass
class NAdamPairConfig:
    g: NAdamConfig = field(default_factory=NAdamConfig)
    d: NAdamConfig = field(default_factory=NAdamConfig)


@dataclass
class TTURPairConfig:  # Adam with D's lr 4x G's, beta = (0, 0.9)
    g: AdamConfig = field(default_factory=lambda: AdamConfig(lr=1e-4, betas=[0.0, 0.9]))
    d: AdamConfig = field(default_factory=lambda: AdamConfig(lr=4e-4, betas=[0.0, 0.9]))


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
    "data": {
        "digits": DigitsConfig,
        "torchvision": TorchvisionConfig,
        "folder": FolderConfig,
        "ring8": RingConfig,
        "grid25": GridConfig,
    },
    "model": {
        "dcgan": DCGANConfig,
        "resnet": ResNetConfig,
        "mlp": MLPConfig,
        "vae": VAEModelConfig,
        "vae_mlp": MLPVAEModelConfig,
        "vaegan": VAEGANModelConfig,
    },
    "loss": {
        "bce": BCEObjectiveConfig,
        "wasserstein": WassersteinObjectiveConfig,
        "wgan_gp": WassersteinObjectiveConfig,
        "hinge": HingeObjectiveConfig,
        "lsgan": LeastSquaresObjectiveConfig,
        "vae": VAEObjectiveConfig,
        "vae_gaussian": VAEObjectiveConfig,
        "vaegan": VAEGANObjectiveConfig,
    },
    "optim": {
        "adam": AdamPairConfig,
        "adamw": AdamWPairConfig,
        "rmsprop": RMSpropPairConfig,
        "sgd": SGDPairConfig,
        "adagrad": AdagradPairConfig,
        "adadelta": AdadeltaPairConfig,
        "adamax": AdamaxPairConfig,
        "nadam": NAdamPairConfig,
        "ttur": TTURPairConfig,
    },
}


def register() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="gantrain_schema", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
