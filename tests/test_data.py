"""Tests for gantrain.data (images, folder, mnist, binarization, stream): real images
(sklearn digits, MNIST t10k files/PNGs), the user-facing
errors, and BatchStream's order, coverage, resume and RNG hygiene."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from gantrain.data import (
    BatchStream,
    DataError,
    Digits,
    ImageData,
    ImageFolder,
    TensorImages,
    TorchvisionImages,
    binarize,
    derive_seed,
    image_files,
    read_idx,
)
from gantrain.errors import ConfigError


@pytest.fixture
def no_network(monkeypatch):
    """Every torchvision download path ends in urllib.request.urlopen; make it fail loudly."""
    calls = []

    def offline(request, *args, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return calls


COMMON = dict(batch_size=4, channels=1, resolution=32)


# ----------------------------------------------------------------------------------------------
# ImageData validation


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(batch_size=0), r"^batch_size=0: must be an integer >= 1$"),
        (dict(channels=2), r"^channels=2: must be one of 1, 3 \(1: grey, 3: RGB\)$"),
        (dict(channels=True), r"^channels=True: must be an integer$"),
        (dict(resolution=3), r"^resolution=3: must be an integer >= 4$"),
        (dict(num_workers=-1), r"^num_workers=-1: must be an integer >= 0$"),
        (dict(binarize="yes"), r"^binarize='yes': must be one of none, static, dynamic$"),
        (dict(binarize=True), r"^binarize=True: must be one of none, static, dynamic$"),
        (dict(holdout=-1), r"^holdout=-1: must be an integer >= 0$"),
        (dict(holdout=2.5), r"^holdout=2\.5: must be an integer >= 0$"),
    ],
)
def test_common_arguments_are_validated(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        Digits(**{**COMMON, **override})
    # The object names its own argument; the entry point puts the config path in front.
    key = next(iter(override))
    assert err.value.key == key and str(err.value.within("data")).startswith(f"data.{key}=")


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        ImageData(**COMMON)


# ----------------------------------------------------------------------------------------------
# Digits


def test_digits_are_real_images_in_range():
    data = Digits(batch_size=8, channels=1, resolution=32)
    ds = data.dataset()
    assert len(ds) == 1797
    x = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    allx = ds.images
    assert allx.min().item() >= -1.0 and allx.max().item() <= 1.0
    # Background is exactly 0/16 -> -1; the strokes reach 16/16 -> +1.
    assert allx.min().item() == pytest.approx(-1.0, abs=1e-6)
    assert allx.max().item() == pytest.approx(1.0, abs=1e-3)
    # Hand-computed bilinear upsampling (align_corners=False, x4): output pixel 4k+2 samples
    # the 8x8 input at k + 0.125, i.e. 7/8 of pixel k plus 1/8 of pixel k+1 on each axis.
    from sklearn.datasets import load_digits

    v = torch.from_numpy(load_digits().images[0]).float() / 16  # (8, 8) in [0, 1]
    rows = 0.875 * v[:-1] + 0.125 * v[1:]  # (7, 8)
    expected = 0.875 * rows[:, :-1] + 0.125 * rows[:, 1:]  # (7, 7)
    torch.testing.assert_close(x[0, 2:30:4, 2:30:4], expected * 2 - 1, atol=1e-5, rtol=0)


def test_digits_three_channels_are_identical_copies():
    grey = Digits(batch_size=8, channels=1, resolution=16).dataset().images
    rgb = Digits(batch_size=8, channels=3, resolution=16).dataset().images
    assert rgb.shape == (1797, 3, 16, 16)
    for c in range(3):
        assert torch.equal(rgb[:, c], grey[:, 0])


def test_digits_native_resolution_is_exact():
    from sklearn.datasets import load_digits

    ds = Digits(batch_size=8, channels=1, resolution=8).dataset()
    expected = torch.from_numpy(load_digits().images).float()[:, None] / 16 * 2 - 1
    torch.testing.assert_close(ds.images, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# TorchvisionImages


def test_unknown_torchvision_name_lists_allowed():
    match = r"^name='svhn': must be one of cifar10, fashion_mnist, mnist \(or data=folder"
    with pytest.raises(ConfigError, match=match):
        TorchvisionImages(name="svhn", **COMMON)


def test_bad_split_is_rejected():
    with pytest.raises(ConfigError, match=r"^split='val': must be one of train, test$"):
        TorchvisionImages(name="mnist", split="val", **COMMON)


def test_torchvision_root_is_absolute_and_construction_is_lazy(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    data = TorchvisionImages(name="mnist", root="rel/data", **COMMON)
    assert data.root == str(tmp_path.resolve() / "rel" / "data")
    assert not (tmp_path / "rel").exists()  # nothing touched before dataset()
    assert no_network == []


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_offline_missing_files_give_one_clear_error(tmp_path, no_network, name):
    root = tmp_path / "nowhere"
    data = TorchvisionImages(name=name, root=str(root), split="test", download=True, **COMMON)
    with pytest.raises(DataError) as info:
        data.dataset()
    msg = str(info.value)
    assert f"data.root '{root.resolve()}'" in msg
    assert f"data.name='{name}'" in msg
    assert "missing" in msg and "could not be downloaded" in msg
    assert "data=digits" in msg and "data=folder data.path=DIR" in msg
    # Raised `from None`: users see our message, not urllib's traceback.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert no_network, "torchvision should have tried (and been refused) a download"


def test_missing_files_without_download(tmp_path, no_network):
    data = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", download=False, **COMMON)
    with pytest.raises(DataError, match=r"could not be downloaded \(data\.download=false; RuntimeError"):
        data.dataset()
    assert no_network == []


def test_mnist_test_split_from_local_archives(tmp_path, mnist_dir, no_network):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / "raw" / f, raw / f)

    ds = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", download=True, **COMMON).dataset()
    assert no_network == []  # the archives are present: read in place, neither fetched nor extracted
    assert sorted(os.listdir(raw)) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert not (tmp_path / "MNIST" / "processed").exists()
    assert len(ds) == 10_000
    x = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() <= 1.0

    # Index 0 of the test set is the 7 stored as png/7/00000.png. At the native 28 px the
    # transform is exactly v / 127.5 - 1 of the PNG's bytes.
    png = mnist_dir / "png" / "7" / "00000.png"
    native = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", batch_size=4, channels=1, resolution=28)
    pixels = torch.from_numpy(np.asarray(Image.open(png).convert("L"), dtype=np.float32))
    torch.testing.assert_close(native.dataset()[0][0], pixels / 127.5 - 1, atol=1e-6, rtol=0)

    # At 32 px: the same PNG through ImageFolder's pipeline gives the same tensor.
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(png, single / "00000.png")
    via_folder = ImageFolder(path=str(single), **COMMON).dataset()[0]
    assert torch.equal(x, via_folder)

    # channels=3: three identical grey channels.
    rgb = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", batch_size=4, channels=3, resolution=32)
    x3 = rgb.dataset()[0]
    assert x3.shape == (3, 32, 32)
    assert torch.equal(x3[0], x[0]) and torch.equal(x3[1], x[0]) and torch.equal(x3[2], x[0])


# ----------------------------------------------------------------------------------------------
# ImageFolder


@pytest.fixture
def png_subset(tmp_path, mnist_dir) -> Path:
    """50 real MNIST PNGs (5 per digit) in nested label folders, one with an upper-case suffix."""
    dst = tmp_path / "imgs"
    for label in range(10):
        (dst / str(label)).mkdir(parents=True)
        for src in sorted((mnist_dir / "png" / str(label)).iterdir())[:5]:
            shutil.copy(src, dst / str(label) / src.name)
    first = sorted((dst / "0").iterdir())[0]
    first.rename(first.with_suffix(".PNG"))
    (dst / "notes.txt").write_text("not an image")
    return dst


def test_real_png_folder_has_10000_images(mnist_dir):
    files = image_files(mnist_dir / "png")
    assert len(files) == 10_000
    assert files[0].relative_to(mnist_dir / "png").as_posix() == "0/00003.png"


def test_image_folder_loads_nested_sorted_pngs(png_subset):
    ds = ImageFolder(path=str(png_subset), batch_size=4, channels=1, resolution=28).dataset()
    assert len(ds) == 50  # the .PNG counts, notes.txt does not
    rel = [f.relative_to(png_subset).as_posix() for f in ds.files]
    assert rel == sorted(rel) and rel[0].startswith("0/") and rel[-1].startswith("9/")
    x = ds[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    pixels = np.asarray(Image.open(ds.files[7]), dtype=np.float32)
    torch.testing.assert_close(x[0], torch.from_numpy(pixels) / 127.5 - 1, atol=1e-6, rtol=0)


def test_image_folder_three_channels_and_resize(png_subset):
    ds = ImageFolder(path=str(png_subset), batch_size=4, channels=3, resolution=16).dataset()
    x = ds[3]
    assert x.shape == (3, 16, 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert -1.0 <= x.min().item() and x.max().item() <= 1.0 and x.max().item() > 0.5


def test_image_folder_rgb_to_grey_and_crop(tmp_path):
    # A 40x20 RGB image: left half red, right half blue. Short side 20 -> 8, crop 8x8 centre.
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    rgb = ImageFolder(path=str(tmp_path), batch_size=1, channels=3, resolution=8).dataset()[0]
    assert rgb.shape == (3, 8, 8)
    assert rgb[1].max().item() == pytest.approx(-1.0)  # no green anywhere
    grey = ImageFolder(path=str(tmp_path), batch_size=1, channels=1, resolution=8).dataset()[0]
    # PIL's luma: red 255 -> 76 (0.299), blue 255 -> 29 (0.114); left column red, right blue.
    assert grey[0, 4, 0].item() == pytest.approx(76 / 127.5 - 1, abs=1e-6)
    assert grey[0, 4, 7].item() == pytest.approx(29 / 127.5 - 1, abs=1e-6)


def test_image_folder_relative_path_uses_launch_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = ImageFolder(path="some/imgs", **COMMON)
    assert data.path == str(tmp_path.resolve() / "some" / "imgs")


def test_relative_paths_resolve_against_hydra_launch_dir(tmp_path, monkeypatch):
    from hydra import compose, initialize
    from hydra.core.hydra_config import HydraConfig

    launch, run_dir = tmp_path / "launch", tmp_path / "outputs" / "run"
    launch.mkdir()
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(launch)
    with initialize(version_base=None):
        cfg = compose(return_hydra_config=True)  # records hydra.runtime.cwd = launch
    monkeypatch.chdir(run_dir)  # what a Hydra run does with hydra.job.chdir=true
    HydraConfig.instance().set_config(cfg)
    try:
        assert ImageFolder(path="imgs", **COMMON).path == str(launch.resolve() / "imgs")
        assert TorchvisionImages(name="mnist", root="data", **COMMON).root == str(launch.resolve() / "data")
        assert ImageFolder(path=str(tmp_path / "abs"), **COMMON).path == str(tmp_path.resolve() / "abs")
    finally:
        HydraConfig.instance().cfg = None
    assert not HydraConfig.initialized()
    assert ImageFolder(path="imgs", **COMMON).path == str(run_dir.resolve() / "imgs")


def test_image_folder_missing_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=rf"data\.path '{missing.resolve()}' does not exist"):
        ImageFolder(path=str(missing), **COMMON).dataset()


def test_image_folder_path_is_a_file(tmp_path):
    f = tmp_path / "x.png"
    f.write_bytes(b"")
    with pytest.raises(DataError, match=rf"data\.path '{f.resolve()}' is a file, not a directory"):
        ImageFolder(path=str(f), **COMMON).dataset()


def test_image_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    with pytest.raises(
        DataError, match=rf"no images \(\.png, \.jpg, \.jpeg, \.webp, \.bmp\) under data\.path '{tmp_path.resolve()}'"
    ):
        ImageFolder(path=str(tmp_path), **COMMON).dataset()


def test_image_folder_reports_every_corrupt_file(png_subset):
    (png_subset / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (png_subset / "zzz_empty.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        ImageFolder(path=str(png_subset), **COMMON).dataset()
    msg = str(info.value)
    assert msg.startswith(f"2 of 52 files under data.path '{png_subset.resolve()}' could not be read as images: ")
    assert "3/broken.png" in msg and "zzz_empty.png" in msg
    with pytest.raises(DataError, match=r"2 of 52 .*broken\.png"):
        ImageFolder(path=str(png_subset), **COMMON).dataset()


def test_image_folder_skips_hidden_files(png_subset):
    (png_subset / "._00003.png").write_bytes(b"AppleDouble junk")
    (png_subset / ".cache").mkdir()
    (png_subset / ".cache" / "x.png").write_bytes(b"junk")
    assert len(ImageFolder(path=str(png_subset), **COMMON).dataset()) == 50


# ----------------------------------------------------------------------------------------------
# BatchStream


class Numbered(Dataset):
    """Item i is a (1, 2, 2) image filled with the value i: batches reveal their indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((1, 2, 2), float(i))


