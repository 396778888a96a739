"""2-D Gaussian mixtures: the standard mode-collapse benchmark (`data=ring8`, `data=grid25`).

As in VEEGAN (Srivastava et al., 2017) and PacGAN (Lin et al., 2018):

- ring8: 8 Gaussians with centres at angle 2*pi*k/8 on a circle of radius 1, std 0.01;
- grid25: 25 Gaussians with centres at {-4, -2, 0, 2, 4}^2, std 0.05.

There is no fixed dataset: every batch is a fresh draw (a mode uniformly per sample, plus N(0, std^2 I) noise)
from the stream's own generator. `evaluate` reports covered modes and high-quality samples (`mode_metrics`),
`render` draws a scatter plot. These are points, not images: no `channels`, `resolution` or loader settings.
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch

from gantrain import checks
from gantrain.batch import Batch
from gantrain.data.common import DataError, DataOption, derive_seed
from gantrain.errors import ConfigError

__all__ = ["Grid", "Mixture", "MixtureStream", "Ring", "mode_metrics"]

# Rows of `samples` compared against all centres at once in `mode_metrics` (bounds the memory).
_METRIC_CHUNK = 65_536

# Scatter-plot colours (RGB).
_WHITE = (255, 255, 255)
_AXIS_GREY = (210, 210, 210)
_MODE_FILL = (255, 215, 215)
_MODE_EDGE = (220, 0, 0)
_SAMPLE_BLUE = (0, 60, 255)


def mode_metrics(samples: torch.Tensor, centers: torch.Tensor, std: float) -> tuple[int, float]:
    """(modes covered, percent of high-quality samples) of `samples` (N, 2) against `centers` (K, 2). A sample is high
    quality if the Euclidean distance to its nearest centre is <= 3 * std; a mode is covered if it is the nearest centre
    of at least one high-quality sample. Non-finite samples are never high quality. N = 0 gives (0, 0.0). Computed in
    float64 on the samples' device."""
    assert samples.dim() == 2 and samples.shape[1] == centers.shape[1], (
        f"expected samples of shape (N, {centers.shape[1]}), got {tuple(samples.shape)}"
    )
    n = samples.shape[0]
    if n == 0:
        return 0, 0.0
    samples = samples.detach().to(torch.float64)
    centers = centers.detach().to(device=samples.device, dtype=torch.float64)
    threshold = 3.0 * float(std)
    covered = torch.zeros(centers.shape[0], dtype=torch.bool, device=samples.device)
    hq_count = 0
    for start in range(0, n, _METRIC_CHUNK):
        chunk = samples[start : start + _METRIC_CHUNK]  # (n, 2)
        dist = torch.cdist(chunk, centers)  # (n, K)
        nearest_dist, nearest = dist.min(dim=1)  # (n,), (n,)
        hq = nearest_dist <= threshold  # NaN compares False: never high quality
        hq_count += int(hq.sum())
        covered[nearest[hq]] = True
    return int(covered.sum()), 100.0 * hq_count / n


