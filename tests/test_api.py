"""compress end to end on a model trained here on real digits, and its bad-input paths."""

import io

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.demo import DigitsNet, digits
from fxmerge.train import accuracy, finetune


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class FlopsBackend:
    """A deterministic stand-in for a timer: 1 ms per GFLOP of convolution, plus 0.01 ms.

    Real backends are tested in test_latency.py; here the pipeline's mechanics are under
    test, and a noisy shared machine must not decide whether a budget is feasible.
    """

    name, version, device, device_name, threads, dtype = "flops", "1", "cpu", "test", 1, torch.float32

    def measure(self, module, example_input):
        from fxmerge.latency import Measurement

        flops = []

        def count(conv, inputs, output):
            per_output = conv.weight.shape[1] * conv.weight[0, 0].numel()
            flops.append(2 * output.numel() * per_output)

        hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        with torch.no_grad():
            module(*(example_input if isinstance(example_input, tuple) else (example_input,)))
        for hook in hooks:
            hook.remove()
        return Measurement(sum(flops) / 1e6 + 0.01, 0.0, 1, 0, 1, 1)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train, val = digits(batch_size=64)
    model = DigitsNet(width=8)
    finetune(model, train, epochs=5, lr=0.05, progress=False)
    return model.eval(), train, val


@pytest.fixture(scope="module")
def compressed(trained, tmp_path_factory):
    model, _, val = trained
    cache = tmp_path_factory.mktemp("cache")
    result = fxmerge.compress(
        model,
        torch.randn(1, 1, 32, 32),
        "70%",
        backend=FlopsBackend(),
        data=val[:1],
        cache_dir=cache,
        progress=False,
        max_kernel=5,
    )
    return result


def test_compress_meets_its_prediction_and_merges_exactly(trained, compressed, tmp_path):
    model, train, val = trained
    result = compressed
    report = result.report
    assert report.predicted_ms <= report.target_ms + 1e-9
    assert report.convs_after < report.convs_before
    assert accuracy(model, val) > 0.8
    finetune(result.model, train[:4], epochs=1, lr=0.01, teacher=model, progress=False)
    merged = result.merge()
    x = val[0][0]
    with torch.no_grad():
        reference = result.model.eval()(x)
        assert rel(merged(x), reference) <= 1e-4
    path = tmp_path / "merged.pt2"
    torch.export.save(torch.export.export(merged, (x[:1],)), path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        assert rel(loaded(x[:1]), reference[:1]) <= 1e-4
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(merged, (x[:1],), buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})
    assert rel(torch.from_numpy(out), reference[:1]) <= 1e-4
    markdown = report.to_markdown()
    assert "predicted" in markdown and report.to_dict()["target_ms"] == report.target_ms


def test_unreachable_target_names_the_smallest_latency(trained, tmp_path):
    from fxmerge.solver import InfeasibleBudget

    model, _, val = trained
    with pytest.raises(InfeasibleBudget, match=r"smallest|minimum"):
        fxmerge.compress(
            model,
            torch.randn(1, 1, 32, 32),
            1e-6,
            backend=FlopsBackend(),
            importance=lambda m: 0.0,
            cache_dir=tmp_path,
            progress=False,
            max_kernel=5,
        )


def test_untraceable_model_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return self.conv(-x)

    with pytest.raises(fxmerge.CaptureError, match="cannot trace"):
        fxmerge.compress(Branchy(), torch.randn(1, 1, 8, 8), "60%", backend="eager", progress=False)


def test_wrong_input_shape_is_a_clear_error(trained):
    model, _, _ = trained
    with pytest.raises(fxmerge.CaptureError, match="example input"):
        fxmerge.analyze(model, torch.randn(1, 3, 32, 32))


