"""The embedded demo (``make demo``): compress a small residual CNN trained on real digits.

1. trains (or reuses a cached copy of) a small residual CNN on scikit-learn's
   handwritten digits, upsampled to 32×32;
2. ``fxmerge.compress`` to a latency target on the CPU (ONNX Runtime);
3. fine-tunes the linearized model briefly, distilling from the original;
4. merges it exactly, exports ``merged.pt2`` and ``merged.onnx``;
5. prints accuracy before and after, original / predicted / measured latency and
   the measured speed-up (BatchNorm folded in both models, so only depth counts).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CACHE = Path(".fxmerge-cache")


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
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

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DigitsNet(nn.Module):
    """A small ResNet for 1×32×32 digits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2), Block(4 * width, 4 * width))
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits(batch_size: int = 64, seed: int = 0):
    """scikit-learn's handwritten digits as 1×32×32 tensors: (train, val) lists of batches."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(labels))

    def batches(x, y):
        return [(x[k:k + batch_size], y[k:k + batch_size]) for k in range(0, len(y), batch_size)]

    return batches(images[:split], labels[:split]), batches(images[split:], labels[split:])


def trained_model(train, epochs: int = 4, progress: bool = True) -> nn.Module:
    from fxmerge.train import finetune

    path = CACHE / "demo" / "digitsnet.pt"
    model = DigitsNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    finetune(model, train, epochs=epochs, lr=0.05, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def side_by_side(first: nn.Module, second: nn.Module, example, backend, rounds: int = 5):
    """Median latency of two models measured in alternating rounds (fair on a noisy machine)."""
    import statistics

    from fxmerge.latency import measure_model

    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for model, bucket in ((first, times[0]), (second, times[1])):
            bucket.append(measure_model(model, example, backend).median_ms)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="60%", help="latency target: '60%%' of the original, or ms")
    parser.add_argument("--out", default="fxmerge-out/demo", help="where the merged model and reports go")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress

    import fxmerge
    from fxmerge.api import export_merged
    from fxmerge.latency import get_backend
    from fxmerge.passes.merge import merge
    from fxmerge.train import accuracy, finetune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, val = digits()
    model = trained_model(train, progress=progress)
    accuracy_before = accuracy(model, val)
    example = torch.randn(1, 1, 32, 32)

    from fxmerge.solver import InfeasibleBudget

    # one thread: on a small shared machine, ORT's spinning worker threads make timings erratic
    backend = get_backend("onnxruntime", threads=1)
    target = args.target

    def run(target):
        return fxmerge.compress(
            model, example, target, backend=backend, data=val[:4], cache_dir=CACHE, progress=progress, max_kernel=9
        )

    try:
        result = run(target)
    except InfeasibleBudget as exc:
        print(f"note: {exc}\nnote: compressing to the smallest achievable latency instead")
        target = exc.suggested_ms
        result = run(target)
    accuracy_linearized = accuracy(result.model, val)
    finetune(result.model, train, epochs=args.finetune_epochs, lr=0.01, teacher=model, progress=progress)
    accuracy_after = accuracy(result.model, val)
    merged = result.merge()
    with torch.no_grad():
        x = val[0][0]
        reference, got = result.model.eval()(x), merged(x)
    exact = float((got - reference).abs().max() / reference.abs().max())

    folded_original = merge(torch.fx.symbolic_trace(model.eval()))
    original, compressed = side_by_side(folded_original, merged, example, backend)

    result.plan.save(out / "plan.json")
    (out / "report.json").write_text(json.dumps(result.report.to_dict(), indent=2) + "\n")
    (out / "report.md").write_text(result.report.to_markdown())
    torch.save(result.model.state_dict(), out / "linearized.pt")
    export_merged(merged, example, out)

    report = result.report
    rows = [
        ("accuracy (val)", f"{accuracy_before:.1%} original", f"{accuracy_linearized:.1%} linearized → {accuracy_after:.1%} fine-tuned"),
        ("convs", f"{report.convs_before}", f"{report.convs_after} ({report.activations_removed} activations removed)"),
        ("latency, onnxruntime", f"{original:.3f} ms measured", f"{report.predicted_ms:.3f} ms predicted, {compressed:.3f} ms measured"),
        ("target", f"{args.target} = {report.target_ms:.3f} ms" if target == args.target else f"{report.target_ms:.3f} ms (smallest)", ""),
        ("speed-up (measured)", "", f"{original / compressed:.2f}× (BatchNorm folded in both)"),
        ("merge exactness", "", f"max|Δ|/max|ref| = {exact:.1e}"),
        ("files", str(out), "plan.json report.json report.md linearized.pt merged.pt2 merged.onnx"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'':{width}}  {'original':28}  compressed")
    for name, before, after in rows:
        print(f"{name:{width}}  {before:28}  {after}")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
