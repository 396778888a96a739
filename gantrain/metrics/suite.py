"""The ``metrics`` config group: which scores, how many samples, against which images, in which features.

Reference features (of the training data or the ``reference`` folder) are cached with their class labels in
``cache_dir`` under a key of the images (data config or file list, and ``reference_resolution=native``) and the
extractor (class, weights hash): recomputed when either changes.

A class-conditional model is scored on ``num_samples`` samples of balanced labels (sample ``i`` of class
``i % num_classes``: ``num_samples // num_classes`` per class) and gets, beside the scores of all its samples,
``metrics/intra_fid`` (with ``fid``): the mean over classes of the FID between its samples of a class and the reference
images of that class (labelled by the data, or a ``reference`` folder's class subfolders; with MNIST t10k about 1,000
per class, 5,000 samples give 500 per class), and, with an extractor that is a
:class:`~gantrain.extractors.Classifier` of as many classes (``MnistFeatures``), ``metrics/class_accuracy``: the %
of samples it classifies as their label.
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
from gantrain.errors import ConfigError
from gantrain.extractors import Classifier
from gantrain.files import atomic_write
from gantrain.metrics.scores import WHICH, features, intra_fid, scores
from gantrain.models.generative import GenerativeModel

log = logging.getLogger(__name__)

TAGS = {"fid": ["metrics/fid"], "kid": ["metrics/kid"], "pr": ["metrics/precision", "metrics/recall"]}
RESOLUTIONS = ("model", "native")  # metrics.reference_resolution: the reference images as the model sees them, or raw
CACHE_FORMAT = 2  # part of the cache key: 2 caches the labels with the features (1 did not)


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
        reference_resolution: ``model``: the reference images as the training pipeline makes them (resized to the
            model's resolution: MNIST 28 -> 32 px); ``native``: at their own size (``data.reference_images(native=
            True)``: MNIST 28 px, a folder's files as they are). The generated images go to the extractor as they are
            either way, each side resized only by the extractor itself (the Inception to 299 px).

    :attr:`protocol` (set with the reference features) says how the scores are computed: the reference, its count and
    size, the extractor and the hash of its weights; :func:`describe` writes it as one line.
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
        reference_resolution: str = "model",
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
        hint = "model: as the model sees them; native: as stored"
        self.reference_resolution = checks.choice("reference_resolution", reference_resolution, RESOLUTIONS, hint)
        self.protocol: dict[str, Any] | None = None  # set by reference_features
        self._real: torch.Tensor | None = None
        self._real_labels: torch.Tensor | None = None

    @property
    def tags(self) -> list[str]:
        """The names :meth:`evaluate` returns (``metrics/fid``, ...)."""
        return [tag for w in self.which for tag in TAGS[w]]

    def tags_for(self, model: nn.Module) -> list[str]:
        """The names :meth:`evaluate` returns for ``model``: :attr:`tags`, and for a conditional model
        ``metrics/intra_fid`` (with ``fid``) and ``metrics/class_accuracy`` (an extractor that classifies its
        classes)."""
        if not _conditional(model):
            return self.tags
        classifies = isinstance(self.extractor, Classifier) and self.extractor.num_classes == model.num_classes
        return self.tags + ["metrics/intra_fid"] * ("fid" in self.which) + ["metrics/class_accuracy"] * classifies

    def to(self, device: torch.device | str) -> Metrics:
        self.extractor.to(device)
        return self

    def reference_features(self, data: Any, data_key: dict | None = None) -> torch.Tensor:
        """Features of the reference images: ``reference``'s, else ``data``'s training images (``data_key``: its
        config, part of the cache key); from the cache when the images and the extractor are unchanged."""
        if self._real is not None:
            return self._real
        images, labels, about = self._reference_images(data, data_key)
        weights = fingerprint(self.extractor)
        about = {**about, "num_reference": self.num_reference, "extractor": weights}
        about["format"] = CACHE_FORMAT
        first = images[0]
        size = list((first[0] if isinstance(first, (tuple, list)) else first).shape[-2:])  # (H, W) of every image
        self.protocol = {
            "reference": self.reference or "training data",
            "num_reference": len(images),
            "reference_resolution": self.reference_resolution,
            "size": size,
            "extractor": f"{type(self.extractor).__module__}.{type(self.extractor).__qualname__}",
            "extractor_sha256": weights,
        }
        key = hashlib.sha256(json.dumps(about, sort_keys=True, default=str).encode()).hexdigest()[:24]
        path = self.cache_dir / f"{key}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                self._real, self._real_labels = saved["features"], saved.get("labels")
                log.info("metrics: reference features from the cache %s", path)
                return self._real
            except Exception as e:  # noqa: BLE001 - a broken cache entry is recomputed
                log.warning("metrics: cannot read the cached features %s (%s); recomputing them", path, e)
        log.info("metrics: computing the features of %d reference images (cached in %s)", len(images), path)
        self._real, self._real_labels = features(self.extractor, _batches(images, self.batch_size)), labels
        entry = {"features": self._real, "labels": labels, "about": about}
        try:
            atomic_write(path, lambda f: torch.save(entry, f), fsync=False)
        except OSError as e:  # a read-only or full cache: evaluate anyway
            log.warning("metrics: cannot cache the reference features in %s (%s)", path, e)
        return self._real

    def reference_labels(self, data: Any, data_key: dict | None, num_classes: int) -> torch.Tensor:
        """The ``(N,)`` classes of :meth:`reference_features`' images, checked for the intra-FID of a model of
        ``num_classes`` classes: :class:`ConfigError` in one line when the reference has no labels or other classes,
        or a class has fewer than 2 reference or generated images."""
        self.reference_features(data, data_key)
        labels, where = self._real_labels, f"'{self.reference}'" if self.reference else "the training data"
        if labels is None:
            raise ConfigError(
                f"reference={self.reference}: intra_fid compares each class's samples with its reference images, and "
                f"{where} has no class labels (a folder needs one subfolder per class); or drop fid from which",
                key="reference",
            )
        counts = torch.bincount(labels, minlength=num_classes)
        if len(counts) > num_classes or counts.min() < 2 or self.num_samples < 2 * num_classes:
            raise ConfigError(
                f"num_samples={self.num_samples}: intra_fid needs >= 2 images of each of the model's {num_classes} "
                f"classes on both sides; this gives {self.num_samples // num_classes} per class, and {where} has "
                f"{counts.tolist()} reference images per class",
                key="num_samples",
            )
        return labels

    def _reference_images(
        self, data: Any, data_key: dict | None
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor | None, dict]:
        """(the reference images as a dataset of (C, R, R) tensors (``native``: (C, H, W), their own size), their (N,)
        classes or None, what identifies them)."""
        if not data.images:
            checks.fail("metrics", "on", f"used with image data; {type(data).__name__} has no images")
        native = self.reference_resolution == "native"
        if self.reference is not None:
            from gantrain.data import DataError, ImageFolder
            from gantrain.data.folder import image_files

            folder = ImageFolder(path=self.reference, channels=data.channels, resolution=data.resolution, batch_size=1)
            try:
                dataset = folder.native_dataset() if native else folder.dataset()
            except DataError as e:  # names data.path; here it is metrics.reference
                raise DataError(str(e).replace("data.path", "metrics.reference")) from None
            labels = folder.training_labels()
            files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in image_files(self.reference)]
            about = {"folder": self.reference, "files": hashlib.sha256(str(files).encode()).hexdigest()}
            about.update(resolution="native" if native else data.resolution, channels=data.channels)
        else:
            # model: reference_images() as a user's own option may define it, and the cache key of before
            (dataset, labels) = data.reference_images(native=True) if native else data.reference_images()
            about = {"data": data_key or repr(vars(data)), **({"reference_resolution": "native"} if native else {})}
        n = len(dataset)
        if n > self.num_reference:  # a fixed random subset: the first images of a folder may be one class
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: self.num_reference].sort().values
            dataset, labels = _Subset(dataset, picked.tolist()), None if labels is None else labels[picked]
        return dataset, labels, about

    def generated_features(
        self,
        sample: Callable[..., torch.Tensor],
        noise: Callable,
        device,
        labels: torch.Tensor | None = None,
        predicted: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Features of ``num_samples`` images ``sample(z)``, ``z = noise(n, device, generator)`` from the fixed seed;
        with ``labels`` ``(num_samples,)``, ``sample(z, y)`` with each batch's labels. ``predicted``: a list that gets
        the extractor's class (a :class:`~gantrain.extractors.Classifier`'s argmax) of each batch."""
        generator = torch.Generator(device).manual_seed(self.seed)
        sizes = [self.batch_size] * (self.num_samples // self.batch_size)
        sizes += [self.num_samples % self.batch_size] if self.num_samples % self.batch_size else []
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def batches() -> Iterator[torch.Tensor]:
            for start, n in zip(starts, sizes):
                z = noise(n, device, generator=generator)
                x = sample(z) if labels is None else sample(z, labels[start : start + n].to(device))
                if predicted is not None:
                    predicted.append(self.extractor.classify(x.to(_device(self.extractor))).argmax(1).cpu())
                yield x

        return features(self.extractor, batches())

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
        before) against the reference; a conditional model's with balanced labels, and :meth:`tags_for`'s
        intra-FID and class accuracy."""
        real = self.reference_features(data, data_key)
        log.info("metrics: %s", describe(self.protocol))
        device = _device(model)
        if not _conditional(model):
            return self.scores(real, self.generated_features(model.sample, model.noise, device))
        tags = self.tags_for(model)
        labels = model.balanced_labels(self.num_samples)  # num_samples // K per class
        predicted: list[torch.Tensor] | None = [] if "metrics/class_accuracy" in tags else None
        fake = self.generated_features(model.sample, model.noise, device, labels, predicted)
        out = self.scores(real, fake)
        if "metrics/intra_fid" in tags:
            real_labels = self.reference_labels(data, data_key, model.num_classes)
            out["metrics/intra_fid"] = intra_fid(real, real_labels, fake, labels)
        if predicted is not None:
            out["metrics/class_accuracy"] = 100 * (torch.cat(predicted) == labels).double().mean().item()
        return out


def describe(protocol: dict[str, Any] | None) -> str:
    """:attr:`Metrics.protocol` as one line: ``10000 reference images (training data) at 28x28 px (native), ...``."""
    if not protocol:
        return "no recorded protocol"
    height, width = protocol["size"]
    return (
        f"{protocol['num_reference']} reference images ({protocol['reference']}) at {height}x{width} px "
        f"({protocol['reference_resolution']} resolution), {protocol['extractor'].rsplit('.', 1)[-1]} features "
        f"(weights sha256 {protocol['extractor_sha256'][:12]})"
    )


def _conditional(model: nn.Module) -> bool:
    return isinstance(model, GenerativeModel) and model.conditional


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


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
