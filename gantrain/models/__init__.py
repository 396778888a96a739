"""Networks. A model config instantiates a container (:class:`GenerativeModel`) holding named networks;
the objective (``loss=`` group) decides which of them each training phase updates.

Families: :mod:`~gantrain.models.dcgan`, :mod:`~gantrain.models.resnet` (SNGAN) and
:mod:`~gantrain.models.mlp` (toy vectors); shared blocks in :mod:`~gantrain.models.layers`.
"""

from gantrain.models.generative import GenerativeModel
from gantrain.models.init import INIT_SCHEMES, initialize
from gantrain.models.layers import (
    ConditionalBatchNorm,
    DiscriminatorHead,
    MinibatchDiscrimination,
    MinibatchStdDev,
    apply_spectral_norm,
    norm_layer,
)

GAN = GenerativeModel  # the name before 0.2: checkpoints written then build `gantrain.models.GAN`

__all__ = [
    "GAN",
    "GenerativeModel",
    "INIT_SCHEMES",
    "ConditionalBatchNorm",
    "DiscriminatorHead",
    "MinibatchDiscrimination",
    "MinibatchStdDev",
    "apply_spectral_norm",
    "initialize",
    "norm_layer",
]