def ids(batch: torch.Tensor) -> list[int]:
    """Item indices of a batch of `Numbered` (value i) or `Coded` (i in binary in row 0) images."""
    if batch.shape[-2:] == (8, 8):  # Coded
        return ((batch[:, 0, 0] > 0).long() * 2 ** torch.arange(8)).sum(1).tolist()
    return batch[:, 0, 0, 0].long().tolist()


def take(stream, k: int) -> list[list[int]]:
    return [ids(next(stream).x) for _ in range(k)]


@pytest.mark.parametrize("in_memory", [True, False])
def test_stream_order_is_the_seeded_permutation(in_memory):
    s = BatchStream(Numbered(10), 3, seed=5, in_memory=in_memory)
    assert s.batches_per_epoch == 3  # 10 // 3, the last item of each epoch is dropped
    got = take(s, 6)
    for epoch in range(2):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed("order", 5, epoch))).tolist()
        assert got[3 * epoch : 3 * epoch + 3] == [perm[0:3], perm[3:6], perm[6:9]]
    assert s.state_dict() == {"epoch": 2, "batch": 0}


@pytest.mark.parametrize("in_memory", [True, False])
def test_stream_same_seed_same_batches_other_seed_differs(in_memory):
    ds = Numbered(64)
    a = take(BatchStream(ds, 8, seed=1, in_memory=in_memory), 10)
    b = take(BatchStream(ds, 8, seed=1, in_memory=in_memory), 10)
    c = take(BatchStream(ds, 8, seed=2, in_memory=in_memory), 10)
    assert a == b
    assert a != c


