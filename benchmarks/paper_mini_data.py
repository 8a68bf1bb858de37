"""The data of ``paper_mini.py``: *cluttered shapes*, a seeded, generated 32×32 colour 10-class task.

Each image is one large **target shape** (the class) drawn on top of a cluttered
scene, rendered at 64×64 and averaged down to 32×32 (anti-aliased edges):

* **background**: smooth colour noise (two octaves of bilinearly upsampled random
  colours) plus 3–5 smaller **distractor shapes** of random classes, random colours
  and textures, and 2 random straight strokes;
* **target**: one of ten shapes — disc, square, triangle, five-point star, plus,
  ring, hexagon, crescent, L, square frame — under a random pose (any rotation,
  scale 0.42–0.68 of the half-width, aspect ratio 0.75–1.33, centre anywhere in the
  middle ±0.3), filled with a random two-colour texture (stripes of random
  frequency and angle, checks, or flat);
* **then**: sometimes a small occluding distractor over the target, a random
  global brightness/contrast change and Gaussian pixel noise.

So the class is a global shape property of the largest object, not a colour or a
texture: it has to be told apart from smaller shapes of the other classes and from
the edges of the textures. Every sample ``i`` of the pool is a function of
``(seed, i // CHUNK)`` only, and the splits are disjoint index ranges of one pool,
so the data is the same on every machine and run, whatever is generated first.

Labels are balanced: sample ``i`` of a chunk has class ``i % 10`` before shuffling
within the chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CLASSES = ("disc", "square", "triangle", "star", "plus", "ring", "hexagon", "crescent", "L", "frame")
SIZE = 32
SUPERSAMPLE = 2
CHUNK = 500  # samples drawn from one generator; a multiple of the class count
MEAN, STD = 0.5, 0.25  # inputs are (image - MEAN) / STD


@dataclass(frozen=True)
class Difficulty:
    """How hard the scenes are; the defaults are the benchmark's."""

    distractors: tuple[int, int] = (1, 3)  # inclusive range per image
    distractor_scale: tuple[float, float] = (0.1, 0.22)
    target_scale: tuple[float, float] = (0.5, 0.75)
    occlude: float = 0.2  # probability of a distractor drawn over the target
    strokes: int = 1
    noise: float = 0.05  # Gaussian pixel noise (image in [0, 1])
    low_contrast: float = 0.15  # probability that the target's colours are close to the background's
    target_frequency: tuple[float, float] = (3.0, 9.0)  # the target's texture, cycles per half-width
    target_texture_contrast: float = 0.4  # how far the target's second colour may be from its first


# --------------------------------------------------------------------------- shapes
def _polygon(u: torch.Tensor, v: torch.Tensor, sides: int, inradius: float, phase: float) -> torch.Tensor:
    """Signed support of a regular polygon: ≤ 0 inside."""
    angles = phase + 2 * math.pi * torch.arange(sides, dtype=u.dtype) / sides
    support = u.unsqueeze(-1) * torch.cos(angles) + v.unsqueeze(-1) * torch.sin(angles)
    return support.amax(-1) - inradius


