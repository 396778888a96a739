"""Networks. A model config instantiates a container (e.g. :class:`GAN`) holding named networks;
the objective (``loss=`` group) decides which of them each training phase updates.

Families: :mod:`~gantrain.models.dcgan`, :mod:`~gantrain.models.resnet` (SNGAN) and
:mod:`~gantrain.models.mlp` (toy vectors); shared blocks in :mod:`~gantrain.models.layers`.
"""

from gantrain.models.gan import GAN
from gantrain.models.init import INIT_SCHEMES, initialize
from gantrain.models.layers import (
    DiscriminatorHead,
    MinibatchDiscrimination,
    MinibatchStdDev,
    apply_spectral_norm,
    norm_layer,
)

__all__ = [
    "GAN",
    "INIT_SCHEMES",
    "DiscriminatorHead",
    "MinibatchDiscrimination",
    "MinibatchStdDev",
    "apply_spectral_norm",
    "initialize",
    "norm_layer",
]
