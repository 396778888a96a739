"""Evaluation of generative models: FID, KID and precision/recall, computed by torch-fidelity.

The Python API (stable; ``scripts/evaluate.py``, the in-loop evaluation and the benchmarks use it):

* :func:`features` ``(extractor, images, batch_size=100) -> Tensor[N, D]``: an ``nn.Module``'s features of
  images in [-1, 1] (a tensor or an iterable of batches), float32 on the CPU;
* :func:`scores` ``(real, fake, which=("fid", "kid", "pr"), *, kid_subset_size=1000, kid_subsets=100,
  pr_neighbourhood=3, seed=0) -> {"fid", "kid", "precision", "recall"}`` between two feature matrices;
* :class:`InceptionFeatures` ``(weights_path=None)``: the standard FID Inception (TensorFlow weights);
* :class:`Metrics`: the ``metrics`` config group (which scores, samples, reference images and their resolution,
  extractor, cached reference features), ``Metrics(...).evaluate(model, data)``; ``Metrics.protocol`` says how it
  scores (reference, count, size, extractor, weights hash), :func:`~gantrain.metrics.suite.describe` in one line;
* :class:`Evaluation`: the Trainer callback behind ``trainer.eval_every_n_steps``, ``trainer.monitor`` and
  ``checkpoints/best.ckpt``.
"""

from gantrain.metrics.inception import InceptionFeatures
from gantrain.metrics.loop import Evaluation
from gantrain.metrics.scores import WHICH, features, scores
from gantrain.metrics.suite import Metrics

__all__ = ["WHICH", "Evaluation", "InceptionFeatures", "Metrics", "features", "scores"]
