"""``data.limit=N``: training on a subset. The exact indices chosen (class-balanced on labelled data, the first N
otherwise), disjoint from the holdout; the stream yields the subset only; FID's reference stays the whole data under
the same cache key; one-line errors."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from gantrain.data import Digits, ImageFolder
from gantrain.data.images import limited
from gantrain.errors import ConfigError
from gantrain.metrics import Metrics
from gantrain.metrics.evaluators import LOADING_KEYS
from tests.conftest import make_cfg
from tests.extractors import TinyFeatures


def digits(**kw) -> Digits:
    return Digits(**{"channels": 1, "resolution": 8, "batch_size": 5, **kw})


def by_rounds(labels: list[int], limit: int) -> list[int]:
    """Round r takes each class's r-th index (classes in order) until ``limit`` are taken; sorted."""
    per_class = [[i for i, y in enumerate(labels) if y == c] for c in range(max(labels) + 1)]
    picked = [ids[r] for r in range(len(labels)) for ids in per_class if r < len(ids)][:limit]
    return sorted(picked)


def test_limited_picks_round_by_round_class_by_class():
    labels = torch.tensor([2, 0, 2, 2, 1, 0, 2, 1, 0, 2])
    assert limited(labels, 5).tolist() == [0, 1, 4, 5, 7]  # round 0: 1, 4, 0; round 1: 5, 7
    assert limited(labels, 7).tolist() == [0, 1, 2, 4, 5, 7, 8]  # round 1 adds 2; round 2 starts with class 0: 8
    assert limited(torch.tensor([0, 0, 0, 0, 1]), 4).tolist() == [0, 1, 2, 4]  # class 1 runs out after one
    assert limited(None, 3).tolist() == [0, 1, 2]
    for limit in (1, 9, 10):
        assert limited(labels, limit).tolist() == by_rounds(labels.tolist(), limit)


def test_digits_take_the_first_images_of_each_class_balanced_and_never_the_holdout():
    full = digits()
    labels = full.training_labels()
    n = len(labels)  # 1797
    data = digits(limit=53, holdout=1000)
    picked = data.training_indices()
    assert picked.tolist() == by_rounds(labels[: n - 1000].tolist(), 53)
    assert torch.bincount(data.training_labels()).tolist() == [6, 6, 6] + [5] * 7  # 53 = 5 * 10 + 3
    assert int(picked.max()) < n - 1000 and data.training_size == 53  # the holdout is the last 1000: disjoint
    assert torch.equal(data.training_labels(), labels[picked])
    assert torch.equal(data.training_dataset().images, full.training_dataset().images[picked])
    held = data.heldout()
    assert not (data.training_dataset().images[:, None] == held[None]).flatten(2).all(2).any()
    assert torch.equal(held, full.training_dataset().images[n - 1000 :])


def write_pngs(folder, names: list[str]) -> None:
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), color=20 * i).save(path)


def test_an_unlabelled_folder_trains_on_its_first_images_a_labelled_one_on_each_classs_first(tmp_path):
    write_pngs(tmp_path / "flat", [f"{i}.png" for i in range(6)])  # in the folder itself: no labels
    flat = ImageFolder(path=str(tmp_path / "flat"), channels=1, resolution=8, batch_size=2, limit=4)
    assert flat.training_indices().tolist() == [0, 1, 2, 3] and flat.training_labels() is None
    assert [f.name for f in flat.training_dataset().dataset.files[:4]] == ["0.png", "1.png", "2.png", "3.png"]
    names = ["a/0.png", "a/1.png", "a/2.png", "a/3.png", "b/0.png", "b/1.png"]  # classes a (0) and b (1)
    write_pngs(tmp_path / "classes", names)
    classes = ImageFolder(path=str(tmp_path / "classes"), channels=1, resolution=8, batch_size=2, limit=3)
    assert classes.training_indices().tolist() == [0, 1, 4]  # a/0, b/0, then a/1
    assert classes.training_labels().tolist() == [0, 0, 1]
    got = torch.stack([classes.training_dataset()[i] for i in range(3)])
    want = torch.stack([classes.dataset()[i] for i in (0, 1, 4)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_stream_yields_the_subset_only_every_image_once_an_epoch(in_memory):
    full, data = digits(), digits(limit=20, in_memory=in_memory)
    subset = full.training_dataset().images[data.training_indices()]  # (20, 1, 8, 8)
    stream = data.stream(seed=3)
    for _ in range(3):  # epochs of 4 batches
        seen = []
        for _ in range(4):
            batch = next(stream)
            match = (batch.x[:, None] == subset[None]).flatten(2).all(2)  # (5, 20)
            assert (match.sum(1) == 1).all(), "a batch image outside the subset"
            index = match.int().argmax(1)
            assert torch.equal(batch.y, data.training_labels()[index])  # labels travel with their images
            seen += index.tolist()
        assert sorted(seen) == list(range(20))
    assert stream.class_counts.tolist() == [2.0] * 10


def test_the_fid_reference_is_the_whole_data_under_the_key_of_the_unlimited_data(tmp_path):
    cfg = lambda *o: make_cfg("data=digits", *o).data  # noqa: E731
    key = lambda data_cfg: {k: v for k, v in OmegaConf.to_container(data_cfg).items() if k not in LOADING_KEYS}  # noqa: E731
    assert key(cfg("data.limit=30")) == key(cfg())  # what build() and scripts/evaluate.py key the cache with
    limited_cfg = cfg("data.limit=30", "data.holdout=100")
    data = instantiate(limited_cfg)
    assert data.training_size == 30
    metrics = lambda: Metrics(extractor=TinyFeatures(), num_reference=5000, cache_dir=str(tmp_path))  # noqa: E731
    reference = metrics().reference_features(data, key(limited_cfg))
    whole = instantiate(cfg("data.holdout=100"))
    assert len(reference) == 1697 and len(whole.reference_images()[0]) == 1697
    assert torch.equal(metrics().reference_features(whole, key(cfg("data.holdout=100"))), reference)
    assert len(list(tmp_path.glob("*.pt"))) == 1  # the unlimited run found the limited one's entry
    assert torch.equal(metrics().reference_labels(data, key(limited_cfg), 10), whole.training_labels())


def test_errors_are_one_line():
    with pytest.raises(ConfigError) as e:
        digits(limit=2000).training_dataset()
    assert str(e.value) == "limit=2000: must be at most 1797 (the data has 1797 images)"
    with pytest.raises(ConfigError) as e:
        digits(limit=1000, holdout=1000).stream(seed=0)
    assert str(e.value) == "limit=1000: must be at most 797 (the data has 1797 images, 1000 of them held out)"
    with pytest.raises(ConfigError, match=r"^limit=3: must be >= batch_size=5 \(0: every image\)$"):
        digits(limit=3).stream(seed=0)
    with pytest.raises(ConfigError, match=r"^limit=-1: must be an integer >= 0 \(0: every image\)$"):
        digits(limit=-1)
    for name in ("ring8", "grid25"):  # generated points: no data set to take a subset of, no key
        with pytest.raises(ConfigCompositionException, match="Could not override 'data.limit'"):
            make_cfg(f"data={name}", "data.limit=10")
