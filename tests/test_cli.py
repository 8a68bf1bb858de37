"""The ``fxmerge`` command: model specs, ``inspect``, ``compress`` → ``merge`` → ``bench`` end to end, and clean errors."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from fxmerge.cli import CLIError, is_user_error, load_model, main, parse_shape
from fxmerge.passes.merge import MergeError

ROOT = Path(__file__).resolve().parent.parent
MODELS = str(ROOT / "tests" / "models.py")


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- model specs
def test_load_model_specs():
    assert type(load_model("torchvision:resnet18")).__name__ == "ResNet"
    assert type(load_model(f"{MODELS}:BasicBlock")).__name__ == "BasicBlock"
    assert type(load_model("tests.models:InceptionModule")).__name__ == "InceptionModule"


def test_load_segmentation_model_downloads_nothing():
    model = load_model("torchvision:lraspp_mobilenet_v3_large")
    assert isinstance(model, nn.Module)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet18", "bad model spec 'resnet18'"),
        ("torchvision:resnet", "did you mean"),
        ("nowhere/model.py:build", "no such file: nowhere/model.py"),
        (f"{MODELS}:Nope", "has no 'Nope'"),
        (f"{MODELS}:build", "must take no arguments"),
        (f"{MODELS}:CASES", "is not callable"),
        (f"{MODELS}:", "name the factory"),
        ("no_such_module_xyz:build", "cannot import module"),
    ],
)
def test_load_model_errors(spec, message):
    with pytest.raises(CLIError, match=message.replace("(", r"\(")):
        load_model(spec)


def test_models_are_built_under_a_fixed_seed(tmp_path):
    import torch

    file = tmp_path / "unseeded.py"
    file.write_text("from torch import nn\n\ndef build():\n    return nn.Conv2d(3, 4, 3)\n")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second = load_model(f"{file}:build"), load_model(f"{file}:build")
    assert torch.equal(first.weight, second.weight)  # so merge rebuilds what compress planned for
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left alone
    a, b = load_model("torchvision:resnet18"), load_model("torchvision:resnet18")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_factory_must_return_a_module(tmp_path):
    file = tmp_path / "bad.py"
    file.write_text("def build():\n    return 42\n")
    with pytest.raises(CLIError, match="returned a int, not a torch.nn.Module"):
        load_model(f"{file}:build")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm_says_how_to_install():
    with pytest.raises(CLIError, match="pip install timm"):
        load_model("timm:resnet18")


def test_parse_shape():
    assert parse_shape("1,3,224,224") == ((1, 3, 224, 224),)
    assert parse_shape("1,3,16,16;1,3,16,16") == ((1, 3, 16, 16), (1, 3, 16, 16))
    for bad in ("1,3,a", "", "1,0,3"):
        with pytest.raises(CLIError, match="bad input shape"):
            parse_shape(bad)


# --------------------------------------------------------------------------- inspect
def test_inspect_tables(capsys):
    status, out, _ = run(capsys, "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16")
    assert status == 0
    assert "Positions (5)" in out and "Spans (6)" in out and "Rejected (0)" in out
    assert "stem.0->add" in out and "5×5" in out
    assert out.strip().splitlines()[-1].startswith("BasicBlock: 3 units, 1 joins, 5 positions, 6 spans")


def test_inspect_json(capsys):
    status, out, _ = run(
        capsys, "inspect", f"{MODELS}:ReflectPadding", "--input-shape", "1,3,16,16", "--json", "--max-kernel", "5"
    )
    assert status == 0
    data = json.loads(out)
    for key in ("model", "units", "positions", "spans", "entries", "rejections"):
        assert key in data
    assert data["model"] == "ReflectPadding"
    assert data["rejections"] == [
        {"node": "conv_b", "reason": "padding_mode='reflect': only zero padding can be moved in front of a span"}
    ]
    assert [u["id"] for u in data["units"]] == ["conv_a", "conv_b", "conv_c"]
    assert data["entries"][0]["option"]["conv"]["kernel_size"] == [3, 3]
    assert data["settings"]["max_kernel"] == "5"


def test_inspect_exclude_and_multiple_inputs(capsys):
    status, out, _ = run(
        capsys,
        "inspect",
        "tests.models:TupleInput",
        "--input-shape",
        "1,3,16,16;1,3,16,16",
        "--exclude",
        "body.1",
        "--json",
    )
    assert status == 0
    data = json.loads(out)
    assert len(data["input_shapes"]) == 2
    assert {"node": "body_1_0", "reason": "excluded by the user"} in data["rejections"]


def test_inspect_torchvision(capsys):
    status, out, _ = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    assert status == 0
    assert "add:layer1.0" in out and "maxpool" in out
    assert "ResNet: 20 units, 8 joins" in out


def test_inspect_shows_coverage(capsys):
    status, out, _ = run(capsys, "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16")
    assert status == 0
    summary = out.strip().splitlines()[-1]
    assert re.search(r", coverage \d+% of convs", summary), summary
    assert "Low coverage" not in out  # BasicBlock merges: no rejection reasons listed
    status, out, _ = run(capsys, "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16", "--json")
    data = json.loads(out)
    assert 0 < data["coverage"] <= 1
    assert data["summary"]["coverage_percent"] == round(100 * data["coverage"], 1)
    assert data["summary"]["low_coverage"] is False


def test_low_coverage_lists_the_top_rejection_reasons(capsys):
    # every conv kept out of spans: nothing to merge, and the reason is the exclusion
    excluded = ("--exclude", "stem", "--exclude", "conv1", "--exclude", "conv2")
    argv = ("inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16", *excluded)
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert "coverage 0% of convs" in out.strip().splitlines()[-1]
    assert "Low coverage: only 0% of convs" in out and "Most common rejection reasons:" in out
    assert "3× excluded by the user" in out
    status, out, _ = run(capsys, *argv, "--json")
    data = json.loads(out)
    assert data["coverage"] == 0 and data["summary"]["low_coverage"] is True
    assert data["top_rejection_reasons"][0]["reason"] == "excluded by the user"


# --------------------------------------------------------------------------- errors
def test_user_errors_exit_2_without_traceback(capsys):
    status, _, err = run(capsys, "inspect", "torchvision:not_a_model")
    assert status == 2 and err.startswith("fxmerge: error: torchvision has no model 'not_a_model'")
    assert "Traceback" not in err
    status, _, err = run(capsys, "inspect", f"{MODELS}:ConvChain", "--input-shape", "1,4,16,16")
    assert status == 2 and "fxmerge: error: running ConvChain on the example input failed" in err
    status, _, err = run(capsys, "inspect", "tests.models:TopLevelUntraceable", "--input-shape", "1,3,16,16")
    assert status == 2 and "fxmerge: error: cannot capture TopLevelUntraceable: cannot trace TopLevelUntraceable" in err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,a"])
    assert info.value.code == 2
    assert "bad input shape" in capsys.readouterr().err
    assert main([]) == 2  # no subcommand: help on stderr


def test_debug_shows_the_traceback():
    with pytest.raises(CLIError):
        main(["--debug", "inspect", "nope"])


def test_value_errors_from_arguments_stay_user_errors(capsys):
    with pytest.raises(SystemExit) as info:  # was a ValueError from analyze, now checked by the parser
        main(["inspect", "torchvision:resnet18", "--max-kernel", "0"])
    assert info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [MergeError("span a->b: offsets disagree"), AssertionError("impossible"), KeyError("unit")],
    ids=["MergeError", "AssertionError", "KeyError"],
)
def test_internal_errors_show_the_traceback(capsys, monkeypatch, error):
    def analyze(*args, **kwargs):
        raise error

    monkeypatch.setattr("fxmerge.cli.common.analyze", analyze)
    status, _, err = run(capsys, "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16")
    assert status == 1
    assert "Traceback (most recent call last)" in err and "in analyze" in err
    assert f"fxmerge: internal error: {type(error).__name__}" in err and "please report it" in err
    assert "fxmerge: error:" not in err
    with pytest.raises(type(error)):
        main(["--debug", "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16"])


def test_a_closed_stdout_is_not_an_error(capsys, monkeypatch):
    def analyze(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")  # as print() raises under `fxmerge inspect ... | head`

    monkeypatch.setattr("fxmerge.cli.common.analyze", analyze)
    status, _, err = run(capsys, "inspect", f"{MODELS}:BasicBlock", "--input-shape", "1,3,16,16")
    assert status == 141 and err == ""


def test_a_missing_fxmerge_module_is_a_bug_a_missing_package_is_not():
    assert is_user_error(ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt"))
    assert not is_user_error(ModuleNotFoundError("No module named 'fxmerge.gone'", name="fxmerge.gone"))
    assert not is_user_error(ImportError("cannot import name 'x' from 'fxmerge.cache'"))
    assert is_user_error(FileNotFoundError("plan.json")) and not is_user_error(OSError("disk full"))
    assert is_user_error(CLIError("bad")) and not is_user_error(MergeError("bad")) and not is_user_error(ValueError())


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "fxmerge", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("fxmerge ")


# --------------------------------------------------------------------------- compress, merge, bench
TINY = '''
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Tiny(nn.Module):
    """stem, a residual block, one more conv, then a 3-way linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.tail = conv_bn(8, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        s = self.stem(x)
        y = F.relu(self.bn1(self.conv1(s)))
        y = F.relu(self.bn2(self.conv2(y)) + s)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.tail(y), 1), 1))