def test_stream_batch_shape_dtype_and_exact_size():
    ds = Digits(batch_size=7, channels=3, resolution=8).dataset()
    s = BatchStream(ds, 7, seed=0)
    assert s.batches_per_epoch == 1797 // 7 == 256
    for _ in range(300):  # crosses an epoch boundary with 5 items dropped
        x = next(s).x
        assert x.shape == (7, 3, 8, 8) and x.dtype == torch.float32 and x.device.type == "cpu"


@pytest.mark.parametrize("in_memory", [True, False])
def test_every_item_once_per_epoch(in_memory):
    s = BatchStream(Numbered(100), 10, seed=3, in_memory=in_memory)
    for _ in range(3):
        seen = sum(take(s, s.batches_per_epoch), [])
        assert sorted(seen) == list(range(100))


def test_incomplete_batch_is_dropped_and_varies_by_epoch():
    s = BatchStream(Numbered(10), 4, seed=0)
    dropped = []
    for _ in range(3):
        seen = sum(take(s, 2), [])
        assert len(seen) == len(set(seen)) == 8
        dropped.append(sorted(set(range(10)) - set(seen)))
    assert len({tuple(d) for d in dropped}) > 1  # not always the same two images left out


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shares(world_size):
    streams = [BatchStream(Numbered(50), 4, seed=9, rank=r, world_size=world_size) for r in range(world_size)]
    per_epoch = 50 // (4 * world_size)
    assert all(s.batches_per_epoch == per_epoch for s in streams)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(derive_seed("order", 9, 0))).tolist()
    seen = []
    for b in range(per_epoch):
        group = perm[b * 4 * world_size : (b + 1) * 4 * world_size]
        for r, s in enumerate(streams):
            batch = ids(next(s).x)
            assert batch == group[r::world_size]
            seen += batch
    assert len(seen) == len(set(seen)) == per_epoch * 4 * world_size


