"""A small DDPM on scikit-learn's digits: the generative benchmark of issue #15.

The model is the DDPM U-Net of ``tests/ddpm_model.py`` scaled down (``ch=32``,
``ch_mult=(1, 2, 2)``, one ResNet block per level, attention at 8×8, 1×16×16 inputs),
trained with the standard ε-prediction objective (Ho et al. 2020: linear β schedule
1e-4 … 0.02 over T = 1000 steps) on the 1797 handwritten digits of
``sklearn.datasets.load_digits``, upsampled from 8×8 to 16×16 and scaled to [-1, 1].

* four disjoint splits of the digits: ``train`` (the model, and every fine-tune),
  ``holdout_train`` and ``holdout_val`` (fxmerge's ``paper`` importance: one epoch on
  one, the relative change of the denoising loss on the other), ``test`` (reported);
* training, cached under ``.fxmerge-cache/ddpm_mini/`` (an EMA ``state_dict`` saved
  atomically and loaded with ``weights_only=True``, keyed by every setting);
* :func:`compress_and_finetune`: ``fxmerge.compress(model, (x, t), target,
  method=..., rules="paper", importance="paper", loss_fn=...)`` on onnxruntime, one
  thread, closed loop; the same fine-tuning budget for every result; an exact merge;
  the speed-up measured as an outsider would (ONNX exports, fresh sessions,
  interleaved blocks: ``paper_mini_report.measure_speedup``);
* :func:`sample`: DDPM ancestral sampling, the same seed for every model, and
  :func:`save_grid`: one row of samples per model in a PNG.

    python benchmarks/ddpm_mini.py            # ~10 min of training on one core (then cached), ~25 min of compression
    python benchmarks/ddpm_mini.py --quick    # smoke test: 300 steps, one target, 6 samples, temporary output
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
    "ch": 32,
    "ch_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "attn_resolutions": (8,),
    "dropout": 0.1,
    "resamp_with_conv": True,
    "in_channels": 1,
    "resolution": 16,
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


def denoise_loss(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator, schedule: Schedule | None = None
) -> torch.Tensor:
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
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    seed: int = 1234,
    repeats: int = 4,
    batch_size: int = 90,
    schedule: Schedule | None = None,
) -> float:
    """Mean :func:`denoise_loss` over ``images``, ``repeats`` passes, from a fixed seed (comparable across models)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            total += float(denoise_loss(model, batch, generator, schedule)) * batch.shape[0]
            count += batch.shape[0]
    return total / count


@torch.no_grad()
def sample(
    model: nn.Module, n: int, seed: int, schedule: Schedule | None = None, shape: tuple[int, ...] = IMAGE_SHAPE
) -> torch.Tensor:
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
        indices[name] = tuple(order[start : start + size])
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
        batch = images[order[cursor : cursor + config.batch_size]]
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
            print(
                f"  step {step + 1:5d}/{config.steps}  loss {recent:.4f}  {time.perf_counter() - started:6.1f} s",
                flush=True,
            )
    seconds = time.perf_counter() - started
    tail = losses[-min(100, len(losses)) :]
    return ema, {
        "train_seconds": seconds,
        "steps": config.steps,
        "final_train_loss": sum(tail) / len(tail),
        "threads": torch.get_num_threads(),
    }


def cache_key(config: TrainConfig, data_seed: int) -> str:
    payload = {
        "version": CACHE_VERSION,
        "model": MODEL_CONFIG,
        "train": asdict(config),
        "data_seed": data_seed,
        "splits": SPLIT_SIZES,
        "image_shape": IMAGE_SHAPE,
    }
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


def trained_model(
    splits: Splits, config: TrainConfig, *, cache_dir: Path = CACHE, data_seed: int = 0, retrain: bool = False
) -> tuple[nn.Module, dict]:
    """The cached model for these settings, trained (and cached) first when there is none."""
    key = cache_key(config, data_seed)
    weights, meta = cache_dir / f"model-{key}.pt", cache_dir / f"model-{key}.json"
    if weights.exists() and meta.exists() and not retrain:
        model = build_model(config.seed).eval()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model, {**json.loads(meta.read_text()), "cached": True, "path": str(weights)}
    print(
        f"training the DDPM ({config.steps} steps, batch {config.batch_size}, "
        f"{torch.get_num_threads()} thread(s)); cache: {weights}",
        flush=True,
    )
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
    fig, axes = plt.subplots(len(rows), columns, figsize=(0.9 * columns + 1.6, 0.95 * len(rows) + 0.4), squeeze=False)
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


