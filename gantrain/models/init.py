"""Weight initialisation schemes shared by every model (``model.init``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from gantrain import checks

INIT_SCHEMES = ("normal_0.02", "xavier", "kaiming", "orthogonal", "torch")

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def _raw_weight(m: nn.Module) -> torch.Tensor:
    """The trainable weight tensor: ``parametrizations.weight.original`` under spectral norm, else ``weight``."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


def _refresh_spectral_norm(m: nn.Module) -> None:
    """Re-run the power iteration of a spectral-norm parametrization for the re-initialised weight. ``u``, ``v`` were
    converged (15 iterations, as torch does at registration) for the old weight; left stale, the first training steps
    would divide by a too-small sigma."""
    if not parametrize.is_parametrized(m, "weight"):
        return
    original = m.parametrizations.weight.original
    for p in m.parametrizations.weight:
        if isinstance(p, parametrizations._SpectralNorm) and original.ndim > 1:
            p._power_method(p._reshape_weight_to_matrix(original), 15)


@torch.no_grad()
def initialize(module: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv/linear weight of ``module`` in place; biases to 0. ``normal_0.02`` is Radford et al.'s
    DCGAN init (weights N(0, 0.02), norm gains N(1, 0.02)); the others use torch's ``xavier_normal_``,
    ``kaiming_normal_`` (LeakyReLU 0.2) and ``orthogonal_`` with norm gains at 1; ``torch`` leaves PyTorch's per-layer
    defaults. A spectrally normalised weight has its unnormalised ``parametrizations.weight.original`` initialised (and
    its power iteration re-run). Parameters of other layers (e.g.
    :class:`~gantrain.models.layers.MinibatchDiscrimination`'s ``T``, and every ``nn.Embedding``: conditional BatchNorm
    gains at 1 and biases at 0, projection and label embeddings) keep their own init."""
    checks.choice("init", scheme, INIT_SCHEMES)  # the argument of the GAN that calls this
    if scheme == "torch":  # keep every layer's own PyTorch default init (the usual choice for VAEs)
        return module
    for m in module.modules():
        if isinstance(m, _WEIGHTED):
            w = _raw_weight(m)
            if scheme == "normal_0.02":
                nn.init.normal_(w, 0.0, 0.02)
            elif scheme == "xavier":
                nn.init.xavier_normal_(w)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(w, a=0.2, nonlinearity="leaky_relu")
            else:
                nn.init.orthogonal_(w)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            _refresh_spectral_norm(m)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            if scheme == "normal_0.02":
                nn.init.normal_(m.weight, 1.0, 0.02)
            else:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module
