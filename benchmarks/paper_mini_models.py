"""The networks of ``paper_mini.py``, their training, and the cache of trained weights.

* :class:`MiniResNet` — CIFAR-style ResNet with basic blocks in three stages
  (widths 16/32/64, two blocks per stage, a 1×1 projection shortcut where the shape
  changes): 15 convs, 13 ReLUs.
* :class:`MiniMobileNetV2` — MobileNetV2-style inverted residuals (1×1 expand → 3×3
  depthwise → 1×1 linear projection, ReLU6, identity skip where the shape allows),
  a 3×3 stem and a final 1×1 conv: 22 convs.

Both take ``1×3×32×32`` inputs. Training (:func:`train`) is SGD with Nesterov
momentum, a cosine schedule, random flips and 2-pixel shifted crops; the weights
are cached under ``.fxmerge-cache/paper_mini/`` as a ``state_dict`` written
atomically (:func:`fxmerge.cache.write_atomic`), loaded with ``weights_only=True``
and keyed by every setting that changes them (architecture, training settings,
data, seed, threads).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE_VERSION = 1  # bump when training changes in a way the key does not capture


# --------------------------------------------------------------------------- networks
class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class MiniResNet(nn.Module):
    """Basic blocks in three stages; stages 2 and 3 halve the resolution and double the width."""

    def __init__(self, widths=(16, 32, 64), blocks=(2, 2, 2), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, channels = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for k in range(count):
                layers.append(BasicBlock(channels, width, 2 if stage > 0 and k == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.skip = stride == 1 and channels_in == channels_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip else self.conv(x)


MOBILENET_STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))  # (expand, width, blocks, stride)


class MiniMobileNetV2(nn.Module):
    """MobileNetV2's layout, scaled to 32×32: stem, inverted residual stages, a 1×1 conv, the classifier."""

    def __init__(self, stages=MOBILENET_STAGES, stem: int = 16, last: int = 128, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        ]
        channels = stem
        for expand, width, count, stride in stages:
            for k in range(count):
                layers.append(InvertedResidual(channels, width, stride if k == 0 else 1, expand))
                channels = width
        layers.append(nn.Sequential(nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


ARCHITECTURES = {"resnet": MiniResNet, "mobilenetv2": MiniMobileNetV2}
DESCRIPTIONS = {
    "resnet": "ResNet-style, basic blocks, 3 stages (16/32/64 channels, 2 blocks each): 15 convs",
    "mobilenetv2": "MobileNetV2-style, inverted residuals (expand 4; 16/24/32/64 channels): 22 convs",
}


def build(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[name]()


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and 2-pixel shifts (reflect-padded crops): label-preserving for every class."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()  # one shift per batch: cheap
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """``(input, label)`` batches, shuffled by ``generator`` when given."""
    order = torch.randperm(len(labels), generator=generator) if generator is not None else torch.arange(len(labels))
    return [
        (images[order[k : k + batch_size]], labels[order[k : k + batch_size]])
        for k in range(0, len(labels), batch_size)
    ]


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, log=print) -> dict:
    """Train ``model`` in place on normalised ``images``; a summary of the run."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(labels) // config.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        total = correct = seen = 0.0
        for x, y in batches(images, labels, config.batch_size, generator):
            out = model(augment(x, generator))
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        log(
            f"  epoch {epoch + 1}/{config.epochs}: loss {total / seen:.3f}, train accuracy {correct / seen:.1%} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    model.eval()
    return {
        "train_seconds": time.perf_counter() - started,
        "final_train_loss": total / seen,
        "final_train_accuracy": correct / seen,
    }


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(images[k : k + batch_size]).argmax(1) == labels[k : k + batch_size]).sum())
        for k in range(0, len(labels), batch_size)
    )
    model.train(was_training)
    return correct / len(labels)


# --------------------------------------------------------------------------- cache
def cache_key(name: str, config: TrainConfig, data_key: str) -> str:
    payload = {
        "version": CACHE_VERSION,
        "model": name,
        "description": DESCRIPTIONS[name],
        "train": asdict(config),
        "data": data_key,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def trained(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    data_key: str,
    cache_dir: Path,
    log=print,
) -> tuple[nn.Module, dict]:
    """The cached model for these settings, trained (and cached) first when there is none."""
    from fxmerge.cache import write_atomic

    key = cache_key(name, config, data_key)
    weights, meta = cache_dir / f"{name}-{key}.pt", cache_dir / f"{name}-{key}.json"
    model = build(name, config.seed)
    if weights.exists() and meta.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), {**json.loads(meta.read_text()), "cached": True, "path": str(weights)}
    log(
        f"training {name} ({config.epochs} epochs of {len(labels)} images, {torch.get_num_threads()} thread(s)); "
        f"cache: {weights}"
    )
    info = train(model, images, labels, config, log=log)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_atomic(weights, buffer.getvalue())
    info = {**info, "key": key, "train_config": asdict(config)}
    write_atomic(meta, json.dumps(info, indent=1) + "\n")
    return model, {**info, "cached": False, "path": str(weights)}
