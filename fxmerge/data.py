"""Image data for the command line: a folder of labelled images as train and val loaders.

``fxmerge compress --data DIR`` reads the layout torchvision's ``ImageFolder`` reads,
with one folder per split and one folder per class inside each::

    DIR/train/<class>/<image>.jpg
    DIR/val/<class>/<image>.jpg

Every image is resized (shorter side to ``size / crop_fraction``, 256 for 224 as in
the usual ImageNet evaluation), centre-cropped to the model's input height and width,
converted to one or three channels to match the model, and normalised (ImageNet
statistics unless ``mean`` / ``std`` are given). There is no random augmentation:
fxmerge fine-tunes briefly after compressing, and the importance estimators need the
same inputs on every run to reuse their cache.

Problems with the folder (missing, no ``train/`` or ``val/``, no images, classes that
differ between the splits) raise :class:`DataError` saying what was expected; they
are checked before any image is decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
LAYOUT = "DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE, one folder per class (torchvision ImageFolder layout)"


class DataError(ValueError):
    """A data folder fxmerge cannot read; the message says what it expected."""


def image_folder(
    root: str | os.PathLike,
    input_shape: Sequence[int],
    batch_size: int = 32,
    *,
    workers: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_fraction: float = 0.875,
    seed: int = 0,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """``(train_loader, val_loader)`` over ``root/train`` and ``root/val``.

    ``input_shape`` is the model's input, ``(batch, channels, height, width)`` or
    ``(channels, height, width)``; its batch size is ignored (``batch_size`` is the
    loaders'). The train loader shuffles with a generator seeded by ``seed``, so the
    first pass over it is the same on every run; the val loader does not shuffle.
    Both yield ``(images, labels)``; ``loader.dataset.classes`` names the labels.
    """
    from torchvision.datasets import ImageFolder

    channels, height, width = _image_shape(input_shape)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if not 0 < crop_fraction <= 1:
        raise DataError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    check_layout(root)
    transform = image_transform(height, width, channels, mean=mean, std=std, crop_fraction=crop_fraction)
    train_set = ImageFolder(str(Path(root) / "train"), transform=transform)
    val_set = ImageFolder(str(Path(root) / "val"), transform=transform)
    generator = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(
        train_set, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator
    )
    val = torch.utils.data.DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=workers)
    return train, val


def check_layout(root: str | os.PathLike) -> list[str]:
    """The class names of ``root``'s train/ and val/ folders; :class:`DataError` if they are unusable."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist; expected {LAYOUT}")
    if not root.is_dir():
        raise DataError(f"data directory {root} is not a directory; expected {LAYOUT}")
    missing = [f"{split}/" for split in SPLITS if not (root / split).is_dir()]
    if missing:
        found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        seen = f" (it has {', '.join(found[:5])})" if found else ""
        raise DataError(f"data directory {root} has no {' or '.join(missing)} folder{seen}; expected {LAYOUT}")
    classes = {split: _classes(root / split) for split in SPLITS}
    only_train = sorted(set(classes["train"]) - set(classes["val"]))
    only_val = sorted(set(classes["val"]) - set(classes["train"]))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {_names(only_train)}")
        if only_val:
            parts.append(f"only in val/: {_names(only_val)}")
        raise DataError(
            f"the class folders of {root}/train and {root}/val differ ({'; '.join(parts)}); "
            "both splits need the same classes so that labels mean the same thing"
        )
    return classes["train"]


def image_transform(
    height: int,
    width: int,
    channels: int = 3,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_fraction: float = 0.875,
):
    """PIL image → normalised ``channels × height × width`` tensor (resize, centre crop)."""
    from torchvision import transforms

    if channels not in (1, 3):
        raise DataError(f"images can be read as 1 or 3 channels; the model takes {channels}")
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
    if std is None:
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean and std need {channels} value(s) each, got {len(mean)} and {len(std)}")
    steps = [transforms.Resize(round(max(height, width) / crop_fraction)), transforms.CenterCrop((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps += [transforms.ToTensor(), transforms.Normalize(tuple(mean), tuple(std))]
    return transforms.Compose(steps)


class OnDevice:
    """Batches of ``loader`` moved to ``device`` (``len()`` works when the loader's does)."""

    def __init__(self, loader, device: str | torch.device):
        self.loader = loader
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, (tuple, list)):
                yield type(batch)(_move(value, self.device) for value in batch)
            else:
                yield _move(batch, self.device)


# --------------------------------------------------------------------------- helpers
def _move(value, device: torch.device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) not in (3, 4) or any(v < 1 for v in shape):
        raise DataError(f"image data needs a model input shaped (batch, channels, height, width), got {shape}")
    return shape[-3], shape[-2], shape[-1]


def _classes(split: Path) -> list[str]:
    """Class folders of one split, each checked to hold at least one image."""
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = any(_is_image(p.name) for p in split.iterdir())
        hint = " (images must sit in one folder per class, not directly in the split)" if loose else ""
        raise DataError(f"{split} has no class folders{hint}; expected {LAYOUT}")
    empty = [name for name in classes if not _has_image(split / name)]
    if len(empty) == len(classes):
        raise DataError(f"no images in {split} (looked for {', '.join(IMAGE_EXTENSIONS)}); expected {LAYOUT}")
    if empty:
        raise DataError(
            f"no images in {len(empty)} class folder(s) of {split}: {_names(empty)} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}); remove them or add images"
        )
    return classes


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _has_image(folder: Path) -> bool:
    return any(any(_is_image(f) for f in files) for _, _, files in os.walk(folder, followlinks=True))


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