@pytest.mark.parametrize("in_memory, num_workers", [(True, 0), (False, 0), (True, 2), (False, 2)])
@pytest.mark.parametrize("k", [2, 5, 7])  # mid-epoch, at the epoch boundary, in epoch 1
def test_resume_gives_the_uninterrupted_batches(in_memory, num_workers, k):
    ds = Numbered(26)  # batch 5 -> 5 batches per epoch, one item dropped
    kw = dict(seed=11, in_memory=in_memory, num_workers=num_workers)
    reference = take(BatchStream(ds, 5, **kw), k + 8)

    first = BatchStream(ds, 5, **kw)
    assert take(first, k) == reference[:k]
    state = first.state_dict()
    assert state == {"epoch": k // 5, "batch": k % 5}

    resumed = BatchStream(ds, 5, **kw)
    resumed.load_state_dict(state)
    assert take(resumed, 8) == reference[k:]
    # The original keeps going too, unaffected by the checkpoint.
    assert take(first, 3) == reference[k : k + 3]


def test_load_state_dict_rewinds_a_running_stream():
    s = BatchStream(Numbered(40), 4, seed=0, in_memory=False, num_workers=0)
    reference = take(s, 6)
    s.load_state_dict({"epoch": 0, "batch": 2})
    assert take(s, 4) == reference[2:6]
    s.load_state_dict({"epoch": 0, "batch": 10})  # "all 10 consumed" == start of epoch 1
    assert s.state_dict() == {"epoch": 1, "batch": 0}


def test_dropping_a_streaming_stream_frees_it_without_gc():
    # No stream <-> DataLoader-iterator cycle: workers stop as soon as the stream is dropped,
    # instead of whenever the cycle collector runs (where their shutdown stalled ~5 s each).
    import gc
    import weakref

    gc.disable()
    try:
        s = BatchStream(Numbered(20), 4, seed=0, in_memory=False, num_workers=2)
        take(s, 2)
        ref = weakref.ref(s)
        del s
        assert ref() is None
    finally:
        gc.enable()


def test_bad_stream_state_is_a_clear_error():
    s = BatchStream(Numbered(40), 4, seed=0)
    with pytest.raises(DataError, match=r"an epoch has 10 batches .*did data\.batch_size or the dataset change"):
        s.load_state_dict({"epoch": 0, "batch": 11})
    with pytest.raises(DataError, match=r"data stream state must be \{'epoch': int, 'batch': int\}"):
        s.load_state_dict({"step": 3})


def _assert_same_rng_states(before, after) -> None:
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("in_memory, num_workers", [(True, 0), (False, 0), (False, 2)])
def test_stream_never_touches_global_rngs(in_memory, num_workers):
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = _rng_states()
    s = BatchStream(Numbered(30), 4, seed=0, in_memory=in_memory, num_workers=num_workers)
    take(s, 10)  # crosses an epoch boundary
    s.load_state_dict({"epoch": 3, "batch": 1})
    take(s, 2)
    _assert_same_rng_states(before, _rng_states())


def test_in_memory_load_goes_through_a_dataloader_without_global_rng():
    # A generic (non-tensor) dataset takes the DataLoader stacking pass.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    s = BatchStream(Numbered(600), 50, seed=0, in_memory=True, num_workers=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert s.images.shape == (600, 1, 2, 2)
    assert torch.equal(s.images[:, 0, 0, 0], torch.arange(600, dtype=torch.float32))


def test_dataset_smaller_than_batch_is_an_error():
    with pytest.raises(ConfigError, match=r"^batch_size=16: must be at most 10 \(the dataset has 10 images\)$"):
        BatchStream(Numbered(10), 16, seed=0)
    match = r"^batch_size=4: must be at most 3 \(the dataset has 10 images; 4 x world_size 3"
    with pytest.raises(ConfigError, match=match):
        BatchStream(Numbered(10), 4, seed=0, rank=0, world_size=3)


def test_tensor_images_dataset_is_used_directly():
    images = torch.arange(12, dtype=torch.float32).reshape(6, 1, 1, 2)
    s = BatchStream(TensorImages(images), 2, seed=0)
    batch = next(s).x
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(derive_seed("order", 0, 0)))
    assert torch.equal(batch, images[perm[:2]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_memory", [True, False])
def test_stream_on_cuda(in_memory):
    s = BatchStream(Numbered(20), 4, seed=0, device="cuda", in_memory=in_memory)
    x = next(s).x
    assert x.device.type == "cuda" and x.shape == (4, 1, 2, 2)
    cpu = BatchStream(Numbered(20), 4, seed=0, in_memory=in_memory)
    assert torch.equal(x.cpu(), next(cpu).x)


def test_neighbouring_seeds_do_not_share_epoch_orders():
    # With seed + epoch, seed 1's epoch 0 would be seed 0's epoch 1.
    a, b = BatchStream(Numbered(40), 40, seed=0), BatchStream(Numbered(40), 40, seed=1)
    next(a)
    assert not torch.equal(next(a).x, next(b).x)


# ----------------------------------------------------------------------------------------------
# Binarization (data.binarize) and held-out images (data.holdout)


class Coded(Dataset):
    """Item i is a (1, 8, 8) image: row 0 spells i in binary with pixels -1/+1 (which binarization
    keeps as they are), rows 1..7 are the grey level `grey` (which it randomizes)."""

    def __init__(self, n: int, grey: float = 0.0):
        assert n <= 256
        self.n, self.grey = n, grey

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.full((1, 8, 8), self.grey)
        x[0, 0] = torch.tensor([1.0 if (i >> bit) & 1 else -1.0 for bit in range(8)])
        return x


def grey_part(batch: torch.Tensor) -> torch.Tensor:
    return batch[:, :, 1:]  # Coded's rows 1..7


class GivenData(ImageData):
    """An `ImageData` whose `dataset()` is the one given (a tensor is wrapped in TensorImages)."""

    def __init__(self, data, **common):
        super().__init__(**common)
        self.data = data

    def dataset(self) -> Dataset:
        return TensorImages(self.data) if isinstance(self.data, torch.Tensor) else self.data


def stacked(ds: Dataset) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])


