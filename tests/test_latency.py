"""Latency backends, the measurement cache and the latency table.

Fast: convs are tiny, backends run one thread and a handful of runs, and no test
asserts anything about timings beyond their being positive.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.ir import ConvSpec, Option, Span, SpanGraph
from fxmerge.latency import (
    BACKENDS,
    BackendUnavailable,
    LatencyBackend,
    LatencyTable,
    Measurement,
    build_latency_table,
    calibrate,
    conv_module,
    default_cache_dir,
    get_backend,
    measure_model,
    spec_input,
    timing,
)
from fxmerge.latency import table as table_module
from fxmerge.latency.backends import export_onnx
from fxmerge.latency.conv import null_spec
from fxmerge.latency.table import context_corrected, entry_policy, reanchored
from fxmerge.latency.timing import TimingPolicy, time_runs

QUICK = {"threads": 1, "runs": 5, "warmup": 2}


def conv(cin=4, cout=4, k=3, stride=1, act="relu", hw=8, groups=1, bias=True, dims=2) -> ConvSpec:
    return ConvSpec(
        dims=dims,
        in_channels=cin,
        out_channels=cout,
        kernel_size=(k,) * dims,
        stride=(stride,) * dims,
        padding=(k // 2,) * dims,
        dilation=(1,) * dims,
        groups=groups,
        bias=bias,
        activation=act,
        input_shape=(1, cin, *(hw,) * dims),
    )


def span_graph(*spans: list[ConvSpec]) -> SpanGraph:
    """A span graph with one span per argument, each with one option per conv."""
    made = tuple(
        Span(
            id=f"p{i}->p{i + 1}",
            start=f"p{i}",
            end=f"p{i + 1}",
            units=(),
            joins=(),
            dropped_activations=(),
            options=tuple(Option(id=f"o{j}", pruned=(), conv=c) for j, c in enumerate(convs)),
        )
        for i, convs in enumerate(spans)
    )
    return SpanGraph(
        model="synthetic",
        rules="general",
        input_shapes=((1, 4, 8, 8),),
        units=(),
        joins=(),
        positions=(),
        spans=made,
        chains=(),
        rejections=(),
    )


class FakeBackend:
    """A deterministic backend: 'latency' is the module's parameter count / 1000."""

    name = "fake"
    version = "1.0"
    device = "cpu"
    device_name = "test cpu"
    dtype = torch.float32

    def __init__(self, threads: int = 1, fail_after: int | None = None) -> None:
        self.threads = threads
        self.fail_after = fail_after
        self.calls = 0

    def measure(self, module: nn.Module, example_input) -> Measurement:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        with torch.inference_mode():
            module(example_input)
        ms = sum(p.numel() for p in module.parameters()) / 1000
        return Measurement(median_ms=ms, iqr_ms=0.0, runs=1, warmup=0, batch_size=1, threads=self.threads)


class Counting:
    """Wraps a real backend and counts its measurements."""

    def __init__(self, backend: LatencyBackend) -> None:
        self.inner = backend
        self.calls = 0
        for attr in ("name", "version", "device", "device_name", "threads", "dtype", "policy"):
            setattr(self, attr, getattr(backend, attr))

    def measure(self, module, example_input) -> Measurement:
        self.calls += 1
        return self.inner.measure(module, example_input)


# ------------------------------------------------------------------ conv modules


@pytest.mark.parametrize(
    "spec",
    [
        conv(),
        conv(cin=4, cout=8, k=1, stride=2, act=None, bias=False),
        conv(cin=8, cout=8, groups=8, act="silu"),
        conv(dims=1, act="gelu", hw=16),
    ],
    ids=["3x3", "1x1-stride2", "depthwise", "conv1d"],
)
def test_conv_module_matches_spec(spec: ConvSpec) -> None:
    module = conv_module(spec)
    x = spec_input(spec)
    assert not module.training
    assert tuple(x.shape) == spec.input_shape
    assert tuple(module(x).shape) == spec.output_shape
    assert (module[0].bias is not None) == spec.bias
    assert torch.equal(conv_module(spec)[0].weight, module[0].weight)  # seeded