def shape_inside(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of shape ``cls`` in its own coordinates (the shape spans about [-1, 1]²)."""
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    if cls == 0:
        return r <= 0.95
    if cls == 1:
        return box <= 0.78
    if cls == 2:
        return _polygon(u, v, 3, 0.5, math.pi / 2) <= 0
    if cls == 3:
        theta = torch.atan2(v, u)
        return r <= 0.38 + 0.62 * ((1 + torch.cos(5 * theta)) / 2) ** 2.5
    if cls == 4:
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    if cls == 5:
        return (r <= 0.95) & (r >= 0.55)
    if cls == 6:
        return _polygon(u, v, 6, 0.82, 0.0) <= 0
    if cls == 7:
        return (r <= 0.95) & (torch.sqrt((u - 0.45) ** 2 + v * v) >= 0.75)
    if cls == 8:
        return (((u >= -0.9) & (u <= -0.3)) & (v.abs() <= 0.9)) | (((v >= -0.9) & (v <= -0.3)) & (u.abs() <= 0.9))
    if cls == 9:
        return (box <= 0.85) & (box >= 0.5)
    raise ValueError(f"no class {cls}")


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def _pose(g: torch.Generator, n: int, scale: tuple[float, float], centre: float) -> dict[str, torch.Tensor]:
    return {
        "angle": _uniform(g, n, 0.0, 2 * math.pi),
        "scale": _uniform(g, n, *scale),
        "aspect": torch.exp(_uniform(g, n, math.log(0.75), math.log(1.33))),
        "cx": _uniform(g, n, -centre, centre),
        "cy": _uniform(g, n, -centre, centre),
    }


def _local(grid: tuple[torch.Tensor, torch.Tensor], pose: dict[str, torch.Tensor]):
    """Image coordinates → each sample's shape coordinates (inverse pose), (n, H, W) each."""
    x, y = grid
    dx = x - pose["cx"].view(-1, 1, 1)
    dy = y - pose["cy"].view(-1, 1, 1)
    c, s = torch.cos(pose["angle"]).view(-1, 1, 1), torch.sin(pose["angle"]).view(-1, 1, 1)
    sx = (pose["scale"] * torch.sqrt(pose["aspect"])).view(-1, 1, 1)
    sy = (pose["scale"] / torch.sqrt(pose["aspect"])).view(-1, 1, 1)
    return (c * dx + s * dy) / sx, (-s * dx + c * dy) / sy


def _masks(classes: torch.Tensor, grid, pose) -> torch.Tensor:
    """(n, H, W) float masks, each sample's shape in its pose."""
    u, v = _local(grid, pose)
    out = torch.zeros_like(u)
    for cls in classes.unique().tolist():
        pick = classes == cls
        out[pick] = shape_inside(int(cls), u[pick], v[pick]).float()
    return out


def _texture(
    g: torch.Generator, n: int, grid, frequency: tuple[float, float] = (4.0, 14.0), contrast: float = 1.0
) -> torch.Tensor:
    """(n, 3, H, W) two-colour fills: stripes, checks or flat; random colours, frequency and angle.

    The second colour is ``contrast`` of the way from the first to another random colour.
    """
    x, y = grid
    first = torch.rand(n, 3, 1, 1, generator=g)
    second = first + contrast * (torch.rand(n, 3, 1, 1, generator=g) - first)
    angle = _uniform(g, n, 0.0, math.pi).view(-1, 1, 1)
    freq = _uniform(g, n, *frequency).view(-1, 1, 1)
    phase = _uniform(g, n, 0.0, 2 * math.pi).view(-1, 1, 1)
    stripes = torch.sin(freq * (x * torch.cos(angle) + y * torch.sin(angle)) + phase) > 0
    checks = (torch.sin(freq * x + phase) * torch.sin(freq * y + phase)) > 0
    kind = torch.randint(0, 3, (n, 1, 1), generator=g)
    pattern = torch.where(kind == 0, stripes, torch.where(kind == 1, checks, torch.zeros_like(checks)))
    return torch.where(pattern.unsqueeze(1), second, first)


def _background(g: torch.Generator, n: int, size: int) -> torch.Tensor:
    coarse = F.interpolate(torch.rand(n, 3, 3, 3, generator=g), size=size, mode="bilinear", align_corners=True)
    fine = F.interpolate(torch.rand(n, 3, 9, 9, generator=g), size=size, mode="bilinear", align_corners=True)
    return 0.7 * coarse + 0.3 * fine


def _strokes(g: torch.Generator, n: int, grid, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin straight lines: (n, H, W) masks and (n, 3, 1, 1) colours, one pair per stroke."""
    x, y = grid
    out = []
    for _ in range(count):
        angle = _uniform(g, n, 0.0, math.pi).view(-1, 1, 1)
        offset = _uniform(g, n, -0.8, 0.8).view(-1, 1, 1)
        width = _uniform(g, n, 0.02, 0.06).view(-1, 1, 1)
        mask = ((x * torch.cos(angle) + y * torch.sin(angle) - offset).abs() <= width).float()
        out.append((mask, torch.rand(n, 3, 1, 1, generator=g)))
    return out


def _paint(canvas: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(1)
    return canvas * (1 - m) + fill * m


def _distractor(g: torch.Generator, n: int, grid, difficulty: Difficulty) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.randint(0, len(CLASSES), (n,), generator=g)
    pose = _pose(g, n, difficulty.distractor_scale, 0.85)
    return _masks(classes, grid, pose), _texture(g, n, grid)


def render_chunk(seed: int, chunk: int, difficulty: Difficulty = Difficulty()) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``chunk*CHUNK … (chunk+1)*CHUNK - 1``: uint8 images (CHUNK, 3, 32, 32) and labels."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(chunk))
    n, big = CHUNK, SIZE * SUPERSAMPLE
    axis = (torch.arange(big, dtype=torch.float32) + 0.5) / big * 2 - 1
    grid = (axis.view(1, 1, -1).expand(1, big, big), axis.view(1, -1, 1).expand(1, big, big))
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    canvas = _background(g, n, big)
    low, high = difficulty.distractors
    count = torch.randint(low, high + 1, (n,), generator=g)
    for k in range(high):
        mask, fill = _distractor(g, n, grid, difficulty)
        canvas = _paint(canvas, mask * (count > k).float().view(-1, 1, 1), fill)
    for mask, colour in _strokes(g, n, grid, difficulty.strokes):
        canvas = _paint(canvas, mask, colour)
    fill = _texture(g, n, grid, difficulty.target_frequency, difficulty.target_texture_contrast)
    close = torch.rand(n, 1, 1, 1, generator=g) < difficulty.low_contrast
    fill = torch.where(close, 0.5 * canvas.mean((2, 3), keepdim=True) + 0.5 * fill, fill)
    canvas = _paint(canvas, _masks(labels, grid, _pose(g, n, difficulty.target_scale, 0.3)), fill)
    mask, cover = _distractor(g, n, grid, difficulty)
    canvas = _paint(canvas, mask * (torch.rand(n, 1, 1, generator=g) < difficulty.occlude).float(), cover)
    image = F.avg_pool2d(canvas, SUPERSAMPLE)
    gain = _uniform(g, n, 0.6, 1.2).view(-1, 1, 1, 1)
    bias = _uniform(g, n, -0.15, 0.15).view(-1, 1, 1, 1)
    image = (image - 0.5) * gain + 0.5 + bias + difficulty.noise * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), labels


def render(
    seed: int, start: int, stop: int, difficulty: Difficulty = Difficulty()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``start … stop-1`` of the pool (``start`` a multiple of :data:`CHUNK`)."""
    if start % CHUNK or stop % CHUNK:
        raise ValueError(f"split bounds must be multiples of {CHUNK}")
    parts = [render_chunk(seed, c, difficulty) for c in range(start // CHUNK, stop // CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → the float network input."""
    return (images.float() / 255 - MEAN) / STD


# --------------------------------------------------------------------------- splits
SPLITS = ("train", "holdout_train", "holdout_val", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Disjoint splits of one generated pool: normalised images (N, 3, 32, 32) and labels per split."""

    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    ranges: dict[str, tuple[int, int]]  # [start, stop) in the pool
    key: str  # identifies the data: part of the cache key of trained models

    def sizes(self) -> dict[str, int]:
        return {name: stop - start for name, (start, stop) in self.ranges.items()}


def split_ranges(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Pool ranges in :data:`SPLITS` order, each starting on a new chunk, so the splits cannot overlap."""
    ranges, start = {}, 0
    for name in SPLITS:
        size = int(sizes[name])
        ranges[name] = (start, start + size)
        start += -(-size // CHUNK) * CHUNK
    return ranges


def data_key(seed: int, sizes: dict[str, int], difficulty: Difficulty) -> str:
    payload = {"version": 1, "seed": seed, "ranges": split_ranges(sizes), "difficulty": asdict(difficulty)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_splits(
    sizes: dict[str, int], *, seed: int = 0, difficulty: Difficulty = Difficulty(), cache_dir: Path | None = None
) -> Splits:
    """The splits, rendered (and cached as uint8 under ``cache_dir``, atomically) or read back."""
    from fxmerge.cache import write_atomic

    ranges, key = split_ranges(sizes), data_key(seed, sizes, difficulty)
    path = None if cache_dir is None else Path(cache_dir) / f"data-{key}.pt"
    if path is not None and path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
    else:
        stored = {}
        for name, (start, stop) in ranges.items():
            chunk_stop = start + -(-(stop - start) // CHUNK) * CHUNK
            images, labels = render(seed, start, chunk_stop, difficulty)
            stored[f"{name}.images"], stored[f"{name}.labels"] = images[: stop - start], labels[: stop - start]
        if path is not None:
            buffer = io.BytesIO()
            torch.save(stored, buffer)
            write_atomic(path, buffer.getvalue())
    images = {name: normalise(stored[f"{name}.images"]) for name in SPLITS}
    labels = {name: stored[f"{name}.labels"].long() for name in SPLITS}
    return Splits(images=images, labels=labels, ranges=ranges, key=key)
