"""The evaluators of a run, in one place: what ``trainer.eval_every_n_steps`` computes (a new evaluator goes here).

The build hands over typed parts; :func:`evaluators` wires what the model and the data declare (``data.metric_tags``,
``model.encodes`` and ``data.holdout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gantrain import elbo
from gantrain.hydra_errors import within

# data keys that change how the images are loaded, or which of them train (limit), not the reference images: not part
# of the reference features' cache key
LOADING_KEYS = ("batch_size", "num_workers", "in_memory", "download", "skip_corrupt", "root", "limit")


def evaluators(
    model, data, device: torch.device, seed: int, metrics, data_key: dict, loss: Mapping
) -> tuple[list[Callable[[], dict[str, float]]], list[str]]:
    """(the evaluators of this run, the names they report): the data's own metric (the 2-D mixtures' modes),
    ``metrics``' FID/KID/PR on samples (None: no ``metrics=``; reference features are computed or read from the cache
    now, before training, under ``data_key``) and a VAE's held-out ELBO (``loss``: the resolved loss settings, which
    name its likelihood). Each draws its own fixed noise: none touches the training RNG."""
    evaluators: list[Callable[[], dict[str, Any]]] = []
    if data.metric_tags:  # 2-D mixtures: modes covered, % high-quality samples
        noise = model.noise(data.num_eval_samples, device, generator=torch.Generator(device).manual_seed(seed + 1))
        labels = model.balanced_labels(data.num_eval_samples, device)  # a conditional model: every class in turn
        evaluators.append(lambda: data.evaluate(model.sample(noise, labels)))
    if metrics is not None:
        within("metrics", metrics.reference_features, data, data_key)
        if "metrics/intra_fid" in metrics.tags_for(model):  # a conditional model: labelled reference, checked now
            within("metrics", metrics.reference_labels, data, data_key, model.num_classes)
        evaluators.append(lambda: metrics.evaluate(model, data, data_key))
    if model.encodes and data.holdout > 0:
        heldout = within("data", data.heldout, device)
        labels = data.heldout_labels(device) if model.conditional else None  # a conditional VAE's ELBO: log p(x | y)
        likelihood = elbo.likelihood_of_loss(loss)

        def heldout_elbo() -> dict[str, float]:
            generator = torch.Generator(device).manual_seed(seed + 2)
            batches = heldout.split(data.batch_size)
            if labels is not None:
                batches = list(zip(batches, labels.split(data.batch_size)))
            nll = elbo.evaluate_nll(
                model.g, batches, k=1, log_likelihood=likelihood, progress=False, generator=generator
            )
            return {"metrics/elbo": nll["elbo"]}

        evaluators.append(heldout_elbo)
    return evaluators, evaluated_tags(model, data, metrics)


def evaluated_tags(model, data, metrics) -> list[str]:
    """The names :func:`evaluators` report, known before anything is computed (``trainer.monitor`` is checked
    against them before the reference features are)."""
    elbo_tags = ["metrics/elbo"] if model.encodes and data.holdout > 0 else []
    return [*data.metric_tags, *(metrics.tags_for(model) if metrics is not None else []), *elbo_tags]


class Combined:
    """A run's evaluators as one ``() -> {name: value}`` (what :class:`~gantrain.metrics.Evaluation` runs);
    ``protocol``: how its FID/KID/PR are scored (``Metrics.protocol``), None without ``metrics=``."""

    def __init__(self, parts: list[Callable[[], dict[str, float]]], protocol: dict | None = None):
        self.parts, self.protocol = parts, protocol

    def __call__(self) -> dict[str, float]:
        return {k: v for e in self.parts for k, v in e().items()}
