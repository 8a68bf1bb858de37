"""Exporting a module: ONNX bytes for timing and deployment, ``merged.pt2`` + ``merged.onnx`` files.

The latency backends time ONNX exports of single convs and whole models; the
command line and the demo write a merged model's files. Both use these functions.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from fxmerge.cache import write_atomic
from fxmerge.fxutil import as_inputs

ONNX_OPSET = 18


def export_onnx(module: nn.Module, inputs: tuple, input_names: list[str]) -> bytes:
    """``module`` as a serialised ONNX model (opset :data:`ONNX_OPSET`).

    The TorchScript exporter (``dynamo=False``) is tried first: it still ships in
    torch 2.x, is deprecated but takes milliseconds. The dynamo exporter
    (``torch.export`` + onnxscript) is the fallback; it handles more models but
    takes seconds per export.
    """
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            buffer = io.BytesIO()
            torch.onnx.export(
                module,
                inputs,
                buffer,
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=input_names,
                do_constant_folding=True,
            )
            return buffer.getvalue()
        except Exception as error:  # noqa: BLE001 - any exporter failure means: try the other one
            errors.append(f"TorchScript exporter: {type(error).__name__}: {error}")
        try:
            program = torch.onnx.export(module, inputs, dynamo=True, opset_version=ONNX_OPSET, verbose=False)
            return program.model_proto.SerializeToString()
        except Exception as error:  # noqa: BLE001 - reported together with the first failure
            errors.append(f"dynamo exporter: {type(error).__name__}: {error}")
    raise RuntimeError("torch.onnx.export failed with both exporters:\n  " + "\n  ".join(errors))


def input_names(inputs: tuple) -> list[str]:
    """``input_0, input_1, ...`` for the tensor inputs."""
    return [f"input_{k}" for k, value in enumerate(inputs) if isinstance(value, torch.Tensor)]


def export_merged(merged: nn.Module, example_input, directory) -> tuple[Path, Path]:
    """Write ``merged.pt2`` (``torch.export``) and ``merged.onnx`` for a merged model into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inputs = as_inputs(example_input)
    was_training = merged.training
    merged.eval()
    try:
        program = torch.export.export(merged, inputs)
        onnx_bytes = export_onnx(merged, inputs, input_names(inputs))
    finally:
        merged.train(was_training)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    pt2 = write_atomic(directory / "merged.pt2", buffer.getvalue())
    onnx_path = write_atomic(directory / "merged.onnx", onnx_bytes)
    return pt2, onnx_path
