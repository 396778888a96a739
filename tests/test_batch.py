"""Batch (issue 22): what the stream yields and every loss receives; labels travel with their images."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.batch import Batch, Latents
from gantrain.build import build
from gantrain.data import BatchStream, Digits, Grid, ImageFolder, Ring, TensorImages, TorchvisionImages, read_idx
from gantrain.data.mnist import idx_files
from gantrain.errors import ConfigError
from gantrain.models import GenerativeModel
from gantrain.models.mlp import Discriminator, Generator
from gantrain.readahead import DrawnAhead
from tests.conftest import make_cfg, shared_mnist


def numbered(n: int) -> TensorImages:
    """Item i is the 1x1 image of value i: a batch's images say which items it holds."""
    return TensorImages(torch.arange(n).float().view(n, 1, 1, 1))


def codes(n: int) -> torch.Tensor:
    return torch.arange(n) % 7  # item i's label: i % 7


def assert_aligned(batch: Batch, size: int) -> None:
    assert len(batch) == size and batch.y.dtype == torch.int64 and batch.y.shape == (size,)
    assert batch.y.tolist() == [i % 7 for i in batch.x.flatten().long().tolist()]


def test_batch_len_and_to():
    x, y = torch.arange(6.0).view(3, 2), torch.tensor([2, 0, 1])
    batch = Batch(x, y)
    assert len(batch) == 3 and len(Batch(torch.zeros(5, 1, 4, 4))) == 5
    moved = batch.to("meta")
    assert moved.x.device.type == "meta" and moved.y.device.type == "meta" and moved.y.dtype == torch.int64
    assert batch.x.device.type == "cpu"  # a new Batch: the original stays where it was
    same = batch.to("cpu", non_blocking=True)
    assert torch.equal(same.x, x) and same.y.tolist() == [2, 0, 1]
    assert Batch(x).to("meta").y is None