@pytest.mark.parametrize("binarized", [False, True])
@pytest.mark.parametrize("in_memory, num_workers", [(True, 0), (False, 0), (False, 2)])
def test_binarizing_stream_never_touches_global_rngs(in_memory, num_workers, binarized):
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = _rng_states()
    s = BatchStream(Coded(30), 4, seed=0, in_memory=in_memory, num_workers=num_workers, binarize=binarized)
    take(s, 10)
    s.load_state_dict({"epoch": 3, "batch": 1})
    take(s, 2)
    _assert_same_rng_states(before, _rng_states())


def test_binarize_gives_plus_minus_one_with_probability_x01():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((100, 1, 16, 16), -0.4)  # x01 = 0.3
    b = binarize(x, gen)
    assert b.shape == x.shape and b.dtype == torch.float32
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert ((b + 1) / 2).mean().item() == pytest.approx(0.3, abs=0.01)  # 25,600 draws: sd 0.003
    # Black and white stay put; the generator's draws decide everything else.
    assert torch.equal(binarize(torch.full((50, 50), -1.0), gen), torch.full((50, 50), -1.0))
    assert torch.equal(binarize(torch.full((50, 50), 1.0), gen), torch.full((50, 50), 1.0))
    assert torch.equal(binarize(x, torch.Generator().manual_seed(0)), b)


@pytest.mark.parametrize("in_memory", [True, False])
def test_binarize_none_keeps_the_grey_levels(in_memory):
    data = GivenData(Coded(8, grey=-0.4), batch_size=4, channels=1, resolution=8, in_memory=in_memory)
    x = next(data.stream(seed=0)).x
    assert torch.equal(grey_part(x), torch.full((4, 1, 7, 8), -0.4))