# --------------------------------------------------------------------------- compression
METHODS = ("layermerge", "depth")
TARGETS = ("97%", "85%")
QUICK_TARGETS = ("85%",)
FINETUNE_EPOCHS = 8  # over the train split, batch 32: the same budget for every compressed model
FINETUNE_LR = 5e-4
EXAMPLE_T = 500


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """What ``fxmerge.compress`` is given: one image and one timestep."""
    return torch.zeros(1, *IMAGE_SHAPE), torch.tensor([EXAMPLE_T])


def global_rng_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """:func:`denoise_loss` with noise and timesteps drawn from torch's global RNG.

    The form ``fxmerge.compress(loss_fn=...)`` and ``fxmerge.train.finetune(loss_fn=...)``
    take: fxmerge seeds the global RNG per importance entry, and resets it before every
    holdout evaluation, so every entry is measured on the same noise.
    """
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    return denoise_loss(model, batch, generator)


def batches(images: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [images[i : i + size] for i in range(0, images.shape[0], size)]


def compress_and_finetune(
    model: nn.Module,
    splits: Splits,
    target: str,
    *,
    method: str,
    threads: int,
    rounds: int,
    cache_dir: Path,
    epochs: int = FINETUNE_EPOCHS,
) -> dict:
    """Compress ``model`` to ``target`` by ``method``, fine-tune, merge, and measure it as an outsider would.

    Importance is the paper estimator on the relative change of the denoising loss (one
    epoch on ``holdout_train``, loss on ``holdout_val``); the latency is onnxruntime's on
    one thread with the closed loop. The linearized model is fine-tuned for ``epochs``
    epochs of the denoising loss on ``train`` (AdamW, cosine), merged exactly, and timed
    against the original by :func:`paper_mini_report.measure_speedup`.
    """
    import paper_mini_report as report

    import fxmerge
    from fxmerge.solver import InfeasibleBudget
    from fxmerge.train import finetune

    started = time.perf_counter()
    try:
        result = fxmerge.compress(
            model,
            example_inputs(),
            target,
            method=method,
            backend="onnxruntime",
            threads=threads,
            rules="paper",
            importance="paper",
            data=batches(splits.holdout_train, 30),
            eval_data=batches(splits.holdout_val, 30),
            loss_fn=global_rng_loss,
            lr=1e-3,
            cache_dir=cache_dir,
            progress=False,
        )
    except InfeasibleBudget as exc:
        return {"method": method, "target": target, "feasible": False, "why": str(exc).splitlines()[0]}
    compressed_s = time.perf_counter() - started
    linearized = result.model.eval()
    before = evaluate(linearized, splits.test)
    torch.manual_seed(0)
    finetune(
        linearized,
        batches(splits.train, 32),
        epochs=epochs,
        lr=FINETUNE_LR,
        optimizer="adamw",
        weight_decay=0.0,
        loss_fn=global_rng_loss,
        progress=False,
    )
    merged = result.merge().eval()
    x, t = torch.randn(4, *IMAGE_SHAPE), torch.tensor([3, 250, 600, 999])
    with torch.no_grad():
        reference, output = linearized.eval()(x, t), merged(x, t)
    rel_error = float((output - reference).abs().max() / reference.abs().max())
    speed = report.measure_speedup(fold_batchnorm(model), merged, example_inputs(), threads=threads, rounds=rounds)
    return {
        "method": method,
        "target": target,
        "feasible": True,
        "speed": speed,
        "loop": {
            "predicted_ms": result.report.predicted_ms,
            "measured_ratio": result.report.measured_ratio,
            "target_met": result.report.target_met,
        },
        "convs": [result.report.convs_before, result.report.convs_after],
        "activations_removed": result.report.activations_removed,
        "test_loss_before_finetune": before,
        "test_loss": evaluate(merged, splits.test),
        "merged_vs_linearized_rel_error": rel_error,
        "compress_seconds": compressed_s,
        "seconds": time.perf_counter() - started,
        "model": merged,
    }


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """The original as the comparison runs it (this U-Net has GroupNorm only: nothing to fold)."""
    return model.eval()


def results_table(original_loss: float, cells: list[dict]) -> str:
    rows = []
    for cell in cells:
        if not cell["feasible"]:
            rows.append([cell["method"], cell["target"], "infeasible", "", "", "", "", ""])
            continue
        speed = cell["speed"]
        rows.append(
            [
                cell["method"],
                cell["target"],
                f"{speed['speedup']:.2f}× [{speed['speedup_q1']:.2f}, {speed['speedup_q3']:.2f}]",
                f"{cell['loop']['measured_ratio']:.1%}",
                f"{cell['convs'][0]} → {cell['convs'][1]}",
                f"{cell['test_loss_before_finetune']:.4f}",
                f"{cell['test_loss']:.4f}",
                f"{cell['merged_vs_linearized_rel_error']:.1e}",
            ]
        )
    header = [
        "method",
        "target",
        "measured speed-up (IQR)",
        "loop: merged/original",
        "convs",
        "test loss before FT",
        f"test loss after FT (original {original_loss:.4f})",
        "merge rel. error",
    ]
    return common.markdown_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 300 training steps, 6 samples, output in a temporary directory",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 2500; 300 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="samples per grid row (default 12; 6 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 10; 3 with --quick)"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help=f"fine-tuning epochs per compressed model (default {FINETUNE_EPOCHS}; 1 with --quick)",
    )
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"model cache (default {CACHE})")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where the JSON and the PNG go (default benchmarks/results; a temporary one with --quick)",
    )
    args = parser.parse_args(argv)
    base = QUICK_TRAIN if args.quick else FULL_TRAIN
    args.train = TrainConfig(**{**asdict(base), "steps": args.steps or base.steps})
    args.samples = args.samples or (6 if args.quick else 12)
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else FINETUNE_EPOCHS)
    args.targets = QUICK_TARGETS if args.quick else TARGETS
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="ddpm_mini-")) if args.quick else common.RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    splits = digits_splits()
    model, info = trained_model(splits, args.train, cache_dir=args.cache_dir, retrain=args.retrain)
    original_losses = {name: evaluate(model, getattr(splits, name)) for name in ("holdout_val", "test")}
    print(
        f"denoising loss of the original: holdout_val {original_losses['holdout_val']:.4f}, "
        f"test {original_losses['test']:.4f}",
        flush=True,
    )
    rows = {"original": sample(model, args.samples, args.seed)}
    cells = []
    for target in args.targets:
        for method in METHODS:
            print(f"compressing: {method} at {target} ...", flush=True)
            cell = compress_and_finetune(
                model,
                splits,
                target,
                method=method,
                threads=args.threads,
                rounds=args.rounds,
                cache_dir=args.cache_dir / "fxmerge",
                epochs=args.finetune_epochs,
            )
            if cell["feasible"]:
                rows[f"{method} {target}"] = sample(cell.pop("model"), args.samples, args.seed)
                print(
                    f"  {cell['speed']['speedup']:.2f}× measured, test loss {cell['test_loss_before_finetune']:.4f}"
                    f" → {cell['test_loss']:.4f} after fine-tuning ({cell['seconds']:.0f} s)",
                    flush=True,
                )
            else:
                print(f"  infeasible: {cell['why']}", flush=True)
            cells.append(cell)
    name = "ddpm_mini_quick" if args.quick else "ddpm_mini"
    grid = save_grid(
        rows,
        args.out_dir / f"{name}_samples.png",
        title=f"DDPM on digits: samples from seed {args.seed}, one row per model",
    )
    table = results_table(original_losses["test"], cells)
    result = {
        "command": common.command_line(),
        "quick": args.quick,
        "threads": args.threads,
        "model_config": MODEL_CONFIG,
        "train_config": asdict(args.train),
        "training": info,
        "splits": splits.sizes(),
        "denoise_loss": {"original": original_losses},
        "finetune": {"epochs": args.finetune_epochs, "lr": FINETUNE_LR, "optimizer": "adamw", "batch_size": 32},
        "cells": cells,
        "grid": str(grid),
        "table": table,
        "wall_seconds": time.perf_counter() - started,
    }
    out = common.write_json(args.out_dir / f"{name}.json", result)
    print(f"\n{table}\n\ngrid: {grid}\njson: {out}\nwall: {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
