"""The ``metrics`` config group: which scores, how many samples, against which images, in which features.

Reference features (of the training data or the ``reference`` folder) are cached in ``cache_dir`` under a key of
the images (data config or file list) and the extractor (class, weights hash): recomputed when either changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gantrain import checks
from gantrain.files import atomic_write
from gantrain.metrics.scores import WHICH, features, scores

log = logging.getLogger(__name__)

TAGS = {"fid": ["metrics/fid"], "kid": ["metrics/kid"], "pr": ["metrics/precision", "metrics/recall"]}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/gantrain/reference`` (``~/.cache/gantrain/reference``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gantrain" / "reference"


def fingerprint(extractor: nn.Module) -> str:
    """The extractor's class and a hash of its parameters and buffers: equal iff it computes the same features."""
    digest = hashlib.sha256(f"{type(extractor).__module__}.{type(extractor).__qualname__}".encode())
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Metrics:
    """FID, KID and precision/recall of a generator's samples against reference images.

    Args:
        which: any of fid, kid, pr (precision/recall), logged as ``metrics/fid``, ``/kid``, ``/precision``, ``/recall``.
        num_samples: generated images scored at each evaluation (published FIDs use 50,000; fewer give a higher,
            noisier FID, comparable only at the same number).
        num_reference: reference images (a fixed random subset when there are more).
        reference: a folder of images (searched recursively) to compare with; null: the training data.
        extractor: the feature network, images in [-1, 1] -> (B, D), any ``nn.Module`` (``_target_``), e.g. a
            domain classifier; null: the FID Inception (:class:`~gantrain.metrics.inception.InceptionFeatures`).
        batch_size: images per forward pass of the generator and the extractor.
        kid_subset_size, kid_subsets: KID's subsets (capped at the number of samples).
        pr_neighbourhood: the k of precision/recall's k-nearest-neighbour balls.
        cache_dir: where reference features are cached; null: ``~/.cache/gantrain/reference``.
        seed: of the evaluation's noise and KID's subsets (the same noise at every evaluation).
    """

    def __init__(
        self,
        which: Sequence[str] = WHICH,
        num_samples: int = 5000,
        num_reference: int = 10000,
        reference: str | None = None,
        extractor: nn.Module | None = None,
        batch_size: int = 100,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        pr_neighbourhood: int = 3,
        cache_dir: str | None = None,
        seed: int = 0,
    ):
        self.which = [checks.choice("which", w, WHICH, "pr: precision and recall") for w in which]
        if not self.which:
            checks.fail("which", list(which), f"a non-empty list of {', '.join(WHICH)}")
        self.num_samples = checks.integer("num_samples", num_samples, at_least=2)
        self.num_reference = checks.integer("num_reference", num_reference, at_least=2)
        self.batch_size = checks.integer("batch_size", batch_size, at_least=1)
        self.kid_subset_size = checks.integer("kid_subset_size", kid_subset_size, at_least=2)
        self.kid_subsets = checks.integer("kid_subsets", kid_subsets, at_least=1)
        self.pr_neighbourhood = checks.integer("pr_neighbourhood", pr_neighbourhood, at_least=1)
        if "pr" in self.which and min(num_samples, num_reference) <= pr_neighbourhood:
            checks.fail("num_samples", num_samples, f"> pr_neighbourhood={pr_neighbourhood}", "and num_reference too")
        self.reference = None if reference is None else str(checks.path("reference", reference, "dir").resolve())
        if extractor is None:
            from gantrain.metrics.inception import InceptionFeatures

            extractor = InceptionFeatures()
        if not isinstance(extractor, nn.Module):
            checks.fail("extractor", type(extractor).__name__, "an nn.Module (images -> features)")
        self.extractor = extractor.requires_grad_(False)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.seed = checks.integer("seed", seed)
        self._real: torch.Tensor | None = None

    @property
    def tags(self) -> list[str]:
        """The names :meth:`evaluate` returns (``metrics/fid``, ...)."""
        return [tag for w in self.which for tag in TAGS[w]]

    def to(self, device: torch.device | str) -> Metrics:
        self.extractor.to(device)
        return self

    def reference_features(self, data: Any, data_key: dict | None = None) -> torch.Tensor:
        """Features of the reference images: ``reference``'s, else ``data``'s training images (``data_key``: its
        config, part of the cache key); from the cache when the images and the extractor are unchanged."""
        if self._real is not None:
            return self._real
        images, about = self._reference_images(data, data_key)
        about = {**about, "num_reference": self.num_reference, "extractor": fingerprint(self.extractor)}
        key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()[:24]
        path = self.cache_dir / f"{key}.pt"
        if path.is_file():
            try:
                self._real = torch.load(path, map_location="cpu", weights_only=True)["features"]
                log.info("metrics: reference features from the cache %s", path)
                return self._real
            except Exception as e:  # noqa: BLE001 - a broken cache entry is recomputed
                log.warning("metrics: cannot read the cached features %s (%s); recomputing them", path, e)
        log.info("metrics: computing the features of %d reference images (cached in %s)", len(images), path)
        self._real = features(self.extractor, _batches(images, self.batch_size))
        try:
            atomic_write(path, lambda f: torch.save({"features": self._real, "about": about}, f), fsync=False)
        except OSError as e:  # a read-only or full cache: evaluate anyway
            log.warning("metrics: cannot cache the reference features in %s (%s)", path, e)
        return self._real

    def _reference_images(self, data: Any, data_key: dict | None) -> tuple[Sequence[torch.Tensor], dict]:
        """(the reference images as a dataset of (C, R, R) tensors, what identifies them)."""
        if not data.images:
            checks.fail("metrics", "on", f"used with image data; {type(data).__name__} has no images")
        if self.reference is not None:
            from gantrain.data import DataError, ImageFolder
            from gantrain.data.folder import image_files

            folder = ImageFolder(path=self.reference, channels=data.channels, resolution=data.resolution, batch_size=1)
            try:
                dataset = folder.dataset()
            except DataError as e:  # names data.path; here it is metrics.reference
                raise DataError(str(e).replace("data.path", "metrics.reference")) from None
            files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in image_files(self.reference)]
            about = {"folder": self.reference, "files": hashlib.sha256(str(files).encode()).hexdigest()}
            about.update(resolution=data.resolution, channels=data.channels)
        else:
            dataset, about = data.training_dataset(), {"data": data_key or repr(vars(data))}
        n = len(dataset)
        if n > self.num_reference:  # a fixed random subset: the first images of a folder may be one class
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: self.num_reference]
            dataset = _Subset(dataset, sorted(picked.tolist()))
        return dataset, about

    def generated_features(
        self, sample: Callable[[torch.Tensor], torch.Tensor], noise: Callable, device
    ) -> torch.Tensor:
        """Features of ``num_samples`` images ``sample(z)``, ``z = noise(n, device, generator)`` from the fixed seed."""
        generator = torch.Generator(device).manual_seed(self.seed)
        sizes = [self.batch_size] * (self.num_samples // self.batch_size)
        sizes += [self.num_samples % self.batch_size] if self.num_samples % self.batch_size else []
        return features(self.extractor, (sample(noise(n, device, generator=generator)) for n in sizes))

    def scores(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """:func:`~gantrain.metrics.scores.scores` with these settings, named ``metrics/<name>``."""
        out = scores(
            real,
            fake,
            self.which,
            kid_subset_size=self.kid_subset_size,
            kid_subsets=self.kid_subsets,
            pr_neighbourhood=self.pr_neighbourhood,
            seed=self.seed,
        )
        return {f"metrics/{name}": value for name, value in out.items()}

    def evaluate(self, model: nn.Module, data: Any, data_key: dict | None = None) -> dict[str, float]:
        """The scores of ``model``'s samples (``model.noise``/``model.sample``, as it is now: swap EMA weights in
        before) against the reference."""
        real = self.reference_features(data, data_key)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return self.scores(real, self.generated_features(model.sample, model.noise, device))


class _Subset:
    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[self.indices[i]]


def _batches(dataset: Sequence[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])