class Segmenter(Tiny):
    def forward(self, x):
        return self.tail(self.stem(x))


def build():
    torch.manual_seed(0)
    return Tiny()


def two_classes():
    torch.manual_seed(0)
    return Tiny(classes=2)


def segmenter():
    return Segmenter()


class Timed(nn.Module):
    """An image and a timestep, as a diffusion U-Net takes them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.out(self.b(self.a(x) + t.reshape(-1, 1, 1, 1)))


def timed():
    torch.manual_seed(0)
    return Timed()
'''
SHAPE = ("--input-shape", "1,3,16,16")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    file = tmp_path_factory.mktemp("model") / "tiny.py"
    file.write_text(TINY)
    return f"{file}:build"


def flops_backend(name, **settings):
    """Deterministic timings for tests that check what the solver chose (see test_api.FlopsBackend)."""
    from tests.test_api import FlopsBackend

    return FlopsBackend()


@pytest.fixture
def flops(monkeypatch):
    monkeypatch.setattr("fxmerge.cli.common.latency_backend", flops_backend)


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """``fxmerge compress`` run once: (output directory, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = tmp_path_factory.mktemp("compressed")
    cache = tmp_path_factory.mktemp("cache")
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(stdout), redirect_stderr(stderr):
        patch.setattr("fxmerge.cli.common.latency_backend", flops_backend)
        status = main(
            [
                "compress",
                tiny,
                *SHAPE,
                "--target",
                "60%",
                "--cache-dir",
                str(cache),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    assert status == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def _pt2_outputs(path, x):
    import torch

    with torch.no_grad():
        return torch.export.load(path).module()(x)


def test_compress_writes_six_files(tiny, compressed):
    import onnxruntime as ort
    import torch

    import fxmerge

    out, stdout, stderr = compressed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["plan.json", "report.json", "report.md", "linearized.pt", "merged.pt2", "merged.onnx"]
    )
    plan = fxmerge.Plan.load(out / "plan.json")
    report = json.loads((out / "report.json").read_text())
    assert plan.model == report["model"] == "Tiny"
    assert report["predicted_ms"] <= report["target_ms"] and report["convs_after"] < report["convs_before"] == 4
    assert report["settings"]["input_shape"] == "1,3,16,16" and report["merge_relative_error"] <= 1e-5
    assert "no --data" in report["notes"][-1] and "no --data" in (out / "report.md").read_text()
    assert "no --data" in stderr and "importance was estimated data-free" in stderr

    # linearized.pt holds plain tensors and rebuilds the linearized model; merged.pt2/.onnx compute it
    model = load_model(tiny)
    x = torch.randn(2, 3, 16, 16)
    x1 = x[:1]
    linear = fxmerge.linearize(model, x1, plan)
    linear.load_state_dict(torch.load(out / "linearized.pt", weights_only=True))
    with torch.no_grad():
        reference = linear.eval()(x1)
    got = _pt2_outputs(out / "merged.pt2", x1)
    assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5
    session = ort.InferenceSession(str(out / "merged.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x1.numpy()})
    assert float((torch.from_numpy(onnx_out) - reference).abs().max() / reference.abs().max()) <= 1e-4

    table = stdout.splitlines()
    assert table[0].split() == ["original", "compressed"]
    assert any(line.startswith("convs") and f"{report['convs_after']} (" in line for line in table)
    assert any(line.startswith("target") and "60%" in line for line in table)
    assert "merged.pt2 merged.onnx" in stdout and "fxmerge bench" in stdout


def test_merge_rebuilds_the_merged_model(tiny, compressed, tmp_path, capsys):
    import torch

    out, _, _ = compressed
    status, stdout, stderr = run(
        capsys,
        "merge",
        tiny,
        "--plan",
        str(out / "plan.json"),
        "--weights",
        str(out / "linearized.pt"),
        "--out",
        str(tmp_path),
    )
    assert status == 0, stderr
    assert "using --input-shape 1,3,16,16" in stderr  # read from report.json beside the plan
    assert "max|Δ|/max|ref|" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx", "merged.pt2"]
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(_pt2_outputs(tmp_path / "merged.pt2", x), _pt2_outputs(out / "merged.pt2", x), atol=1e-6)


def test_bench_merged_prints_a_speedup(tiny, compressed, capsys):
    out, _, _ = compressed
    fast = ("--backend", "eager", "--runs", "3", "--threads", "1", "--rounds", "2", "--no-progress")
    status, stdout, stderr = run(capsys, "bench", tiny, "--merged", str(out / "merged.pt2"), *fast)
    assert status == 0, stderr
    assert "original (BatchNorm folded, exported)" in stdout and "speed-up" in stdout
    assert re.search(r"speed-up\s+\d+\.\d\d×", stdout)
    status, stdout, _ = run(capsys, "bench", tiny, "--plan", str(out / "plan.json"), *fast, "--json")
    data = json.loads(stdout)
    assert status == 0 and data["input_shape"] == "1,3,16,16" and data["rounds"] == 2
    assert data["speedup"] == pytest.approx(data["original_ms"] / data["merged_ms"])
    status, stdout, _ = run(capsys, "bench", tiny, *SHAPE, *fast, "--json")
    assert status == 0 and "merged_ms" not in json.loads(stdout) and json.loads(stdout)["original_ms"] > 0


def test_compress_with_data_finetunes(tiny, flops, tmp_path, capsys):
    from tests.test_data import make_image_folder

    data = make_image_folder(tmp_path / "images", train=4, val=2)
    out = tmp_path / "out"
    status, stdout, stderr = run(
        capsys,
        "compress",
        tiny,
        *SHAPE,
        "--target",
        "80%",
        "--data",
        str(data),
        "--finetune-epochs",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--distill",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--no-progress",
    )
    assert status == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"original", "linearized", "fine-tuned"}
    assert report["settings"]["finetune_epochs"] == 1 and not any("no --data" in n for n in report["notes"])
    assert "## Accuracy (top-1, 6 validation images)" in (out / "report.md").read_text()
    assert "fine-tuning the linearized model for 1 epoch(s) with distillation" in stderr
    assert re.search(r"accuracy \(val, 6\)\s+\d+\.\d%\s+\d+\.\d% linearized → \d+\.\d% fine-tuned", stdout)


# --------------------------------------------------------------------------- compress, merge, bench: errors
def test_missing_data_directory(tiny, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    status, _, err = run(
        capsys, "compress", tiny, *SHAPE, "--target", "60%", "--data", str(missing), "--out", str(tmp_path / "o")
    )
    assert status == 2 and err.startswith(f"fxmerge: error: data directory {missing} does not exist")
    assert "DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE" in err and "Traceback" not in err


def test_data_without_val(tiny, tmp_path, capsys):
    from tests.test_data import make_image_folder

    data = make_image_folder(tmp_path / "images", splits=("train",))
    status, _, err = run(
        capsys, "compress", tiny, *SHAPE, "--target", "60%", "--data", str(data), "--out", str(tmp_path / "o")
    )
    assert status == 2 and f"data directory {data} has no val/ folder" in err


def test_data_with_more_classes_than_outputs(tmp_path, capsys):
    from tests.test_data import make_image_folder

    file = tmp_path / "tiny.py"
    file.write_text(TINY)
    data = make_image_folder(tmp_path / "images", train=1, val=1)
    common = (*SHAPE, "--target", "60%", "--data", str(data), "--workers", "0", "--out", str(tmp_path / "o"))
    status, _, err = run(capsys, "compress", f"{file}:two_classes", *common)
    assert status == 2 and "has 3 classes but the model has only 2 outputs" in err
    status, _, err = run(capsys, "compress", f"{file}:segmenter", *common)
    assert status == 2 and "--data fine-tunes a classifier" in err


def test_unreachable_target_names_the_smallest_latency(tiny, flops, tmp_path, capsys):
    status, _, err = run(
        capsys,
        "compress",
        tiny,
        *SHAPE,
        "--target",
        "0.0001ms",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert status == 2
    found = re.search(
        r"target 0.0001 ms cannot be met on flops \(1 thread\(s\)\): the smallest achievable latency is "
        r"([\d.]+) ms, measured on the fastest plan fxmerge can build \(the original: [\d.]+ ms\); "
        r"ask for ([\d.]+) ms or more",
        err,
    )
    assert found, err
    smallest, suggested = map(float, found.groups())
    assert 0.0001 < smallest <= suggested
    assert err.count(found.group(1)) == 1  # named once
    assert not (tmp_path / "o").exists()  # a failed run leaves no empty output directory


def test_unreachable_percentage_target_is_named_in_percent(tiny, flops, tmp_path, capsys):
    status, _, err = run(
        capsys,
        "compress",
        tiny,
        *SHAPE,
        "--target",
        "1%",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    found = re.search(r"the smallest achievable is ([\d.]+)% of the original", err)
    assert status == 2 and found, err
    assert re.search(rf"ask for {math.ceil(float(found.group(1)))}% or more", err), err
    assert not (tmp_path / "o").exists()


def test_unreachable_target_without_the_loop_names_the_predicted_minimum(tiny, flops, tmp_path, capsys):
    status, _, err = run(
        capsys,
        "compress",
        tiny,
        *SHAPE,
        "--target",
        "0.0001ms",
        "--no-loop",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert status == 2 and "as predicted by the latency table (the loop is off)" in err, err
    assert not (tmp_path / "o").exists()


def test_compress_a_two_input_model(tiny, flops, tmp_path, capsys):
    model = tiny.replace(":build", ":timed")
    status, out, err = run(
        capsys,
        "compress",
        model,
        "--input-shape",
        "1,3,16,16;1",
        "--target",
        "80%",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert status == 0, err
    assert (tmp_path / "o" / "merged.onnx").is_file() and "met as measured" in out
    import torch

    program = torch.export.load(tmp_path / "o" / "merged.pt2")
    assert [tuple(n.meta["val"].shape) for n in program.graph.nodes if n.op == "placeholder"][-2:] == [
        (1, 3, 16, 16),
        (1,),
    ]


def test_target_at_or_above_the_original_writes_nothing(tiny, flops, tmp_path, capsys):
    status, out, err = run(
        capsys,
        "compress",
        tiny,
        *SHAPE,
        "--target",
        "150%",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    assert status == 0, err
    assert "nothing to compress" in out and "no files written" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("target", "message"), [("fast", "cannot read target 'fast'"), ("0%", "outside"), ("-3", "must be positive")]
)
def test_bad_target(tiny, tmp_path, capsys, target, message):
    with pytest.raises(SystemExit) as info:
        main(["compress", tiny, *SHAPE, "--target", target, "--out", str(tmp_path)])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_wrong_input_shape(tiny, tmp_path, capsys):
    status, _, err = run(
        capsys, "compress", tiny, "--input-shape", "1,4,16,16", "--target", "60%", "--out", str(tmp_path)
    )
    assert status == 2 and "running Tiny on the example input failed" in err


def test_importance_that_needs_labels_needs_data(tiny, tmp_path, capsys):
    status, _, err = run(
        capsys, "compress", tiny, *SHAPE, "--target", "60%", "--importance", "loss", "--out", str(tmp_path)
    )
    assert status == 2 and "--importance loss needs labelled data: pass --data DIR" in err


def test_merge_errors(tiny, compressed, tmp_path, capsys):
    out, _, _ = compressed
    plan = ("--plan", str(out / "plan.json"))
    status, _, err = run(capsys, "merge", f"{MODELS}:ConvChain", *plan, "--out", str(tmp_path))
    assert status == 2 and "this plan was made for model 'Tiny', not 'ConvChain'" in err
    status, _, err = run(capsys, "merge", tiny, *plan, "--input-shape", "1,3,32,32", "--out", str(tmp_path))
    assert status == 2 and "plan is stale" in err and "--input-shape 1,3,32,32" in err
    status, _, err = run(capsys, "merge", tiny, "--plan", str(tmp_path / "none.json"), "--out", str(tmp_path))
    assert status == 2 and "no plan file at" in err
    import torch

    bad = tmp_path / "bad.pt"
    torch.save({"stem.0.weight": torch.zeros(1)}, bad)
    status, _, err = run(capsys, "merge", tiny, *plan, "--weights", str(bad), "--out", str(tmp_path))
    assert status == 2 and "do not fit the linearized model" in err and "wrong shape (stem.0.weight" in err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    status, _, err = run(capsys, "merge", tiny, *plan, "--weights", str(tmp_path / "junk.pt"), "--out", str(tmp_path))
    assert status == 2 and "cannot read" in err and "state_dict" in err


def test_a_file_that_is_not_a_plan(tiny, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    status, _, err = run(capsys, "merge", tiny, *SHAPE, "--plan", str(tmp_path / "list.json"), "--out", str(tmp_path))
    assert status == 2 and "is not an fxmerge plan" in err and "Traceback" not in err
    status, _, err = run(capsys, "merge", tiny, *SHAPE, "--plan", str(tmp_path), "--out", str(tmp_path / "o"))
    assert status == 2 and "is a directory" in err


def test_merge_error_on_our_own_plan_is_a_bug(tiny, compressed, tmp_path, capsys, monkeypatch):
    def merge(gm, plan=None):
        raise MergeError("span stem.0->add: the marked span does not match its plan")

    monkeypatch.setattr("fxmerge.cli.merge.merge_spans", merge)
    out, _, _ = compressed
    status, _, err = run(capsys, "merge", tiny, "--plan", str(out / "plan.json"), "--out", str(tmp_path))
    assert status == 1 and "Traceback (most recent call last)" in err
    assert "fxmerge: internal error: MergeError: span stem.0->add" in err and "please report it" in err


def test_bench_errors(tiny, compressed, capsys):
    out, _, _ = compressed
    status, _, err = run(capsys, "bench", tiny, "--merged", str(out / "merged.pt2"), "--input-shape", "1,3,32,32")
    assert status == 2 and "was exported for input 1,3,16,16, not --input-shape 1,3,32,32" in err
    status, _, err = run(capsys, "bench", tiny, "--merged", str(out / "nothing.pt2"))
    assert status == 2 and "no such file" in err
    status, _, err = run(capsys, "bench", tiny, *SHAPE, "--backend", "tensorrt", "--device", "cpu")
    assert status == 2 and "fxmerge: error:" in err