def test_prior_draws_the_models_noise_and_no_labels():
    model = GenerativeModel(Generator(nz=3, width=4), Discriminator(width=4))
    latents = model.prior(5, "cpu", generator=torch.Generator().manual_seed(4))
    assert isinstance(latents, Latents) and latents.z.shape == (5, 3) and latents.y is None
    assert torch.equal(latents.z, model.noise(5, "cpu", generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("in_memory", [True, False])
def test_labels_stay_with_their_images_across_ranks_and_resume(in_memory, world_size):
    n, k = 50, 9  # 50 // (4 * world_size) batches an epoch: k crosses an epoch boundary
    kw = dict(seed=3, in_memory=in_memory, world_size=world_size, labels=codes(n))
    streams = [BatchStream(numbered(n), 4, rank=r, **kw) for r in range(world_size)]
    reference = [[next(s) for _ in range(k + 4)] for s in streams]
    for r, batches in enumerate(reference):
        for b in batches:
            assert_aligned(b, 4)
        resumed = BatchStream(numbered(n), 4, rank=r, **kw)
        resumed.load_state_dict({"epoch": k // resumed.batches_per_epoch, "batch": k % resumed.batches_per_epoch})
        for want in batches[k:]:
            got = next(resumed)
            assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    if world_size == 2:  # the ranks' shards of a step are disjoint, each with its own labels
        assert not set(reference[0][0].x.flatten().tolist()) & set(reference[1][0].x.flatten().tolist())


def test_in_memory_and_loader_paths_and_read_ahead_give_the_same_batches():
    kw = dict(seed=1, labels=codes(40))
    memory = BatchStream(numbered(40), 6, in_memory=True, **kw)
    loader = DrawnAhead(BatchStream(numbered(40), 6, in_memory=False, num_workers=1, **kw))
    loader.draw(3)
    for _ in range(10):
        a, b = next(memory), next(loader)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert_aligned(b, 6)
    assert BatchStream(numbered(40), 6, seed=1).__next__().y is None  # no labels given: none yielded


def digit_table(holdout: int = 0) -> dict[bytes, set[int]]:
    """Each digits image (bytes at resolution 8) -> the labels scikit-learn gives it."""
    from sklearn.datasets import load_digits

    data = Digits(resolution=8, channels=1, holdout=holdout)
    table = defaultdict(set)
    images = data.dataset().images
    for img, y in zip(images[: len(images) - holdout], load_digits().target.tolist()):
        table[img.numpy().tobytes()].add(y)
    return table


def assert_in_table(batch: Batch, table: dict[bytes, set[int]]) -> None:
    assert batch.y.dtype == torch.int64 and batch.y.shape == (len(batch),)
    for img, y in zip(batch.x, batch.y.tolist()):
        assert y in table[img.numpy().tobytes()]


@pytest.mark.parametrize("binarize", ["none", "static", "dynamic"])
def test_digits_labels_survive_holdout_and_binarization(binarize):
    common = dict(resolution=8, channels=1, batch_size=32, holdout=97)
    plain = Digits(**common).stream(seed=2)
    table = digit_table(holdout=97)
    other = Digits(**common, binarize=binarize).stream(seed=2, rank=1, world_size=2)
    sharded = Digits(**common).stream(seed=2, rank=1, world_size=2)
    for _ in range(60):  # > 1 epoch of 1700 // 32 batches
        b = next(plain)
        assert_in_table(b, table)
        c, d = next(other), next(sharded)
        assert torch.equal(c.y, d.y)  # binarization changes the pixels, never the labels
        assert_in_table(d, table)
    from sklearn.datasets import load_digits

    assert torch.equal(Digits(**common).training_labels(), torch.from_numpy(load_digits().target[:1700]).long())


def test_labels_reach_the_loss_in_training(one_thread, tmp_path):
    cfg = make_cfg("+experiment=dcgan", "data=digits", "data.resolution=32", "trainer.max_steps=3")
    trainer = build(cfg, tmp_path)
    seen = []
    for phase in trainer.phases:
        phase.loss = lambda batch, step, _loss=phase.loss: seen.append(batch) or _loss(batch, step)
    trainer.fit()
    assert len(seen) == 6 and trainer.images_seen == 6 * 8
    table = defaultdict(set)
    data = Digits(resolution=32, channels=1)
    for img, y in zip(data.dataset().images, data.dataset().labels.tolist()):
        table[img.numpy().tobytes()].add(y)
    for batch in seen:
        assert_in_table(batch, table)


def test_mnist_labels_are_the_idx_files_labels():
    root = shared_mnist()
    common = dict(name="mnist", root=str(root), split="test", download=False, resolution=28, channels=1)
    data = TorchvisionImages(**common, batch_size=16, holdout=2000)
    assert data.num_classes == 10
    idx = read_idx(idx_files(root, "MNIST", "t10k")[1], 2049).long()  # (10000,) the file's own labels
    memory = data.stream(seed=0)
    assert torch.equal(data.training_labels(), idx[:8000])
    table = defaultdict(set)
    for img, y in zip(memory.images, idx[:8000].tolist()):
        table[img.numpy().tobytes()].add(y)
    streamed = TorchvisionImages(**common, batch_size=16, holdout=2000, in_memory=False).stream(seed=0)
    for _ in range(5):
        a, b = next(memory), next(streamed)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert_in_table(a, table)


@pytest.mark.parametrize("mixture", [Ring(batch_size=500), Grid(batch_size=500)], ids=["ring8", "grid25"])
def test_mixture_labels_are_the_mode_of_each_point(mixture):
    stream = mixture.stream(seed=0, rank=0, world_size=1)
    centers = mixture.centers / mixture.scale
    for _ in range(3):
        batch = next(stream)
        assert batch.y.dtype == torch.int64 and batch.y.shape == (500,)
        assert torch.equal(torch.cdist(batch.x, centers).argmin(1), batch.y)  # std << the distance between modes
    with pytest.raises(ConfigError, match=r"^data: \w+ cannot be split between 2 processes \(its stream has no rank\)"):
        mixture.stream(seed=0, rank=1, world_size=2)


def write_pngs(root, names_and_greys) -> None:
    for name, grey in names_and_greys:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), grey, dtype=np.uint8)).save(path)


def test_folder_labels_are_first_level_subfolders(tmp_path):
    # class by first-level subfolder, sorted: ant=0, bee=1, cat=2 (bee's image sits one level deeper)
    write_pngs(tmp_path / "c", [("cat/1.png", 250), ("ant/2.png", 0), ("bee/x/3.png", 120), ("ant/4.png", 10)])
    folder = ImageFolder(path=str(tmp_path / "c"), resolution=8, channels=1, batch_size=4)
    assert folder.num_classes == 3
    for in_memory in (True, False):
        batch = next(
            ImageFolder(path=str(tmp_path / "c"), resolution=8, channels=1, batch_size=4, in_memory=in_memory).stream(
                seed=0
            )
        )
        grey = ((batch.x.mean((1, 2, 3)) + 1) * 127.5).round().long().tolist()
        assert {g: y for g, y in zip(grey, batch.y.tolist())} == {0: 0, 10: 0, 120: 1, 250: 2}
    write_pngs(tmp_path / "flat", [("1.png", 0), ("2.png", 9)])
    write_pngs(tmp_path / "mixed", [("1.png", 0), ("a/2.png", 9)])  # an image in the folder itself: no classes
    for name in ("flat", "mixed"):
        flat = ImageFolder(path=str(tmp_path / name), resolution=8, channels=1, batch_size=2)
        assert flat.num_classes == 0 and next(flat.stream(seed=0)).y is None


def test_num_classes_per_option():
    assert Digits(resolution=8, channels=1).num_classes == 10
    for name in ("mnist", "fashion_mnist", "cifar10"):
        assert TorchvisionImages(name=name, resolution=8, channels=1, download=False).num_classes == 10
    assert Ring().num_classes == 8 and Grid().num_classes == 25 and Ring(num_modes=5).num_classes == 5
