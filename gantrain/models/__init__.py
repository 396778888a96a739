"""Networks. A model config instantiates a container (e.g. :class:`GAN`) holding named networks;
the objective (``loss=`` group) decides which of them each training phase updates."""

from gantrain.models.gan import GAN
from gantrain.models.init import INIT_SCHEMES, initialize

__all__ = ["GAN", "INIT_SCHEMES", "initialize"]
