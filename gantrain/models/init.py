"""Weight initialisation schemes shared by every model (``model.init``)."""

from __future__ import annotations

import torch
from torch import nn

from gantrain.errors import ConfigError

INIT_SCHEMES = ("normal_0.02", "xavier", "kaiming", "orthogonal")

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


@torch.no_grad()
def initialize(module: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv/linear weight of ``module`` in place; biases to 0.

    ``normal_0.02`` is Radford et al.'s DCGAN init (weights N(0, 0.02), norm gains N(1, 0.02));
    the others use torch's ``xavier_normal_``, ``kaiming_normal_`` (LeakyReLU 0.2) and
    ``orthogonal_`` with norm gains at 1.
    """
    if scheme not in INIT_SCHEMES:
        raise ConfigError(f"model.init: unknown scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            if scheme == "normal_0.02":
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_normal_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
            else:
                nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            if scheme == "normal_0.02":
                nn.init.normal_(m.weight, 1.0, 0.02)
            else:
                nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module