def test_static_binarization_of_real_images_is_fixed():
    a = Digits(batch_size=8, channels=1, resolution=8, binarize="static").training_dataset().images
    b = Digits(batch_size=8, channels=1, resolution=8, binarize="static").training_dataset().images
    grey = Digits(batch_size=8, channels=1, resolution=8).dataset().images
    assert a.shape == grey.shape == (1797, 1, 8, 8)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(a, b)  # two builds (as in two runs): bit-identical
    # Pixel by pixel, P(+1) = x01: over all 115,008 pixels the means agree.
    assert ((a + 1) / 2).mean().item() == pytest.approx(((grey + 1) / 2).mean().item(), abs=0.01)
    assert torch.equal(a[grey == -1], grey[grey == -1]) and torch.equal(a[grey == 1], grey[grey == 1])


@pytest.mark.parametrize("in_memory", [True, False])
def test_static_stream_repeats_each_image_dynamic_redraws_it(in_memory):
    common = dict(batch_size=4, channels=1, resolution=8, in_memory=in_memory)
    for mode in ("static", "dynamic"):
        s = GivenData(Coded(16), binarize=mode, **common).stream(seed=3)
        seen: dict[int, list[torch.Tensor]] = {}
        for _ in range(3 * s.batches_per_epoch):  # three epochs: each image three times
            x = next(s).x
            assert set(x.unique().tolist()) <= {-1.0, 1.0}
            for i, image in zip(ids(x), x):
                seen.setdefault(i, []).append(image)
        assert sorted(seen) == list(range(16)) and all(len(v) == 3 for v in seen.values())
        for i, images in seen.items():
            same = [torch.equal(images[0], other) for other in images[1:]]
            # 56 grey pixels at p = 0.5: two dynamic draws coincide with probability 2**-56.
            assert all(same) if mode == "static" else not any(same), (mode, i)


def test_dynamic_binarization_mean_is_x01():
    data = GivenData(Coded(64, grey=-0.4), batch_size=16, channels=1, resolution=8, binarize="dynamic")
    s = data.stream(seed=0)
    draws = torch.cat([grey_part(next(s).x).flatten() for _ in range(60)])  # 53,760 draws of x01 = 0.3
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    assert ((draws + 1) / 2).mean().item() == pytest.approx(0.3, abs=0.01)  # sd 0.002
    # Every image of a batch gets its own noise, and every batch new noise.
    x, y = next(s).x, next(s).x
    assert len({tuple(img.flatten().tolist()) for img in grey_part(x)}) == 16
    assert not torch.equal(grey_part(x), grey_part(y))


@pytest.mark.parametrize("in_memory, num_workers", [(True, 0), (False, 0), (False, 2)])
@pytest.mark.parametrize("k", [3, 5, 7])  # mid-epoch, at the epoch boundary, in epoch 1
def test_dynamic_resume_is_bit_identical(in_memory, num_workers, k):
    ds = Coded(26)  # batch 5 -> 5 batches per epoch
    kw = dict(seed=11, in_memory=in_memory, num_workers=num_workers, binarize=True)
    reference = [next(s).x for s in [BatchStream(ds, 5, **kw)] for _ in range(k + 6)]
    first = BatchStream(ds, 5, **kw)
    for i in range(k):
        assert torch.equal(next(first).x, reference[i])
    resumed = BatchStream(ds, 5, **kw)
    resumed.load_state_dict(first.state_dict())
    for i in range(k, k + 6):
        assert torch.equal(next(resumed).x, reference[i])
    # Both paths draw the same noise: in-memory and streamed batches agree bit for bit.
    other = BatchStream(ds, 5, **{**kw, "in_memory": not in_memory, "num_workers": 0})
    assert all(torch.equal(next(other).x, reference[i]) for i in range(k + 6))


def test_ranks_binarize_with_their_own_noise():
    grey = torch.zeros(8, 1, 8, 8)  # identical images: rank 0 and 1 must still differ
    a = next(BatchStream(TensorImages(grey), 4, seed=0, rank=0, world_size=2, binarize=True)).x
    b = next(BatchStream(TensorImages(grey), 4, seed=0, rank=1, world_size=2, binarize=True)).x
    assert not torch.equal(a, b)


@pytest.mark.parametrize("kind", ["dataset", "tensor"])
@pytest.mark.parametrize("in_memory", [True, False])
def test_holdout_is_never_streamed_and_heldout_returns_it(kind, in_memory):
    data_ = Numbered(30) if kind == "dataset" else stacked(Numbered(30))
    data = GivenData(data_, batch_size=4, channels=1, resolution=4, in_memory=in_memory, holdout=6)
    assert data.training_size == 24
    s = data.stream(seed=5)
    assert s.num_items == 24 and s.batches_per_epoch == 6
    for _ in range(3):
        assert sorted(sum(take(s, 6), [])) == list(range(24))  # every training image, no held-out one
    held = data.heldout()
    assert held.shape == (6, 1, 2, 2) and held.dtype == torch.float32 and held.device.type == "cpu"
    assert torch.equal(held, stacked(Numbered(30))[24:])  # the last 6, in file order
    assert torch.equal(data.heldout(device="cpu"), held)