def test_conv_module_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    conv_module(conv())
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ backends


@pytest.mark.parametrize("name", ["eager", "onnxruntime", "inductor"])
def test_cpu_backend_measures_a_small_conv(name: str) -> None:
    backend = get_backend(name, device="cpu", **QUICK)
    assert isinstance(backend, LatencyBackend)
    assert backend.name == name and backend.device == "cpu" and backend.threads == 1
    assert backend.version and backend.device_name
    spec = conv(cin=4, cout=8, hw=8)
    try:
        m = backend.measure(conv_module(spec), spec_input(spec))
    except BackendUnavailable as error:
        if name == "inductor":
            pytest.skip(f"inductor cannot compile on this machine: {error}")
        raise
    assert m.median_ms > 0 and m.iqr_ms >= 0
    assert 1 <= m.runs <= 5 and m.warmup <= 2
    assert m.batch_size == 1 and m.threads == 1


def test_auto_is_onnxruntime_on_cpu() -> None:
    assert get_backend("auto", device="cpu").name == "onnxruntime"


def test_eager_restores_thread_count() -> None:
    before = torch.get_num_threads()
    backend = get_backend("eager", threads=1, runs=2, warmup=0)
    backend.measure(conv_module(conv()), spec_input(conv()))
    assert torch.get_num_threads() == before


def test_timing_is_adaptive() -> None:
    # A time budget of zero stops after min_runs, however many runs were asked for.
    backend = get_backend("eager", threads=1, runs=1000, warmup=0, min_runs=3, max_time_s=0.0)
    m = backend.measure(conv_module(conv()), spec_input(conv()))
    assert m.runs == 3


def test_evicting_policy_flushes_the_caches_before_every_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple] = []
    monkeypatch.setattr(timing, "_evictor", lambda size: lambda: events.append(("evict", size)))
    policy = TimingPolicy(warmup=2, runs=4, min_runs=4, evict_bytes=4096)
    time_runs(lambda: events.append(("run",)), policy, batch_size=1, threads=1)
    assert events == [("run",)] * 2 + [("evict", 4096), ("run",)] * 4  # warm-up runs are not flushed
    with pytest.raises(ValueError, match="evict_bytes"):
        TimingPolicy(evict_bytes=-1)


def test_conv_bytes_are_those_of_the_module() -> None:
    for spec in (conv(), conv(cin=8, cout=8, groups=8, bias=False, stride=2), conv(dims=1, k=5)):
        assert spec.weight_bytes == sum(p.numel() * p.element_size() for p in conv_module(spec).parameters())
        x = spec_input(spec)
        y = conv_module(spec)(x)
        assert spec.traffic_bytes == spec.weight_bytes + (x.numel() + y.numel()) * 4
    assert dataclasses.replace(conv(), dtype="float16").weight_bytes * 2 == conv().weight_bytes


def test_auto_times_cold_when_the_weights_exceed_the_last_level_cache(tmp_path, monkeypatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    graph = fxmerge.analyze(model, torch.randn(1, 3, 8, 8))
    size = sum(p.numel() * 4 for p in model.parameters()) + (3 + 8 + 8 + 8) * 8 * 8 * 4  # weights, activations
    backend = get_backend("eager", **QUICK)
    monkeypatch.setattr(table_module, "last_level_cache_bytes", lambda: 10 * size)
    hot = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert hot.info["weights"].startswith("hot") and hot.info["measured"] > 0
    monkeypatch.setattr(table_module, "last_level_cache_bytes", lambda: size - 4)
    policy, why = entry_policy(graph, backend)
    assert policy is not None and policy.evict_bytes == 2 * (size - 4) and why.startswith("cold")
    assert dataclasses.replace(policy, evict_bytes=0) == backend.policy
    two_threads = get_backend("eager", **{**QUICK, "threads": 2})
    assert entry_policy(graph, two_threads)[0] is None and "2 threads" in entry_policy(graph, two_threads)[1]
    cold = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert cold.info["weights"] == why
    assert cold.info["measured"] == hot.info["measured"]  # a hot measurement never stands in for a cold one
    again = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert again.info["measured"] == 0 and again.entries == cold.entries


def test_weights_mode_is_checked() -> None:
    graph = span_graph([conv()])
    with pytest.raises(ValueError, match="'auto', 'cold' or 'hot'"):
        entry_policy(graph, FakeBackend(), "warm")
    gpu = FakeBackend()
    gpu.device = "cuda"
    with pytest.raises(ValueError, match="flushes the CPU's caches"):
        entry_policy(graph, gpu, "cold")
    assert entry_policy(graph, gpu)[0] is None  # auto never flushes a GPU's caches
    assert entry_policy(graph, FakeBackend(), "hot") == (None, entry_policy(graph, FakeBackend(), "hot")[1])


def test_measure_does_not_change_the_callers_module() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).train()
    weight = model[0].weight.detach().clone()
    m = measure_model(model, torch.randn(2, 4, 8, 8), get_backend("eager", dtype="float16", **QUICK))
    assert m.batch_size == 2
    assert model.training and model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, weight)


