"""A small DDPM on scikit-learn's digits: the generative benchmark of issue #15 (scaffolding).

The model is the DDPM U-Net of ``tests/ddpm_model.py`` scaled down (``ch=32``,
``ch_mult=(1, 2, 2)``, one ResNet block per level, attention at 8×8, 1×16×16 inputs),
trained with the standard ε-prediction objective (Ho et al. 2020: linear β schedule
1e-4 … 0.02 over T = 1000 steps) on the 1797 handwritten digits of
``sklearn.datasets.load_digits``, upsampled from 8×8 to 16×16 and scaled to [-1, 1].

What this file has today:

* four disjoint splits of the digits: ``train`` (the model), ``holdout_train`` and
  ``holdout_val`` (for fxmerge's importance estimates: a short fine-tune on one, the
  loss on the other), ``test`` (the numbers reported);
* training, cached under ``.fxmerge-cache/ddpm_mini/`` (an EMA ``state_dict`` saved
  atomically and loaded with ``weights_only=True``, keyed by every setting);
* :func:`denoise_loss`: the denoising loss of one batch with fresh noise and
  antithetic timesteps (``t`` paired with ``T-1-t``), the holdout metric;
* :func:`sample`: DDPM ancestral sampling from a fixed seed;
* :func:`save_grid`: a PNG of samples, one row per model, the same seed on every row.

What it will have (issue #15): :func:`compress_and_finetune`, which compresses the
model with ``fxmerge.compress`` (``layermerge`` and ``depth`` at two latency targets),
fine-tunes each result with the same budget and measures its speed-up; each then gets
a row in the sample grid.

    python benchmarks/ddpm_mini.py            # ~10 min of training on one core, then cached
    python benchmarks/ddpm_mini.py --quick    # smoke test: 300 steps, 6 samples, temporary output
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from torch import nn

if str(common.REPO) not in sys.path:  # the model lives in tests/, importable from the repository root
    sys.path.insert(0, str(common.REPO))
from tests.ddpm_model import DDPMUNet

CACHE = common.REPO / ".fxmerge-cache" / "ddpm_mini"
CACHE_VERSION = 1  # bump when training changes in a way the settings below do not capture
IMAGE_SHAPE = (1, 16, 16)
MODEL_CONFIG = {
    "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (8,), "dropout": 0.1,
    "resamp_with_conv": True, "in_channels": 1, "resolution": 16,
}
SPLIT_SIZES = {"test": 180, "holdout_val": 180, "holdout_train": 180}  # the rest (1257) is train


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0
    timesteps: int = 1000


QUICK_TRAIN = TrainConfig(steps=300)
FULL_TRAIN = TrainConfig(steps=2500)


# --------------------------------------------------------------------------- diffusion
@dataclass(frozen=True)
class Schedule:
    """DDPM's noise schedule: ``betas`` (T,) in float64 and what the loss and sampler derive from it."""

    betas: torch.Tensor

    @property
    def timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_bar(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)