@pytest.mark.parametrize("kind", ["dataset", "tensor"])
def test_heldout_uses_the_fixed_static_binarization(kind):
    def make(**kw):
        data_ = Coded(30) if kind == "dataset" else stacked(Coded(30))
        return GivenData(data_, batch_size=4, channels=1, resolution=8, **kw)

    everything = stacked(make(binarize="static").training_dataset())  # holdout=0: all 30, binarized
    assert set(everything.unique().tolist()) == {-1.0, 1.0}
    for mode in ("static", "dynamic"):
        held = make(binarize=mode, holdout=6).heldout()
        assert ids(held) == list(range(24, 30))
        assert torch.equal(held, everything[24:])  # the same images a static run holds, whatever the mode
    assert torch.equal(stacked(make(binarize="static", holdout=6).training_dataset()), everything[:24])
    assert torch.equal(make(holdout=6).heldout(), stacked(Coded(30))[24:])  # binarize=none: grey kept
    # Both code paths (tensor and lazily binarized dataset) give the same bits.
    other = stacked(Coded(30)) if kind == "dataset" else Coded(30)
    twin = GivenData(other, batch_size=4, channels=1, resolution=8, binarize="static")
    assert torch.equal(stacked(twin.training_dataset()), everything)


def test_heldout_and_streams_never_touch_global_rngs():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    for mode in ("static", "dynamic"):
        data = GivenData(Coded(30), batch_size=4, channels=1, resolution=8, binarize=mode, holdout=6)
        data.heldout()
        take(data.stream(seed=0), 9)
    assert torch.equal(torch.get_rng_state(), before)


def test_holdout_errors():
    def make(holdout):
        return GivenData(Numbered(30), batch_size=4, channels=1, resolution=4, holdout=holdout)

    assert make(26).training_size == 4  # exactly one batch left is fine
    for holdout, left in ((27, 3), (40, 0)):
        msg = (
            rf"^holdout={holdout}: must be at most 26 \(leaves {left} of the dataset's 30 images for training, "
            rf"less than one batch of 4\)$"
        )
        with pytest.raises(ConfigError, match=msg):
            make(holdout).stream(seed=0)
        with pytest.raises(ConfigError, match=msg):
            make(holdout).heldout()
    match = r"^holdout=0: must be >= 1 for held-out images \(train with data\.holdout=N\)$"
    with pytest.raises(ConfigError, match=match):
        make(0).heldout()


# ----------------------------------------------------------------------------------------------
# MNIST IDX files directly under data.root/raw


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (gzipped if the name ends in .gz), as MNIST ships them."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    blob = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)


def fake_split(folder: Path, n: int, *, gz: bool = True, split: str = "t10k", offset: int = 0) -> np.ndarray:
    images = (np.arange(n * 28 * 28).reshape(n, 28, 28) * 7 + offset) % 256
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)
    return images


NATIVE = dict(batch_size=4, channels=1, resolution=28)  # MNIST's own size: no resizing


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (root included) with its mtime and size: any write shows up."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("download", [True, False])
def test_idx_files_directly_under_root_raw(tmp_path, no_network, gz, name, download):
    images = fake_split(tmp_path / "raw", 5, gz=gz)
    before = snapshot(tmp_path)
    data = TorchvisionImages(name=name, root=str(tmp_path), split="test", download=download, **NATIVE)
    ds = data.dataset()
    assert len(ds) == 5
    for i in range(5):  # native 28 px: byte k -> k / 127.5 - 1, nothing resized
        torch.testing.assert_close(ds[i][0], torch.from_numpy(images[i]).float() / 127.5 - 1, atol=1e-6, rtol=0)
    assert snapshot(tmp_path) == before and no_network == []  # read in place: nothing fetched or written


def test_torchvision_layout_is_preferred_over_root_raw(tmp_path, no_network):
    nested = fake_split(tmp_path / "MNIST" / "raw", 3, offset=1)
    fake_split(tmp_path / "raw", 5)
    ds = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", download=False, **NATIVE)
    assert len(ds.dataset()) == 3
    assert torch.equal(((ds.dataset()[2][0] + 1) * 127.5).round(), torch.from_numpy(nested[2]).float())
    # The other split is not there at all: the usual error, naming both places.
    train = TorchvisionImages(name="mnist", root=str(tmp_path), split="train", download=False, **COMMON)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] and train-labels-idx1-ubyte\[\.gz\] there "):
        train.dataset()
    with pytest.raises(DataError, match=r"\(in MNIST/raw/ or raw/\), or train offline"):
        train.dataset()