def test_onnx_export_uses_the_torchscript_exporter() -> None:
    onnx = pytest.importorskip("onnx")
    spec = conv()
    proto = onnx.load_from_string(export_onnx(conv_module(spec), (spec_input(spec),), ["input_0"]))
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Relu"]
    assert proto.opset_import[0].version >= 17


def test_onnx_export_falls_back_to_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    export = torch.onnx.export

    def no_torchscript(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise RuntimeError("TorchScript exporter unavailable")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    spec = conv(cin=2, cout=2, hw=4)
    m = get_backend("onnxruntime", **QUICK).measure(conv_module(spec), spec_input(spec))
    assert m.median_ms > 0


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown latency backend 'fast'") as info:
        get_backend("fast")
    assert isinstance(info.value, BackendUnavailable)
    for name in ("auto", *BACKENDS):
        assert name in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tensorrt_without_gpu_says_so() -> None:
    with pytest.raises(BackendUnavailable, match=r"tensorrt needs an NVIDIA GPU; torch.cuda.is_available\(\) is False"):
        get_backend("tensorrt")
    with pytest.raises(BackendUnavailable, match="needs an NVIDIA GPU"):
        get_backend("eager", device="cuda")


def test_missing_onnxruntime_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailable, match="pip install onnxruntime"):
        get_backend("onnxruntime")


def test_onnxruntime_rejects_dtypes_its_cpu_provider_cannot_run() -> None:
    with pytest.raises(BackendUnavailable, match="float32 or float16"):
        get_backend("onnxruntime", dtype=torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_missing_tensorrt_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install fxmerge\[tensorrt\]"):
        get_backend("tensorrt", device="cuda")
    assert get_backend("auto", device="cuda").name == "eager"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["eager", "inductor"])
def test_cuda_backend_measures_a_small_conv(name: str) -> None:
    spec = conv(cin=16, cout=16, hw=32)
    m = get_backend(name, device="cuda", runs=5, warmup=2).measure(conv_module(spec), spec_input(spec))
    assert m.median_ms > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensorrt_measures_a_small_conv(dtype: torch.dtype) -> None:
    pytest.importorskip("torch_tensorrt")
    spec = conv(cin=16, cout=16, hw=32)
    backend = get_backend("tensorrt", device="cuda", dtype=dtype, runs=5, warmup=2)
    assert backend.dtype == dtype
    assert backend.measure(conv_module(spec), spec_input(spec)).median_ms > 0


# ------------------------------------------------------------------ the table


def test_table_has_every_entry_and_dedups_identical_convs(tmp_path) -> None:
    same = conv(cin=4, cout=4)
    graph = span_graph([same, conv(cin=4, cout=8)], [same], [conv(k=5)])
    backend = FakeBackend()
    table = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert set(table.entries) == {e.id for e in graph.entries}
    assert backend.calls == 3 and table.measurements == 3
    assert table.entries["p0->p1|o0"] == table.entries["p1->p2|o0"]
    assert table.backend == "fake" and table.device_name == "test cpu"
    assert table.info["measured"] == 3 and table.info["cached"] == 0
    assert table.info["threads"] == 1 and table.info["batch_size"] == 1


