"""The ``fxmerge`` command: model specs, ``inspect`` output, and clean errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from fxmerge.cli import CLIError, load_model, main, parse_shape

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
        capsys, "inspect", "tests.models:TupleInput", "--input-shape", "1,3,16,16;1,3,16,16",
        "--exclude", "body.1", "--json",
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


# --------------------------------------------------------------------------- errors
def test_user_errors_exit_2_without_traceback(capsys):
    status, _, err = run(capsys, "inspect", "torchvision:not_a_model")
    assert status == 2 and err.startswith("fxmerge: error: torchvision has no model 'not_a_model'")
    assert "Traceback" not in err
    status, _, err = run(capsys, "inspect", f"{MODELS}:ConvChain", "--input-shape", "1,4,16,16")
    assert status == 2 and "fxmerge: error: running ConvChain on the example input failed" in err
    status, _, err = run(capsys, "inspect", "tests.models:TopLevelUntraceable", "--input-shape", "1,3,16,16")
    assert status == 2 and "fxmerge: error: cannot trace TopLevelUntraceable" in err


@pytest.mark.skipif(importlib.util.find_spec("fxmerge.passes.rules") is not None, reason="paper rules exist")
def test_paper_rules_missing_is_a_clean_error(capsys):
    status, _, err = run(capsys, "inspect", f"{MODELS}:ConvChain", "--input-shape", "1,3,16,16", "--rules", "paper")
    assert status == 2 and "rules='paper' is not available" in err


def test_argument_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,a"])
    assert info.value.code == 2
    assert "bad input shape" in capsys.readouterr().err
    assert main([]) == 2  # no subcommand: help on stderr


def test_debug_shows_the_traceback():
    with pytest.raises(CLIError):
        main(["--debug", "inspect", "nope"])


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "fxmerge", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("fxmerge ")