def test_broken_idx_files_name_the_file(tmp_path, no_network):
    raw = tmp_path / "raw"
    fake_split(raw, 4, gz=False)
    images = raw / "t10k-images-idx3-ubyte"
    data = TorchvisionImages(name="mnist", root=str(tmp_path), split="test", download=False, **COMMON)

    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(
        DataError, match=rf"'{images}' holds 3126 bytes of data but its header says 4x28x28; .*truncated"
    ):
        data.dataset()
    images.write_bytes(struct.pack(">4I", 2049, 1, 28, 28) + bytes(784))
    with pytest.raises(DataError, match=r"is not an IDX file of 3-d unsigned bytes \(magic 2049, expected 2051\)"):
        data.dataset()
    fake_split(raw, 3, gz=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(4))
    with pytest.raises(DataError, match=r"3 images but 4 labels in '.*raw': the files do not belong together"):
        data.dataset()
    gz = raw / "t10k-images-idx3-ubyte.gz"
    images.unlink()
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"could not read the IDX file '.*t10k-images-idx3-ubyte\.gz' \(BadGzipFile"):
        data.dataset()


def test_read_idx_matches_the_shared_pngs(mnist_dir):
    images = read_idx(mnist_dir / "raw" / "t10k-images-idx3-ubyte.gz", 2051)
    labels = read_idx(mnist_dir / "raw" / "t10k-labels-idx1-ubyte.gz", 2049)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8 and labels.shape == (10_000,)
    for i in (0, 1, 4321, 9999):
        png = mnist_dir / "png" / str(int(labels[i])) / f"{i:05d}.png"
        assert torch.equal(images[i], torch.from_numpy(np.array(Image.open(png).convert("L"))))


def test_shared_mnist_root_raw_layout_protocol(mnist_dir, no_network):
    """The benchmark protocol: `data=mnist data.root=<shared>/mnist-t10k data.split=test
    data.download=false data.holdout=2000 data.binarize=dynamic model.resolution=28`."""
    from hydra.utils import instantiate

    from tests.conftest import make_cfg

    before = snapshot(mnist_dir)
    common = dict(name="mnist", root=str(mnist_dir), split="test", resolution=28, channels=1, batch_size=64)
    ds = TorchvisionImages(download=False, **common).dataset()
    assert len(ds) == 10_000
    pngs = {int(p.stem): p for p in (mnist_dir / "png").glob("*/*.png")}
    assert sorted(pngs) == list(range(10_000))  # png/<label>/<test-set index>.png
    for i in range(0, 10_000, 500):  # 20 images: exactly the PNG's bytes k as k / 127.5 - 1
        pixels = torch.from_numpy(np.asarray(Image.open(pngs[i]).convert("L"), dtype=np.float32))
        x = ds[i]
        assert x.shape == (1, 28, 28)
        torch.testing.assert_close(x[0], pixels / 127.5 - 1, atol=1e-6, rtol=0)
        assert torch.equal(((x[0] + 1) * 127.5).round(), pixels)

    plain = TorchvisionImages(download=True, holdout=2000, **common)  # download=true: files found, nothing fetched
    assert plain.training_size == 8000
    held = plain.heldout()
    assert held.shape == (2000, 1, 28, 28)
    for i in (0, 1, 1999):
        assert torch.equal(held[i], ds[8000 + i])
    s = plain.stream(seed=0)
    assert s.num_items == 8000 and torch.equal(s.images[-1], ds[7999]) and torch.equal(s.images[0], ds[0])

    cfg = make_cfg(
        "data=mnist",
        f"data.root={mnist_dir}",
        "data.split=test",
        "data.download=false",
        "data.holdout=2000",
        "data.binarize=dynamic",
        "model.resolution=28",
        tiny=False,
    )
    data = instantiate(cfg.data)
    assert (data.resolution, data.binarize, data.holdout, data.training_size) == (28, "dynamic", 2000, 8000)
    binary = data.heldout()
    assert binary.shape == (2000, 1, 28, 28) and set(binary.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(binary, data.heldout())
    x = next(data.stream(seed=0)).x
    assert x.shape == (64, 1, 28, 28) and set(x.unique().tolist()) == {-1.0, 1.0}
    assert snapshot(mnist_dir) == before and no_network == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("in_memory", [True, False])
def test_dynamic_binarization_on_cuda(in_memory):
    kw = dict(seed=0, device="cuda", in_memory=in_memory, binarize=True)
    s = BatchStream(Coded(64, grey=-0.4), 16, **kw)
    batches = [next(s).x for _ in range(8)]
    assert all(x.device.type == "cuda" for x in batches)
    draws = torch.cat([grey_part(x).flatten() for x in batches])
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    assert ((draws + 1) / 2).mean().item() == pytest.approx(0.3, abs=0.015)
    resumed = BatchStream(Coded(64, grey=-0.4), 16, **kw)
    resumed.load_state_dict({"epoch": 1, "batch": 1})  # 4 batches an epoch: the 6th batch drawn
    assert all(torch.equal(next(resumed).x, x) for x in batches[5:])