def test_second_build_reads_everything_from_the_cache(tmp_path) -> None:
    graph = span_graph([conv(), conv(cout=8)], [conv(k=1)])
    backend = Counting(get_backend("onnxruntime", **QUICK))
    first = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert backend.calls == 3
    second = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert backend.calls == 3
    assert second.entries == first.entries
    assert second.measurements == 3 and second.info["cached"] == 3 and second.info["measured"] == 0
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("*.json"))) == 3


def test_interrupted_build_resumes_with_only_the_missing_entries(tmp_path) -> None:
    graph = span_graph([conv(cout=c) for c in (4, 5, 6, 7, 8)])
    with pytest.raises(KeyboardInterrupt):
        build_latency_table(graph, FakeBackend(fail_after=2), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2
    resumed = FakeBackend()
    table = build_latency_table(graph, resumed, cache_dir=tmp_path, progress=False)
    assert resumed.calls == 3
    assert table.info["measured"] == 3 and table.info["cached"] == 2 and len(table.entries) == 5


def test_cache_is_keyed_on_the_backend_settings(tmp_path) -> None:
    graph = span_graph([conv()])
    build_latency_table(graph, FakeBackend(threads=1), cache_dir=tmp_path, progress=False)
    other = FakeBackend(threads=2)
    build_latency_table(graph, other, cache_dir=tmp_path, progress=False)
    assert other.calls == 1
    newer = FakeBackend()
    newer.version = "2.0"
    build_latency_table(graph, newer, cache_dir=tmp_path, progress=False)
    assert newer.calls == 1


def test_cache_is_keyed_on_the_timing_policy(tmp_path) -> None:
    spec = conv(cin=4, cout=8, hw=8)
    graph = span_graph([spec])
    quick = Counting(get_backend("eager", threads=1, runs=2, warmup=0))
    build_latency_table(graph, quick, cache_dir=tmp_path, progress=False)
    careful = Counting(get_backend("eager", threads=1, runs=5, warmup=1))
    build_latency_table(graph, careful, cache_dir=tmp_path, progress=False)
    assert quick.calls == careful.calls == 1  # a quick measurement never stands in for a careful one
    again = Counting(get_backend("eager", threads=1, runs=5, warmup=1))
    build_latency_table(graph, again, cache_dir=tmp_path, progress=False)
    assert again.calls == 0


def test_corrupt_cache_file_is_measured_again(tmp_path) -> None:
    graph = span_graph([conv()])
    build_latency_table(graph, FakeBackend(), cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    again = FakeBackend()
    build_latency_table(graph, again, cache_dir=tmp_path, progress=False)
    assert again.calls == 1
    assert json.loads(path.read_text())["measurement"]["median_ms"] > 0


def test_cache_can_be_disabled_and_defaults_to_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FXMERGE_CACHE_DIR", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "latency"
    graph = span_graph([conv()])
    build_latency_table(graph, FakeBackend(), progress=False)
    assert len(list((tmp_path / "root" / "latency").glob("*.json"))) == 1
    backend = FakeBackend()
    build_latency_table(graph, backend, cache_dir=False, progress=False)
    build_latency_table(graph, backend, cache_dir=False, progress=False)
    assert backend.calls == 2


def test_progress_bar_names_backend_and_threads(tmp_path, capsys: pytest.CaptureFixture) -> None:
    build_latency_table(span_graph([conv()]), FakeBackend(), cache_dir=tmp_path, progress=True)
    assert "latency table (fake, 1 threads)" in capsys.readouterr().err


def test_predict_and_json_round_trip(tmp_path) -> None:
    table = LatencyTable(
        backend="onnxruntime",
        device_name="cpu",
        entries={"a|o0": 1.5, "b|o0": 2.25, "b|o1": 0.5},
        offset_ms=0.75,
        original_ms=4.5,
        measurements=3,
        info={"threads": 2, "iqr_ms": {"a|o0": 0.1}},
    )
    assert table.predict(["a|o0", "b|o0"]) == pytest.approx(4.5)
    assert table.predict([]) == pytest.approx(0.75)
    with pytest.raises(KeyError, match="c|o0"):
        table.predict(["c|o0"])
    with pytest.raises(TypeError):
        table.entries["a|o0"] = 0.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.offset_ms = 0.0  # type: ignore[misc]

    path = tmp_path / "table.json"
    table.save(path)
    assert json.loads(path.read_text())["entries"]["b|o1"] == 0.5
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert LatencyTable.from_dict(table.to_dict()) == table


def test_context_correction_fits_the_measured_plan_and_keeps_the_original() -> None:
    # keep-all: a|o0 + b|o0 + c|o0 = 6 ms of entries, 10 ms measured; the plan a|o0 + b|o1 (one conv fewer)
    # saves 1 ms of entries but measures 0.6 × 10 = 6 ms, 4 ms saved: the conv it removes cost β = 3 ms more
    table = LatencyTable(
        backend="fake",
        device_name="cpu",
        entries={"a|o0": 1.0, "b|o0": 2.0, "c|o0": 3.0, "b|o1": 4.0},
        offset_ms=4.0,
        original_ms=10.0,
    )
    keep_all, plan = ("a|o0", "b|o0", "c|o0"), ("a|o0", "b|o1")
    corrected = context_corrected(table, keep_all, [(plan, 0.6)])
    assert corrected.info["context_cost"]["per_entry_ms"] == pytest.approx(3.0)
    assert corrected.predict(keep_all) == pytest.approx(10.0)
    assert corrected.predict(plan) == pytest.approx(6.0)
    assert context_corrected(table, keep_all, [(("a|o0", "b|o0", "c|o0"), 0.9)]) is table
    # two plans: β is their least-squares fit; a plan removing two convs weighs twice
    one_fewer, two_fewer = ("a|o0", "b|o1"), ("c|o0",)  # saves 1 ms of entries; saves 3 ms of entries
    both = context_corrected(table, keep_all, [(one_fewer, 0.6), (two_fewer, 0.3)])
    # y = (4 − 1) = 3 for x = 1; y = (7 − 3) = 4 for x = 2: β = (1·3 + 2·4) / (1 + 4) = 2.2
    assert both.info["context_cost"]["per_entry_ms"] == pytest.approx(2.2)
    assert both.predict(keep_all) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="calibrate"):
        context_corrected(dataclasses.replace(table, original_ms=None), keep_all, [(plan, 0.6)])
    # a plan saving less than its entries say (−1 ms fitted) leaves the entries as they are
    slower = context_corrected(table, keep_all, [(plan, 1.0)])
    assert slower.info["context_cost"]["fitted_ms"] == pytest.approx(-1.0)
    assert slower.info["context_cost"]["per_entry_ms"] == 0 and slower.entries == table.entries


def test_reanchoring_on_the_original_timed_beside_the_plans() -> None:
    # entries 1 + 2 + 3 ms and 2 ms of other ops: the original runs 8 ms, but calibration read 10
    table = LatencyTable("fake", "cpu", {"a|o0": 1.0, "b|o0": 2.0, "c|o0": 3.0}, offset_ms=4.0, original_ms=10.0)
    keep_all, plan = ("a|o0", "b|o0", "c|o0"), ("a|o0", "b|o0")  # drops c: 5 of 8 ms, ratio 0.625
    anchored = reanchored(table, 8.0, keep_all)
    assert anchored.predict(keep_all) == pytest.approx(8.0) and anchored.predict(plan) == pytest.approx(5.0)
    assert context_corrected(anchored, keep_all, [(plan, 0.625)]).info["context_cost"]["per_entry_ms"] == 0
    # fitted without it, the calibration's 2 ms error becomes a phantom cost of every conv
    assert context_corrected(table, keep_all, [(plan, 0.625)]).info["context_cost"]["per_entry_ms"] > 0.7


def test_calibrate_makes_keep_all_predict_the_original(tmp_path) -> None:
    first, second = conv(cin=4, cout=8), conv(cin=8, cout=8, act=None)
    graph = span_graph([first], [second])
    backend = FakeBackend()
    table = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    model = nn.Sequential(conv_module(first), conv_module(second), nn.Flatten(), nn.LazyLinear(3))
    model(spec_input(first))  # materialise the lazy layer
    keep_all = [e.id for e in graph.entries]
    calibrated = calibrate(table, model, spec_input(first), keep_all, backend)
    original = backend.measure(model, spec_input(first)).median_ms
    assert calibrated.original_ms == pytest.approx(original)
    assert calibrated.predict(keep_all) == pytest.approx(original)
    assert calibrated.offset_ms == pytest.approx(original - sum(table.entries.values()))
    assert calibrated.entries == table.entries
    with pytest.raises(ValueError, match="backend the table was built on"):
        calibrate(table, model, spec_input(first), keep_all, FakeBackend(threads=4))


def test_real_table_and_calibration_on_onnxruntime(tmp_path) -> None:
    first, second = conv(cin=3, cout=8, stride=2), conv(cin=8, cout=8)
    graph = span_graph([first], [second])
    backend = get_backend("onnxruntime", **QUICK)
    table = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    assert all(ms > 0 for ms in table.entries.values())
    model = nn.Sequential(conv_module(first), conv_module(second))
    calibrated = calibrate(table, model, spec_input(first), [e.id for e in graph.entries], backend)
    assert calibrated.original_ms > 0
    assert calibrated.predict(e.id for e in graph.entries) == pytest.approx(calibrated.original_ms)


@pytest.mark.slow
def test_inductor_times_many_distinct_convs(tmp_path) -> None:
    # More distinct convs than dynamo's recompile limit (8): each must really be compiled.
    graph = span_graph([conv(cout=c) for c in range(4, 14)])
    backend = get_backend("inductor", **QUICK)
    try:
        table = build_latency_table(graph, backend, cache_dir=tmp_path, progress=False)
    except BackendUnavailable as error:
        pytest.skip(f"inductor cannot compile on this machine: {error}")
    assert table.measurements == 10 and all(ms > 0 for ms in table.entries.values())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 10


# ------------------------------------------------------------------ standalone overhead


class OverheadBackend(FakeBackend):
    """Like FakeBackend, plus a fixed 0.5 ms that any conv timed alone pays."""

    standalone_overhead = True

    def measure(self, module: nn.Module, example_input) -> Measurement:
        m = super().measure(module, example_input)
        return dataclasses.replace(m, median_ms=m.median_ms + 0.5)


def test_null_spec_keeps_the_tensors_and_drops_the_work() -> None:
    for spec in (conv(cin=8, cout=16, k=3), conv(cin=6, cout=6, k=5, stride=2, hw=9), conv(cin=4, cout=8, k=3, dims=1)):
        null = null_spec(spec)
        assert null.input_shape == spec.input_shape and null.output_shape == spec.output_shape
        assert null.kernel_size == (1,) * spec.dims and null.groups == math.gcd(spec.in_channels, spec.out_channels)
        assert null.activation == spec.activation
    assert null_spec(conv(cin=4, cout=4, k=1, groups=4)) is None  # already the cheapest conv
    valid = dataclasses.replace(conv(k=3, hw=8), padding=(0, 0))  # 8 → 6: no 1×1 conv shrinks a map
    assert null_spec(valid) is None


def test_standalone_overhead_is_subtracted_when_the_backend_has_one(tmp_path) -> None:
    specs = [conv(cin=4, cout=8, k=3), conv(cin=4, cout=8, k=5)]
    graph = span_graph(specs)
    plain = build_latency_table(graph, FakeBackend(), cache_dir=tmp_path / "a", progress=False)
    backend = OverheadBackend()
    table = build_latency_table(graph, backend, cache_dir=tmp_path / "b", progress=False)
    assert backend.calls == 3  # two convs and their one shared null conv
    null_params = sum(p.numel() for p in conv_module(null_spec(specs[0])).parameters()) / 1000
    for entry_id, ms in table.entries.items():
        # (work + 0.5) − (null work + 0.5): the fixed cost is gone, only the null's tiny work is off
        assert ms == pytest.approx(plain.entries[entry_id] - null_params)
    assert set(table.info["standalone_overhead_ms"]) == set(table.entries)
    again = OverheadBackend()
    build_latency_table(graph, again, cache_dir=tmp_path / "b", progress=False)
    assert again.calls == 0  # null measurements are cached too
