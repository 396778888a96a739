"""Feature extractors for the metrics (``metrics.extractor._target_=...``) beyond the standard Inception."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Classifier(Protocol):
    """An extractor that is also a classifier of ``num_classes`` classes: ``classify(images)`` gives the class logits
    ``(N, num_classes)`` of images in [-1, 1]. With one of the same classes as a conditional model, the metrics add
    the model's class accuracy (``metrics/class_accuracy``). :class:`~gantrain.extractors.mnist.MnistFeatures` is
    one."""

    num_classes: int

    def classify(self, images: torch.Tensor) -> torch.Tensor: ...
