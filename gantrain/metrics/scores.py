"""Features of images and the scores between two feature sets, computed by torch-fidelity.

torch-fidelity computes them: FID the TTUR reference way (``fid_features_to_statistics``/``fid_statistics_to_metric``),
KID as the unbiased polynomial-kernel MMD over random subsets (Binkowski et al. 2018), precision/recall from
k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019). This module only feeds it feature matrices (in float64,
so two runs on the same features agree to rounding).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

WHICH = ("fid", "kid", "pr")  # what scores() can compute; "pr" is precision and recall


def features(
    extractor: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 100
) -> torch.Tensor:
    """``extractor``'s features of every image, ``(N, D)`` float32 on the CPU (each output flattened). ``images``: one
    ``(N, C, H, W)`` tensor (split into ``batch_size`` batches) or an iterable of batches, in the data's range [-1, 1];
    each batch moves to the extractor's device. The extractor runs in eval mode without gradients; its previous mode is
    restored."""
    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    was_training = extractor.training
    extractor.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in images:
                out.append(extractor(batch.to(device)).flatten(1).float().cpu())
    finally:
        extractor.train(was_training)
    if not out:
        raise ValueError("features: no images")
    return torch.cat(out)


def scores(
    real: torch.Tensor,
    fake: torch.Tensor,
    which: Sequence[str] = WHICH,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    pr_neighbourhood: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """``{"fid", "kid", "precision", "recall"}`` (those asked for in ``which``) between two ``(N, D)`` feature sets. KID
    is the mean over ``kid_subsets`` subsets of ``min(kid_subset_size, N_real, N_fake)`` features each, drawn with
    ``seed``; precision/recall use the ``pr_neighbourhood``-th nearest neighbour."""
    from torch_fidelity import metric_fid, metric_kid, metric_prc  # imports torchvision: ~2 s, only when scoring

    unknown = [w for w in which if w not in WHICH]
    if unknown:
        raise ValueError(f"scores: unknown {unknown}; allowed: {', '.join(WHICH)}")
    real, fake = real.double().cpu(), fake.double().cpu()
    out: dict[str, float] = {}
    if "fid" in which:
        stats = [metric_fid.fid_features_to_statistics(f) for f in (real, fake)]
        out["fid"] = metric_fid.fid_statistics_to_metric(*stats, verbose=False)[metric_fid.KEY_METRIC_FID]
    if "kid" in which:
        size = min(kid_subset_size, len(real), len(fake))
        kid = metric_kid.kid_features_to_metric(
            real, fake, kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False
        )
        out["kid"] = kid[metric_kid.KEY_METRIC_KID_MEAN]
    if "pr" in which:
        # torch-fidelity's convention: the first set is the generated one.
        prc = metric_prc.prc_features_to_metric(
            fake, real, prc_neighborhood=pr_neighbourhood, save_cpu_ram=False, verbose=False
        )
        out["precision"], out["recall"] = prc[metric_prc.KEY_METRIC_PRECISION], prc[metric_prc.KEY_METRIC_RECALL]
    return out


def intra_fid(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor) -> float:
    """Intra-FID (Miyato & Koyama 2018): the FID between the ``fake`` and the ``real`` features of each class, averaged
    over the classes of ``fake_labels``. ``*_labels``: the ``(N,)`` class of each feature row; every class needs at
    least 2 rows on both sides (a covariance), else ValueError."""
    fids = []
    for c in fake_labels.unique().tolist():
        r, f = real[real_labels == c], fake[fake_labels == c]
        if min(len(r), len(f)) < 2:
            raise ValueError(f"intra_fid: class {c} has {len(r)} reference and {len(f)} generated images; needs >= 2")
        fids.append(scores(r, f, ["fid"])["fid"])
    return sum(fids) / len(fids)