def test_nothing_to_merge_gives_a_report(tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    result = fxmerge.compress(
        mlp, torch.randn(1, 1, 4, 4), "100%", backend=FlopsBackend(), cache_dir=tmp_path, progress=False
    )
    assert result.report.convs_before == 0
    assert any("nothing to merge" in note for note in result.report.notes)
    with torch.no_grad():
        x = torch.randn(2, 1, 4, 4)
        assert torch.allclose(result.merge()(x), mlp(x))


def test_target_parsing():
    from fxmerge.api import parse_target
    from fxmerge.loop import Target

    assert parse_target("60%") == Target(ratio=pytest.approx(0.6))
    assert parse_target("2.5ms") == Target(ms=2.5)
    assert parse_target(3) == Target(ms=3.0)
    with pytest.raises(ValueError, match="cannot read"):
        parse_target("fast")


class BiasedBackend(FlopsBackend):
    """Whole models run ``bias`` × as fast as the sum of their convs timed alone says.

    The latency table only ever times convs alone; calibration absorbs the bias of
    the original into one offset, so a solved plan is mispredicted by a known amount,
    which only measuring the merged model end to end can reveal.
    """

    name = "biased"

    def __init__(self, bias: float, fixed_ms: float = 0.0):
        self.bias, self.fixed_ms = bias, fixed_ms

    def measure(self, module, example_input):
        from fxmerge.latency import Measurement

        alone = super().measure(module, example_input).median_ms
        whole = isinstance(module, torch.fx.GraphModule)
        ms = self.bias * alone + self.fixed_ms if whole else alone
        return Measurement(ms, 0.0, 1, 0, 1, 1)


class Ladder(nn.Module):
    """Alternating 3×3 and 1×1 conv-BN-ReLU layers: plans whose latencies differ by fine steps."""

    def __init__(self, blocks: int = 8, width: int = 12):
        super().__init__()
        layers = [nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(blocks):
            for kernel in (3, 1):
                layers += [nn.Conv2d(width, width, kernel, padding=kernel // 2), nn.BatchNorm2d(width), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean((2, 3))


def compute_kept(example_input):
    """An importance that rewards the compute a plan keeps, so the solver spends the budget it is given.

    (With random weights every estimator is nearly flat, and which of two plans of equal
    importance the solver returns would depend on the last bits of floating point.)
    """

    def score(model: nn.Module) -> float:
        return FlopsBackend().measure(model, example_input).median_ms

    return score


@pytest.mark.parametrize("bias", [0.5, 1.6])
def test_closed_loop_meets_the_target_as_measured(tmp_path, bias):
    torch.manual_seed(0)
    model = Ladder().eval()
    x = torch.randn(1, 1, 16, 16)
    kwargs = dict(
        backend=BiasedBackend(bias), importance=compute_kept(x), cache_dir=tmp_path, progress=False, max_kernel=5
    )
    trusting = fxmerge.compress(model, x, "70%", closed_loop=False, **kwargs)
    result = fxmerge.compress(model, x, "70%", **kwargs)
    report = result.report
    assert report.target_met, report.to_markdown()
    assert abs(report.measured_ratio / 0.7 - 1) <= 0.03
    # the first solve is the trusting one; fitted on it, the corrected table lands the second
    assert len(report.rounds) == 2 and not report.rounds[0].met and report.rounds[1].met
    assert any("closed loop: met" in note for note in report.notes)
    assert any("latency table corrected from end-to-end measurements" in note for note in report.notes)
    # the plan the table alone picks misses the target by the bias the table cannot see
    backend = BiasedBackend(bias)
    original = backend.measure(fxmerge.merge(torch.fx.symbolic_trace(model.eval())), x).median_ms
    missed = backend.measure(trusting.merge(), x).median_ms / original
    assert abs(missed / 0.7 - 1) > 0.03


class SlowFirstOriginal(BiasedBackend):
    """The first whole-model measurement (the calibration of the original) reads ``slow`` × too long,
    as one measurement on a busy machine can; every later one is right."""

    def __init__(self, bias: float, slow: float):
        super().__init__(bias)
        self.slow, self.whole_models = slow, 0

    def measure(self, module, example_input):
        from fxmerge.latency import Measurement

        measured = super().measure(module, example_input)
        if not isinstance(module, torch.fx.GraphModule):
            return measured
        self.whole_models += 1
        return Measurement(measured.median_ms * (self.slow if self.whole_models == 1 else 1.0), 0.0, 1, 0, 1, 1)


def test_closed_loop_recovers_from_a_misleading_calibration(tmp_path):
    torch.manual_seed(0)
    model = Ladder().eval()
    x = torch.randn(1, 1, 16, 16)
    backend = SlowFirstOriginal(bias=1.0, slow=1.25)
    result = fxmerge.compress(
        model, x, "70%", backend=backend, importance=compute_kept(x), cache_dir=tmp_path, progress=False, max_kernel=5
    )
    report = result.report
    # calibrated on an original 25% too slow, the table's offset makes every plan look
    # 1.5 ms slower than it is: the first plan measures 55%
    assert report.rounds[0].ratio < 0.6
    # re-anchored on the original as timed beside the plans, the next solve lands
    assert report.target_met and len(report.rounds) == 2, report.to_markdown()


def test_closed_loop_reports_plainly_when_it_cannot_meet_the_target(trained, tmp_path):
    from fxmerge.api import TargetUnreachable

    model, _, val = trained
    x = torch.randn(1, 1, 32, 32)
    backend = BiasedBackend(1.0, fixed_ms=6.0)  # a fixed cost no merge removes
    with pytest.raises(
        TargetUnreachable,
        match=r"target 20% cannot be met on biased .*the smallest achievable is "
        r"[\d.]+% of the original, measured on the fastest plan .*ask for \d+% or more",
    ) as info:
        fxmerge.compress(model, x, "20%", backend=backend, data=val[:1], cache_dir=tmp_path, progress=False)
    assert info.value.unit == "fraction" and info.value.smallest > 0.2


def test_compress_traces_the_model_once(trained, tmp_path, monkeypatch):
    """Capture runs once per compress; the stages after it work on the captured graph."""
    calls = []
    original = torch.fx.Tracer.trace

    def counting(self, root, *args, **kwargs):
        calls.append(type(root).__name__)
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    model, _, val = trained
    fxmerge.compress(
        model,
        torch.randn(1, 1, 32, 32),
        "70%",
        backend="eager",
        importance="distortion",
        cache_dir=tmp_path,
        progress=False,
        max_kernel=5,
    )
    assert calls == ["DigitsNet"], calls


def test_compress_without_a_cache_writes_no_table(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("FXMERGE_CACHE_DIR", str(tmp_path / "default"))
    model, _, _ = trained
    x = torch.randn(1, 1, 32, 32)
    result = fxmerge.compress(
        model, x, "80%", backend=FlopsBackend(), importance="distortion", cache_dir=False, progress=False
    )
    assert result.report.convs_after < result.report.convs_before
    assert not (tmp_path / "default").exists()


def test_target_at_or_above_the_original_changes_nothing(trained, tmp_path):
    model, _, _ = trained
    x = torch.randn(2, 1, 32, 32)
    result = fxmerge.compress(model, x[:1], "100%", backend=FlopsBackend(), cache_dir=tmp_path, progress=False)
    assert result.report.unchanged and result.report.convs_after == result.report.convs_before
    assert any("nothing to compress" in note for note in result.report.notes)
    with torch.no_grad():
        assert rel(result.merge()(x), model(x)) <= 1e-5