class MixtureStream:
    """Endless, resumable stream of `Batch`es drawn from a Gaussian mixture: x (batch_size, 2) float32 points,
    y (batch_size,) the index of the mode each was drawn from.

    Samples come from the stream's own CPU `torch.Generator`, seeded with `derive_seed("mixture", seed)`, never
    from the global RNGs, so drawing data cannot shift the training loop's random stream. Each batch is drawn on
    the CPU (mode indices first, then the noise), then moved to `device`: its values do not depend on the device.
    """

    in_memory = True  # generated: nothing to read ahead

    def __init__(
        self, centers: torch.Tensor, std: float, batch_size: int, *, seed: int, device: torch.device | str = "cpu"
    ):
        self.batch_size = checks.integer("batch_size", batch_size, at_least=1)
        self.centers = centers.detach().to("cpu", torch.float32)  # (K, 2)
        self.std = float(std)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.generator = torch.Generator(device="cpu").manual_seed(derive_seed("mixture", self.seed))
        self.batches = 0  # batches drawn so far

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        """The next batch on `device`."""
        k = self.centers.shape[0]
        modes = torch.randint(k, (self.batch_size,), generator=self.generator)  # (B,)
        noise = torch.randn(self.batch_size, 2, generator=self.generator)  # (B, 2)
        batch = self.centers[modes] + self.std * noise  # (B, 2)
        self.batches += 1
        return Batch(batch, modes).to(self.device)

    @property
    def class_counts(self) -> torch.Tensor:
        """Every mode is drawn with equal probability: equal weights (``model.fake_labels=data``)."""
        return torch.ones(self.centers.shape[0])

    def state_dict(self) -> dict:
        """`{"generator": uint8 CPU tensor (the generator state), "batches": batches drawn}`."""
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next batch is the one the saved stream would have drawn next."""
        try:
            gen_state, batches = state["generator"], int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"toy data stream state must be {{'generator': uint8 tensor, 'batches': int}}, got {state!r}"
            ) from None
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8 or batches < 0:
            raise DataError(
                "toy data stream state does not fit: 'generator' must be a uint8 tensor from "
                f"torch.Generator.get_state() and 'batches' >= 0, got {state!r}; "
                "was the checkpoint written with an image `data=` option?"
            )
        try:
            self.generator.set_state(gen_state.cpu())
        except RuntimeError as e:
            raise DataError(f"toy data stream state holds an invalid generator state ({e})") from None
        self.batches = batches


class Mixture(DataOption, abc.ABC):
    """Base of the 2-D Gaussian-mixture `data=` options: equal-weight isotropic modes at `centers`.

    Args:
        batch_size: points per batch, >= 1.
        std: standard deviation of every mode along each axis, > 0.
        num_eval_samples: generated points `evaluate` should be given, >= 1 (the caller draws them).
        normalize: the model sees points divided by `scale` (the largest |coordinate| of a centre), so both
            mixtures span [-1, 1] like image data and one recipe's learning rates and penalty weights carry over;
            `evaluate` and `render` map the model's points back: metric and plot are in the mixture's own units.

    Subclasses define the centres (`_make_centers`) and the plot margin (`_plot_margin`). A point's label is the
    index of the mode it was drawn from (`num_classes` = the number of modes).
    """

    dim = 2  # the size of a sample: what the model's `dim` must be
    metric_tags = ("toy/modes", "toy/hq")  # what `evaluate` reports

    def __init__(self, *, batch_size: int, std: float, num_eval_samples: int = 2500, normalize: bool = True):
        self.batch_size = checks.integer("batch_size", batch_size, at_least=1)
        self.std = float(checks.positive("std", std))
        self.num_eval_samples = checks.integer("num_eval_samples", num_eval_samples, at_least=1)
        self.normalize = bool(normalize)

    @property
    def scale(self) -> float:
        """Model units -> mixture units: the largest |coordinate| of a centre when normalising, else 1."""
        if not self.normalize:
            return 1.0
        extent = float(self.centers.abs().max())
        return extent if extent > 0 else 1.0

    @abc.abstractmethod
    def _make_centers(self) -> torch.Tensor:
        """The (K, 2) float32 mode centres."""

    @abc.abstractmethod
    def _plot_margin(self) -> float:
        """Data units left around the centres' bounding box in `render`."""

    @property
    def centers(self) -> torch.Tensor:
        """(K, 2) float32 mode centres on the CPU (a fresh tensor each call)."""
        return self._make_centers()

    @property
    def num_classes(self) -> int:
        return self.num_modes

    def stream(
        self, seed: int, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1
    ) -> MixtureStream:
        """An endless, resumable iterator of fresh batches on `device`; one process only (``world_size`` 1)."""
        if world_size > 1:  # one generator draws every point: there is no per-rank shard of it
            raise ConfigError(
                f"data: {type(self).__name__} cannot be split between {world_size} processes (its stream "
                "has no rank); train it in one process, or use image data (digits, mnist, folder, ...)"
            )
        scale = self.scale
        return MixtureStream(self.centers / scale, self.std / scale, self.batch_size, seed=seed, device=device)

    def to_data_units(self, samples: torch.Tensor) -> torch.Tensor:
        """Model units -> the mixture's own coordinates (``samples * scale``): what leaves gantrain."""
        return samples * self.scale

    def evaluate(self, samples: torch.Tensor) -> dict[str, float]:
        """`{"toy/modes": modes covered (0..K), "toy/hq": % high-quality}` of `samples` (N, 2), see `mode_metrics`."""
        modes, hq = mode_metrics(self.to_data_units(samples), self.centers, self.std)
        return {"toy/modes": float(modes), "toy/hq": hq}

    def plot_box(self) -> tuple[float, float, float, float]:
        """(x_min, x_max, y_min, y_max) drawn by `render`: the centres' bounding box padded by the
        margin and widened to a square, so both axes have the same scale."""
        c = self.centers.double()
        lo, hi = c.min(dim=0).values, c.max(dim=0).values
        mid = (lo + hi) / 2
        half = float((hi - lo).max()) / 2 + self._plot_margin()
        x, y = float(mid[0]), float(mid[1])
        return x - half, x + half, y - half, y + half

    def render(self, samples: torch.Tensor, size: int = 512, per_row: int | None = None) -> torch.Tensor:
        """Scatter plot of model `samples` (N, 2) over the mode centres as a (3, size, size) float image in [0, 1]
        (`per_row`, a conditional model's grid layout, does not apply to a scatter plot: ignored).
        White background; light grey axes through 0; each centre is a pale red disc with a red edge of radius 3 * std
        (the high-quality zone, at least 2 px); samples are 2x2 px blue dots over the discs, whose 1 px edges are drawn
        again on top. The range is fixed per mixture (`plot_box`): samples outside it are clamped to the border,
        non-finite ones skipped. +y points up."""
        from PIL import Image, ImageDraw

        assert samples.dim() == 2 and samples.shape[1] == 2, f"expected (N, 2) samples, got {tuple(samples.shape)}"
        assert isinstance(size, int) and size >= 16, f"render size must be an int >= 16, got {size!r}"
        samples = self.to_data_units(samples)
        x0, x1, y0, y1 = self.plot_box()
        scale = (size - 1) / (x1 - x0)  # px per data unit, same on both axes

        def to_px(xy: np.ndarray) -> np.ndarray:  # (n, 2) data -> (n, 2) pixel coords, y flipped
            px = np.empty_like(xy)
            px[:, 0] = (xy[:, 0] - x0) * scale
            px[:, 1] = (y1 - xy[:, 1]) * scale
            return px

        img = Image.new("RGB", (size, size), _WHITE)
        draw = ImageDraw.Draw(img)
        origin = to_px(np.zeros((1, 2)))[0]
        if 0 <= origin[0] <= size - 1:
            draw.line([(origin[0], 0), (origin[0], size - 1)], fill=_AXIS_GREY, width=1)
        if 0 <= origin[1] <= size - 1:
            draw.line([(0, origin[1]), (size - 1, origin[1])], fill=_AXIS_GREY, width=1)

        r = max(2.0, 3.0 * self.std * scale)
        edge = 2 if r >= 4 else 1
        discs = [[cx - r, cy - r, cx + r, cy + r] for cx, cy in to_px(self.centers.double().numpy())]
        for box in discs:
            draw.ellipse(box, fill=_MODE_FILL, outline=_MODE_EDGE, width=edge)

        pts = samples.detach().to("cpu", torch.float64).numpy()
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts):
            px = np.rint(to_px(pts)).clip(0, size - 2).astype(np.int64)  # room for the 2x2 dot
            dots = np.concatenate([px + d for d in ((0, 0), (1, 0), (0, 1), (1, 1))])
            draw.point([tuple(p) for p in dots.tolist()], fill=_SAMPLE_BLUE)
            for box in discs:  # the high-quality zone's edge stays visible over dense clusters
                draw.ellipse(box, outline=_MODE_EDGE, width=1)

        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
        return pixels.permute(2, 0, 1).float().div_(255.0).contiguous()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Ring(Mixture):
    """`num_modes` Gaussians with centres (radius * cos a_k, radius * sin a_k), a_k = 2*pi*k/num_modes. Defaults are the
    ring8 benchmark: 8 modes on the unit circle, std 0.01. The plot is padded by 0.5 * radius around the centres."""

    def __init__(
        self,
        *,
        batch_size: int = 256,
        num_modes: int = 8,
        radius: float = 1.0,
        std: float = 0.01,
        num_eval_samples: int = 2500,
        normalize: bool = True,
    ):
        super().__init__(batch_size=batch_size, std=std, num_eval_samples=num_eval_samples, normalize=normalize)
        self.num_modes = checks.integer("num_modes", num_modes, at_least=1)
        self.radius = float(checks.positive("radius", radius))

    def _make_centers(self) -> torch.Tensor:
        k = torch.arange(self.num_modes, dtype=torch.float64)
        angle = 2 * math.pi * k / self.num_modes
        unit = torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)
        unit[unit.abs() < 1e-12] = 0.0  # cos(pi/2) is 6e-17 in floating point: put axis centres exactly on the axes
        return (self.radius * unit).float()

    def _plot_margin(self) -> float:
        return 0.5 * self.radius


class Grid(Mixture):
    """size x size Gaussians with centres spacing * (i - (size - 1) / 2) on each axis, i = 0..size-1. Defaults are the
    grid25 benchmark: centres {-4, -2, 0, 2, 4}^2, std 0.05. Centre k is (x_i, y_j) with k = i * size + j. The plot is
    padded by 0.5 * spacing around the centres."""

    def __init__(
        self,
        *,
        batch_size: int = 256,
        size: int = 5,
        spacing: float = 2.0,
        std: float = 0.05,
        num_eval_samples: int = 2500,
        normalize: bool = True,
    ):
        super().__init__(batch_size=batch_size, std=std, num_eval_samples=num_eval_samples, normalize=normalize)
        self.size = checks.integer("size", size, at_least=1)
        self.spacing = float(checks.positive("spacing", spacing))

    @property
    def num_modes(self) -> int:
        return self.size * self.size

    def _make_centers(self) -> torch.Tensor:
        axis = self.spacing * (torch.arange(self.size, dtype=torch.float64) - (self.size - 1) / 2)  # (S,)
        xs, ys = torch.meshgrid(axis, axis, indexing="ij")
        return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float()  # (S*S, 2)

    def _plot_margin(self) -> float:
        return 0.5 * self.spacing
