"""``fxmerge.data``: ImageFolder train/val loaders and the errors for unusable folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fxmerge.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    OnDevice,
    check_layout,
    image_folder,
)


def make_image_folder(
    root: Path, classes=("cat", "dog", "fox"), train: int = 4, val: int = 2, size=(20, 24), splits=("train", "val")
) -> Path:
    """A tiny ImageFolder tree of random PNGs; class k is brighter than class k-1."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        count = train if split == "train" else val
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (*size, 3)) + 60 * k
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_loaders_resize_crop_and_normalise(tmp_path):
    root = make_image_folder(tmp_path / "data", train=3, val=2, size=(20, 24))
    train, val = image_folder(root, (1, 3, 16, 16), batch_size=4)
    assert train.dataset.classes == val.dataset.classes == ["cat", "dog", "fox"]
    assert len(train.dataset) == 9 and len(val.dataset) == 6
    images, labels = next(iter(val))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1, 1]  # val is not shuffled
    # a pixel value v in [0, 1] becomes (v - mean) / std per channel
    low = (0.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = images.permute(1, 0, 2, 3).flatten(1)
    assert (per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all()
    assert sum(len(y) for _, y in train) == 9


def test_train_order_is_seeded(tmp_path):
    root = make_image_folder(tmp_path / "data", train=4, val=1)
    first = [y.tolist() for _, y in image_folder(root, (3, 16, 16), batch_size=3, seed=1)[0]]
    again = [y.tolist() for _, y in image_folder(root, (3, 16, 16), batch_size=3, seed=1)[0]]
    assert first == again


def test_grayscale_and_rectangular_inputs(tmp_path):
    root = make_image_folder(tmp_path / "data", train=1, val=1)
    train, _ = image_folder(root, (1, 1, 12, 20), batch_size=8)
    images, _ = next(iter(train))
    assert images.shape == (3, 1, 12, 20)


def test_on_device_moves_batches_and_keeps_len(tmp_path):
    root = make_image_folder(tmp_path / "data", train=2, val=1)
    train, _ = image_folder(root, (1, 3, 8, 8), batch_size=4)
    moved = OnDevice(train, "cpu")
    assert len(moved) == len(train) == 2
    images, labels = next(iter(moved))
    assert images.device.type == "cpu" and labels.dtype == torch.int64


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda root: None,
            r"data directory .*missing does not exist; expected DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE",
        ),
        (lambda root: root.write_text("x"), "is not a directory"),
        (lambda root: make_image_folder(root, splits=("train",)), r"has no val/ folder \(it has train/\)"),
        (lambda root: root.mkdir(), "has no train/ or val/ folder"),
        (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "val")], "train has no class folders"),
        (
            lambda root: [(root / s / "cat").mkdir(parents=True) for s in ("train", "val")],
            r"no images in .*train \(looked for .jpg",
        ),
        (
            lambda root: (
                make_image_folder(root),
                (root / "train" / "empty").mkdir(),
                (root / "val" / "empty").mkdir(),
            ),
            r"no images in 1 class folder\(s\) of .*train: empty",
        ),
        (
            lambda root: (
                make_image_folder(root, classes=("cat", "dog"), splits=("train",)),
                make_image_folder(root, classes=("cat", "owl"), splits=("val",)),
            ),
            r"differ \(only in train/: dog; only in val/: owl\)",
        ),
    ],
    ids=["missing", "file", "no-val", "no-splits", "no-classes", "no-images", "empty-class", "class-mismatch"],
)
def test_layout_errors(tmp_path, setup, message):
    root = tmp_path / "missing"
    setup(root)
    with pytest.raises(DataError, match=message):
        image_folder(root, (1, 3, 16, 16))


def test_loose_images_get_a_hint(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a.png")
    with pytest.raises(DataError, match="one folder per class, not directly in the split"):
        check_layout(tmp_path)


def test_bad_shapes_and_settings(tmp_path):
    root = make_image_folder(tmp_path / "data", train=1, val=1)
    with pytest.raises(DataError, match="shaped \\(batch, channels, height, width\\)"):
        image_folder(root, (16, 16))
    with pytest.raises(DataError, match="1 or 3 channels; the model takes 4"):
        image_folder(root, (1, 4, 16, 16))
    with pytest.raises(DataError, match="batch size must be at least 1"):
        image_folder(root, (1, 3, 16, 16), batch_size=0)
    with pytest.raises(DataError, match="mean and std need 3 value"):
        image_folder(root, (1, 3, 16, 16), mean=(0.5,), std=(0.5,))
    assert check_layout(root) == ["cat", "dog", "fox"]