def linear_schedule(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Linear β from ``beta_start`` to ``beta_end``; scaled by 1000/T for T ≠ 1000 so that ᾱ_T stays near 0."""
    scale = 1000.0 / timesteps
    return Schedule(torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64))


DEFAULT_SCHEDULE = linear_schedule()


def antithetic_timesteps(n: int, timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` timesteps: ⌈n/2⌉ uniform draws ``t`` followed by their mirrors ``T-1-t`` (lower-variance loss)."""
    half = torch.randint(0, timesteps, ((n + 1) // 2,), generator=generator)
    return torch.cat([half, timesteps - 1 - half])[:n]


def denoise_loss(model: nn.Module, batch: torch.Tensor, generator: torch.Generator,
                 schedule: Schedule | None = None) -> torch.Tensor:
    """ε-prediction MSE of ``model`` on clean images ``batch`` (N, C, H, W) in [-1, 1].

    Fresh noise and antithetic timesteps come from ``generator`` (CPU), so the same
    generator seed gives the same noise and timesteps to every model compared.
    Differentiable: the training loss, and the holdout metric under ``torch.no_grad``.
    """
    schedule = schedule or DEFAULT_SCHEDULE
    t = antithetic_timesteps(batch.shape[0], schedule.timesteps, generator)
    noise = torch.randn(batch.shape, generator=generator).to(batch)
    alpha_bar = schedule.alphas_bar[t].to(batch).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * batch + (1.0 - alpha_bar).sqrt() * noise
    return F.mse_loss(model(noisy, t.to(batch.device)), noise)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, *, seed: int = 1234, repeats: int = 4,
             batch_size: int = 90, schedule: Schedule | None = None) -> float:
    """Mean :func:`denoise_loss` over ``images``, ``repeats`` passes, from a fixed seed (comparable across models)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            total += float(denoise_loss(model, batch, generator, schedule)) * batch.shape[0]
            count += batch.shape[0]
    return total / count


@torch.no_grad()
def sample(model: nn.Module, n: int, seed: int, schedule: Schedule | None = None,
           shape: tuple[int, ...] = IMAGE_SHAPE) -> torch.Tensor:
    """DDPM ancestral sampling (T model calls) from seed ``seed``: ``n`` images in [-1, 1].

    Each step predicts x₀ from ε, clips it to [-1, 1] and draws x_{t-1} from the
    posterior q(x_{t-1} | x_t, x₀) with its variance β̃_t, as the reference sampler does.
    """
    schedule = schedule or DEFAULT_SCHEDULE
    betas, alphas_bar = schedule.betas, schedule.alphas_bar
    alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((n,), step, dtype=torch.long)
        eps = model(x.float(), t).double()
        ab, ab_prev, beta = alphas_bar[step], alphas_bar_prev[step], betas[step]
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1.0, 1.0)
        mean = (beta * ab_prev.sqrt() * x0 + (1 - ab_prev) * (1 - beta).sqrt() * x) / (1 - ab)
        if step == 0:
            x = mean
        else:
            variance = beta * (1 - ab_prev) / (1 - ab)
            x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x.float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Splits:
    """Disjoint splits of the digits, each (N, 1, 16, 16) in [-1, 1]; ``indices`` into ``load_digits()``."""

    train: torch.Tensor
    holdout_train: torch.Tensor
    holdout_val: torch.Tensor
    test: torch.Tensor
    indices: dict[str, tuple[int, ...]]

    def sizes(self) -> dict[str, int]:
        return {name: len(index) for name, index in self.indices.items()}


def digits_splits(seed: int = 0) -> Splits:
    """scikit-learn's 1797 digits, 8×8 → 16×16 (bilinear), [0, 16] → [-1, 1], split disjointly under ``seed``."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed)).tolist()
    indices, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        indices[name] = tuple(order[start:start + size])
        start += size
    indices["train"] = tuple(order[start:])
    assert len({i for index in indices.values() for i in index}) == images.shape[0], "splits overlap"
    parts = {name: images[list(index)] for name, index in indices.items()}
    return Splits(indices=indices, **parts)


# --------------------------------------------------------------------------- training and cache
def build_model(seed: int = 0) -> DDPMUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DDPMUNet(**MODEL_CONFIG)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def train(images: torch.Tensor, config: TrainConfig, *, log_every: int = 100) -> tuple[nn.Module, dict]:
    """Train from scratch; returns the EMA of the weights (eval mode) and a summary of the run."""
    model = build_model(config.seed).train()
    ema = build_model(config.seed).eval()
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = linear_schedule(config.timesteps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    order, cursor, losses = torch.randperm(images.shape[0], generator=generator), 0, []
    started = time.perf_counter()
    for step in range(config.steps):
        if cursor + config.batch_size > order.numel():  # a new epoch
            order, cursor = torch.randperm(images.shape[0], generator=generator), 0
        batch = images[order[cursor:cursor + config.batch_size]]
        cursor += config.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = denoise_loss(model, batch, generator, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), model.parameters()):
                averaged.lerp_(current, 1.0 - decay)
        losses.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"  step {step + 1:5d}/{config.steps}  loss {recent:.4f}  "
                  f"{time.perf_counter() - started:6.1f} s", flush=True)
    seconds = time.perf_counter() - started
    tail = losses[-min(100, len(losses)):]
    return ema, {"train_seconds": seconds, "steps": config.steps, "final_train_loss": sum(tail) / len(tail),
                 "threads": torch.get_num_threads()}


def cache_key(config: TrainConfig, data_seed: int) -> str:
    payload = {"version": CACHE_VERSION, "model": MODEL_CONFIG, "train": asdict(config), "data_seed": data_seed,
               "splits": SPLIT_SIZES, "image_shape": IMAGE_SHAPE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` into a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trained_model(splits: Splits, config: TrainConfig, *, cache_dir: Path = CACHE, data_seed: int = 0,
                  retrain: bool = False) -> tuple[nn.Module, dict]:
    """The cached model for these settings, trained (and cached) first when there is none."""
    key = cache_key(config, data_seed)
    weights, meta = cache_dir / f"model-{key}.pt", cache_dir / f"model-{key}.json"
    if weights.exists() and meta.exists() and not retrain:
        model = build_model(config.seed).eval()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model, {**json.loads(meta.read_text()), "cached": True, "path": str(weights)}
    print(f"training the DDPM ({config.steps} steps, batch {config.batch_size}, "
          f"{torch.get_num_threads()} thread(s)); cache: {weights}", flush=True)
    model, info = train(splits.train, config)
    save_atomically(model.state_dict(), weights)
    common.write_json(meta, {**info, "key": key, "train_config": asdict(config), "model_config": MODEL_CONFIG})
    return model, {**info, "cached": False, "path": str(weights)}


# --------------------------------------------------------------------------- output
def save_grid(rows: dict[str, torch.Tensor], path: Path, *, title: str | None = None) -> Path:
    """A PNG: one row of images (N, 1, H, W) in [-1, 1] per model, labelled with its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(images.shape[0] for images in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.9 * columns + 1.6, 0.95 * len(rows) + 0.4),
                             squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < images.shape[0]:
                ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
        axes[r, 0].text(-0.15, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=1.4 / (0.9 * columns + 1.6), right=0.99, wspace=0.05, hspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- compression (to come)
def compress_and_finetune(model: nn.Module, splits: Splits, target: str, *, method: str = "layermerge",
                          finetune_steps: int = 500, backend: str = "onnxruntime") -> dict:
    """TODO(#15): compress ``model`` to ``target`` with fxmerge, fine-tune it, and measure it.

    It will:

    1. call ``fxmerge.compress(model, (x, t), target, method=method, backend=backend,
       importance=..., data=...)`` with ``x`` a (1, 1, 16, 16) image and ``t`` a (1,)
       timestep, ``target`` a fraction of the original latency such as ``"70%"``, and
       ``method`` ``"layermerge"`` or ``"depth"``; importance from the relative change of
       :func:`denoise_loss` (short fine-tune on ``splits.holdout_train``, loss on
       ``splits.holdout_val``), which needs the loss-function hook of issue #15;
    2. fine-tune the linearized model for ``finetune_steps`` steps of :func:`denoise_loss`
       on ``splits.train`` (the same budget for every method and target);
    3. merge it exactly (``result.merge()``) and check it against the linearized model;
    4. time the merged model and the original side by side on ``backend`` (one thread)
       and return the measured speed-up, the predicted and measured latencies, the test
       denoising loss before and after, and the merged model (for :func:`sample`).
    """
    raise NotImplementedError("compress_and_finetune needs fxmerge's #15 matching rules and loss hook")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 300 training steps, 6 samples, output in a temporary directory")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2500; 300 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="samples per grid row (default 12; 6 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"model cache (default {CACHE})")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the JSON and the PNG go (default benchmarks/results; a temporary one with --quick)")
    args = parser.parse_args(argv)
    base = QUICK_TRAIN if args.quick else FULL_TRAIN
    args.train = TrainConfig(**{**asdict(base), "steps": args.steps or base.steps})
    args.samples = args.samples or (6 if args.quick else 12)
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="ddpm_mini-")) if args.quick else common.RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = digits_splits()
    model, info = trained_model(splits, args.train, cache_dir=args.cache_dir, retrain=args.retrain)
    with common.Stopwatch() as clock:
        losses = {name: evaluate(model, getattr(splits, name)) for name in ("holdout_val", "test")}
    print(f"denoising loss: holdout_val {losses['holdout_val']:.4f}, test {losses['test']:.4f} "
          f"({clock.seconds:.1f} s)")
    with common.Stopwatch() as clock:
        rows = {"original": sample(model, args.samples, args.seed)}
    print(f"sampled {args.samples} images in {clock.seconds:.1f} s ({DEFAULT_SCHEDULE.timesteps} steps)")
    name = "ddpm_mini_quick" if args.quick else "ddpm_mini"
    grid = save_grid(rows, args.out_dir / f"{name}_samples.png",
                     title=f"DDPM on digits, {args.train.steps} steps, sampling seed {args.seed}")
    result = {
        "command": common.command_line(), "quick": args.quick, "threads": args.threads,
        "model_config": MODEL_CONFIG, "train_config": asdict(args.train), "training": info,
        "splits": splits.sizes(), "denoise_loss": {"original": losses}, "sample_seconds": clock.seconds,
        "grid": str(grid), "wall_seconds": time.perf_counter() - started,
    }
    out = common.write_json(args.out_dir / f"{name}.json", result)
    print(f"training: {info['train_seconds']:.0f} s{' (cached)' if info['cached'] else ''}; "
          f"grid: {grid}; json: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
