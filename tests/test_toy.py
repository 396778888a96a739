"""Tests for gantrain.data.mixtures: the ring8/grid25 centres, the sampled distribution, the mode metrics on
hand-made samples, the resumable stream and its RNG hygiene, the scatter plot and the configs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from gantrain.data import DataError, Grid, Mixture, MixtureStream, Ring, mode_metrics
from gantrain.errors import ConfigError
from gantrain.train import compose_config

# ----------------------------------------------------------------------------------------------
# Centres


def test_ring8_centres():
    ring = Ring()
    s = math.sqrt(0.5)
    expected = torch.tensor([[1, 0], [s, s], [0, 1], [-s, s], [-1, 0], [-s, -s], [0, -1], [s, -s]])
    assert ring.centers.dtype == torch.float32 and ring.centers.shape == (8, 2)
    torch.testing.assert_close(ring.centers, expected.float(), rtol=0, atol=1e-7)
    # Centres on the axes are exactly on them.
    assert ring.centers[2, 0] == 0 and ring.centers[4, 1] == 0 and ring.centers[6, 0] == 0
    assert (ring.std, ring.batch_size, ring.num_modes, ring.num_eval_samples) == (0.01, 256, 8, 2500)


def test_ring_radius_2_and_other_mode_counts():
    torch.testing.assert_close(Ring(radius=2.0).centers, 2 * Ring().centers, rtol=0, atol=1e-7)
    c = Ring(num_modes=3, radius=2.0).centers
    expected = [[2 * math.cos(2 * math.pi * k / 3), 2 * math.sin(2 * math.pi * k / 3)] for k in range(3)]
    torch.testing.assert_close(c, torch.tensor(expected), rtol=0, atol=1e-6)
    assert Ring(num_modes=1).centers.tolist() == [[1.0, 0.0]]


def test_grid25_centres():
    grid = Grid()
    assert grid.centers.dtype == torch.float32 and grid.centers.shape == (25, 2)
    expected = {(float(x), float(y)) for x in (-4, -2, 0, 2, 4) for y in (-4, -2, 0, 2, 4)}
    assert {tuple(c) for c in grid.centers.tolist()} == expected  # exact, not approximate
    assert grid.centers[0].tolist() == [-4.0, -4.0] and grid.centers[1].tolist() == [-4.0, -2.0]
    assert (grid.std, grid.batch_size, grid.num_modes) == (0.05, 256, 25)


def test_grid_size_and_spacing():
    assert Grid(size=2, spacing=1.0).centers.tolist() == [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    assert Grid(size=1).centers.tolist() == [[0.0, 0.0]]
    assert Grid(size=3, spacing=0.5).centers[:, 0].unique().tolist() == [-0.5, 0.0, 0.5]


def test_mixture_is_abstract():
    with pytest.raises(TypeError):
        Mixture(batch_size=4, std=0.1)


# ----------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (Ring, dict(batch_size=0), r"^batch_size=0: must be an integer >= 1$"),
        (Grid, dict(batch_size=2.5), r"^batch_size=2\.5: must be an integer >= 1$"),
        (Ring, dict(batch_size=True), r"^batch_size=True: must be an integer >= 1$"),
        (Ring, dict(std=0), r"^std=0: must be > 0$"),
        (Grid, dict(std=-0.05), r"^std=-0\.05: must be > 0$"),
        (Ring, dict(std=float("nan")), r"^std=nan: must be > 0$"),
        (Ring, dict(std="0.01"), r"^std='0\.01': must be > 0$"),
        (Ring, dict(std=True), r"^std=True: must be > 0$"),
        (Ring, dict(radius=0.0), r"^radius=0\.0: must be > 0$"),
        (Ring, dict(radius=float("inf")), r"^radius=inf: must be > 0$"),
        (Ring, dict(num_modes=0), r"^num_modes=0: must be an integer >= 1$"),
        (Grid, dict(size=0), r"^size=0: must be an integer >= 1$"),
        (Grid, dict(spacing=-2.0), r"^spacing=-2\.0: must be > 0$"),
        (Grid, dict(num_eval_samples=0), r"^num_eval_samples=0: must be an integer >= 1$"),
    ],
)
def test_bad_arguments_name_the_key(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        cls(**kwargs)
    # The object names its own argument; the entry point puts the config path in front.
    key = next(iter(kwargs))
    assert err.value.key == key and str(err.value.within("data")).startswith(f"data.{key}=")


def test_integer_std_and_radius_are_accepted():
    ring = Ring(std=1, radius=3)
    assert ring.std == 1.0 and isinstance(ring.std, float) and ring.radius == 3.0


# ----------------------------------------------------------------------------------------------
# Sampling


def _nearest(samples: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dist, idx = torch.cdist(samples.double(), centers.double()).min(dim=1)
    return dist, idx


@pytest.mark.parametrize("mixture", [Ring(batch_size=5000), Grid(batch_size=5000)], ids=repr)
def test_batches_follow_the_mixture(mixture):
    stream = mixture.stream(seed=0, device="cpu")
    batches = [next(stream).x for _ in range(4)]
    assert all(b.shape == (5000, 2) and b.dtype == torch.float32 and b.device.type == "cpu" for b in batches)
    x = torch.cat(batches)  # 20k samples, in model units (divided by mixture.scale)
    assert x.abs().max() < 1.1
    dist, idx = _nearest(x * mixture.scale, mixture.centers)
    # |noise| / std of a 2-D isotropic Gaussian is chi-distributed with 2 dof (Rayleigh): mean sqrt(pi/2),
    # variance (4 - pi) / 2, P(<= 3) = 1 - exp(-4.5). The modes are far apart, so the nearest centre is
    # the one sampled.
    r = dist / mixture.std
    assert r.mean().item() == pytest.approx(math.sqrt(math.pi / 2), rel=0.05)
    assert r.var().item() == pytest.approx((4 - math.pi) / 2, rel=0.1)
    # Modes are picked uniformly: 20k / K each, well within +-15% (>= 4 standard deviations).
    counts = torch.bincount(idx, minlength=mixture.num_modes).double()
    expected = len(x) / mixture.num_modes
    assert counts.min() > 0.85 * expected and counts.max() < 1.15 * expected
    # The metric on true samples: every mode, ~98.9% high quality.
    metrics = mixture.evaluate(x)
    assert metrics["toy/modes"] == mixture.num_modes
    assert metrics["toy/hq"] == pytest.approx(100 * (1 - math.exp(-4.5)), abs=0.5)


def test_batches_are_fresh_and_seeded():
    ring = Ring(batch_size=64)
    a, b = ring.stream(seed=1), ring.stream(seed=1)
    first = [next(a).x for _ in range(3)]
    assert all(torch.equal(x, next(b).x) for x in first)  # same seed, same batches
    assert not torch.equal(first[0], first[1])  # fresh samples every batch
    assert not torch.equal(first[0], next(ring.stream(seed=2)).x)


def test_stream_never_touches_the_global_rng():
    ring = Ring(batch_size=32)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    stream = ring.stream(seed=0)
    batches = [next(stream).x for _ in range(3)]
    stream.load_state_dict(stream.state_dict())
    next(stream)
    assert torch.equal(torch.random.get_rng_state(), before)
    # ... and does not depend on it.
    torch.manual_seed(999)
    other = ring.stream(seed=0)
    assert all(torch.equal(x, next(other).x) for x in batches)


def test_stream_resume_is_bit_identical():
    grid = Grid(batch_size=16)
    stream = grid.stream(seed=7)
    for _ in range(5):
        next(stream)
    buf = io.BytesIO()
    torch.save(stream.state_dict(), buf)  # as a checkpoint would hold it
    expected = [next(stream).x for _ in range(3)]

    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=False)
    assert state["batches"] == 5
    resumed = grid.stream(seed=12345)  # the seed is irrelevant once the state is loaded
    resumed.load_state_dict(state)
    assert all(torch.equal(x, next(resumed).x) for x in expected)
    assert resumed.state_dict()["batches"] == 8


def test_state_dict_is_a_snapshot():
    stream = Ring(batch_size=8).stream(seed=0)
    state = stream.state_dict()
    first = next(stream).x
    stream.load_state_dict(state)  # drawing did not alter the saved state
    assert torch.equal(next(stream).x, first)


@pytest.mark.parametrize(
    "state",
    [{"epoch": 0, "batch": 3}, {"generator": torch.zeros(3, dtype=torch.uint8), "batches": 1}, None],
)
def test_bad_stream_state_is_a_data_error(state):
    stream = Ring().stream(seed=0)
    with pytest.raises(DataError, match="toy data stream state"):
        stream.load_state_dict(state)


def test_stream_checks_batch_size():
    with pytest.raises(ConfigError, match=r"^batch_size=0: must be an integer >= 1$"):
        MixtureStream(Ring().centers, 0.01, 0, seed=0)


# ----------------------------------------------------------------------------------------------
# Metrics


RING = Ring().centers
STD = 0.01


def test_samples_at_every_centre():
    assert mode_metrics(RING, RING, STD) == (8, 100.0)
    grid = Grid()
    assert grid.evaluate(grid.centers.repeat(3, 1) / grid.scale) == {"toy/modes": 25.0, "toy/hq": 100.0}


def test_samples_at_one_centre():
    assert mode_metrics(RING[3].repeat(100, 1), RING, STD) == (1, 100.0)


@pytest.mark.parametrize("angle", [0.0, 1.0, 2.5, -2.0])
def test_hq_threshold_is_three_std(angle):
    direction = torch.tensor([math.cos(angle), math.sin(angle)])
    assert mode_metrics(RING + 2.9 * STD * direction, RING, STD) == (8, 100.0)
    assert mode_metrics(RING + 3.1 * STD * direction, RING, STD) == (0, 0.0)
    grid = Grid()
    assert mode_metrics(grid.centers + 2.9 * 0.05 * direction, grid.centers, 0.05) == (25, 100.0)
    assert mode_metrics(grid.centers + 3.1 * 0.05 * direction, grid.centers, 0.05) == (0, 0.0)


def test_three_modes_plus_a_quarter_far_away():
    near = torch.stack([RING[k] + 0.01 * torch.tensor([0.5, -0.5]) * (i % 3) for k in (0, 2, 5) for i in range(10)])
    far = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.5, 0.5], [-3.0, 1.0], [0.85, 0.0]]).repeat(2, 1)  # 10
    samples = torch.cat([near, far])[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    assert mode_metrics(samples, RING, STD) == (3, 75.0)
    assert Ring().evaluate(samples) == {"toy/modes": 3.0, "toy/hq": 75.0}


def test_non_finite_samples_are_never_hq():
    samples = torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert mode_metrics(samples, RING, STD) == (2, 50.0)


def test_no_samples():
    assert mode_metrics(torch.zeros(0, 2), RING, STD) == (0, 0.0)


def test_metrics_chunking_matches(monkeypatch):
    import gantrain.data.mixtures as mixtures

    x = next(Grid(batch_size=1000, std=0.2).stream(seed=0)).x
    full = mode_metrics(x, Grid().centers, 0.05)
    monkeypatch.setattr(mixtures, "_METRIC_CHUNK", 7)
    assert mode_metrics(x, Grid().centers, 0.05) == full
    assert 0 < full[1] < 100


# ----------------------------------------------------------------------------------------------
# Render


def _pixel(mixture: Mixture, xy: tuple[float, float], size: int = 512) -> tuple[int, int]:
    """(row, col) of data point `xy` in `mixture.render(...)`."""
    x0, x1, y0, y1 = mixture.plot_box()
    scale = (size - 1) / (x1 - x0)
    return round((y1 - xy[1]) * scale), round((xy[0] - x0) * scale)


def _is_red(rgb: torch.Tensor) -> bool:
    return bool(rgb[0] > 0.8 and rgb[1] < 0.9 and rgb[2] < 0.9 and abs(rgb[1] - rgb[2]) < 0.05)


def _is_blue(rgb: torch.Tensor) -> bool:
    return bool(rgb[2] > 0.9 and rgb[0] < 0.1 and rgb[1] < 0.4)


def test_plot_boxes():
    assert Ring().plot_box() == pytest.approx((-1.5, 1.5, -1.5, 1.5))
    assert Ring(radius=2.0).plot_box() == pytest.approx((-3.0, 3.0, -3.0, 3.0))
    assert Grid().plot_box() == pytest.approx((-5.0, 5.0, -5.0, 5.0))
    x0, x1, y0, y1 = Ring(num_modes=3).plot_box()  # asymmetric bounding box: still square
    assert x1 - x0 == pytest.approx(y1 - y0)


@pytest.mark.parametrize("mixture", [Ring(), Grid()], ids=repr)
def test_render_scatter_plot(mixture):
    samples = torch.tensor([[0.31, 0.47], [-0.6, 0.2]])
    img = mixture.render(samples)
    assert img.shape == (3, 512, 512) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    assert img[:, 3, 3].tolist() == [1.0, 1.0, 1.0]  # white background
    centers = mixture.centers.tolist()
    for c in centers:
        row, col = _pixel(mixture, c)
        assert _is_red(img[:, row, col]), (c, img[:, row, col])
    for s in (samples * mixture.scale).tolist():  # render takes model units
        row, col = _pixel(mixture, s)
        assert _is_blue(img[:, row, col]), (s, img[:, row, col])
    # Light grey axes through 0, away from modes and samples.
    row0, col0 = _pixel(mixture, (0.0, 0.0))
    col = _pixel(mixture, (mixture.plot_box()[0] + 0.01, 0.0))[1]
    grey = img[:, row0 - 1 : row0 + 2, col]  # (3, 3): the line is 1 px, rounding may move it by 1
    assert any(0.6 < g[0] < 0.95 and g[0] == g[1] == g[2] for g in grey.T)
    assert img.shape[1] - 1 - row0 == pytest.approx(row0, abs=1) and col0 == pytest.approx(row0, abs=1)
    # Blue only where the samples are: a few px each.
    blue = (img[2] > 0.9) & (img[0] < 0.1)
    assert 0 < int(blue.sum()) <= 2 * 4


def test_render_mode_disc_radius():
    ring = Ring()
    img = ring.render(torch.zeros(0, 2))
    row, col = _pixel(ring, (1.0, 0.0))
    r_px = 3 * 0.01 * 511 / 3  # 5.1 px
    assert _is_red(img[:, row, col + round(r_px) - 1])  # inside the disc (edge)
    assert img[:, row, col + round(r_px) + 2].tolist() == [1.0, 1.0, 1.0]  # outside it
    tiny = Ring(std=1e-6).render(torch.zeros(0, 2))  # still visible: at least 2 px
    assert _is_red(tiny[:, row, col + 1]) or _is_red(tiny[:, row, col + 2])


def test_render_clamps_outliers_and_skips_non_finite():
    ring = Ring()
    samples = torch.tensor(
        [[100.0, -100.0], [float("nan"), 0.0], [float("inf"), float("-inf")], [0.0, float("nan")], [0.5, -0.5]]
    )
    img = ring.render(samples, size=256)
    assert img.shape == (3, 256, 256) and torch.isfinite(img).all()
    assert _is_blue(img[:, 255, 255])  # (100, -100) clamped to the bottom-right corner
    row, col = _pixel(ring, (0.5, -0.5), size=256)
    assert _is_blue(img[:, row, col])
    blue = (img[2] > 0.9) & (img[0] < 0.1)
    assert int(blue.sum()) == 8  # two 2x2 dots: the non-finite samples were skipped
    nan_only = ring.render(torch.full((10, 2), float("nan")))
    assert torch.equal(nan_only, ring.render(torch.zeros(0, 2)))


def test_render_accepts_grad_and_double_samples():
    x = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    assert Grid().render(x, size=64).shape == (3, 64, 64)


# ----------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name, cls, modes", [("ring8", Ring, 8), ("grid25", Grid, 25)])
def test_config_options(name, cls, modes):
    data = instantiate(compose_config(f"data={name}").data)
    assert type(data) is cls and data.centers.shape == (modes, 2)
    assert data.batch_size == 256 and data.num_eval_samples == 2500
    default = cls()
    assert torch.equal(data.centers, default.centers) and data.std == default.std


def test_config_overrides_and_typos():
    ring = instantiate(compose_config("data=ring8", "data.radius=2", "data.std=0.02").data)
    assert ring.radius == 2.0 and ring.std == 0.02
    torch.testing.assert_close(ring.centers, 2 * Ring().centers, rtol=0, atol=1e-7)
    with pytest.raises(ConfigCompositionException, match=r"data\.bogus"):
        compose_config("data=grid25", "data.bogus=1")
    with pytest.raises(ConfigCompositionException, match=r"data\.channels"):
        compose_config("data=ring8", "data.channels=3")  # points, not images
    with pytest.raises(Exception, match=r"std=0\.0: must be > 0(.|\n)*full_key: data"):  # Hydra names the node
        instantiate(compose_config("data=grid25", "data.std=0").data)


def test_normalize_maps_points_to_unit_extent_and_back():
    grid, raw = Grid(), Grid(normalize=False)
    assert grid.scale == 4.0 and raw.scale == 1.0 and Ring(radius=2.0).scale == 2.0
    model_points = grid.centers / 4.0  # what a perfect generator outputs in model units
    assert grid.evaluate(model_points) == {"toy/modes": 25.0, "toy/hq": 100.0}
    assert raw.evaluate(grid.centers) == {"toy/modes": 25.0, "toy/hq": 100.0}
    assert raw.evaluate(model_points)["toy/modes"] == 1.0  # unnormalised: only the centre mode is hit
    torch.testing.assert_close(grid.render(model_points), raw.render(grid.centers))
    b = next(raw.stream(seed=0)).x
    torch.testing.assert_close(next(grid.stream(seed=0)).x * 4.0, b)


def test_a_mixture_stream_refuses_to_be_split_between_processes():
    """The 2-D mixtures have no rank: their stream says so itself, in the one line build() used to raise."""
    line = (
        "data: Ring cannot be split between 2 processes (its stream has no rank); train it in one process, "
        "or use image data (digits, mnist, folder, ...)"
    )
    with pytest.raises(ConfigError) as raised:
        Ring().stream(seed=0, world_size=2)
    assert str(raised.value) == line
    assert next(Ring().stream(seed=0, rank=0, world_size=1)).x.shape == (256, 2)
