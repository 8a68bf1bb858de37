"""MODEL specs → models, and input shapes → example inputs.

``torchvision:NAME``   ``torchvision.models.get_model(NAME, weights=None)`` (no
                       backbone weights either, so nothing is downloaded)
``timm:NAME``          ``timm.create_model(NAME, pretrained=False)``
``FILE.py:FACTORY``    import FILE by path and call ``FACTORY()``
``MODULE:FACTORY``     import MODULE (dotted, on ``sys.path``) and call ``FACTORY()``

Models are built under a fixed torch seed, so a spec gives the same random
weights every time: ``fxmerge merge`` and ``bench --plan`` rebuild exactly the
model ``fxmerge compress`` planned for (which convs an option keeps depends on the
weights). The benchmarks load their models through here too.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fxmerge.cli.errors import CLIError

MODEL_SEED = 0
"""The torch seed a model is built under (see :func:`load_model`)."""

SPEC_FORMS = "torchvision:NAME, timm:NAME or path/to/file.py:factory"


def load_model(spec: str, seed: int = MODEL_SEED) -> nn.Module:
    """Build the model a MODEL spec names, with random weights drawn under ``seed``.

    The model is built with torch's CPU generator seeded with ``seed`` (the
    caller's random state is restored afterwards), so a spec gives the same
    weights every time.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(spec)


def _build_model(spec: str) -> nn.Module:
    if not isinstance(spec, str) or ":" not in spec:
        raise CLIError(f"bad model spec {spec!r}: expected {SPEC_FORMS}")
    source, _, name = spec.rpartition(":")
    if source == "torchvision":
        return _torchvision_model(name)
    if source == "timm":
        return _timm_model(name)
    if not name:
        raise CLIError(f"bad model spec {spec!r}: name the factory to call, as in {spec}:build_model")
    if source.endswith(".py") or "/" in source or "\\" in source:
        with _on_path(Path(source).resolve().parent):  # the file may import its neighbours
            return _call_factory(_import_file(source), source, name)
    with _on_path(Path.cwd()):  # as `python -m` would: modules under the working directory
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise CLIError(
                f"bad model spec {spec!r}: cannot import module {source!r} ({exc}); use {SPEC_FORMS}"
            ) from exc
        return _call_factory(module, source, name)


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` while importing a model and calling its factory."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(hint)}?" if hint else ""


def _call_factory(module: ModuleType, source: str, name: str) -> nn.Module:
    factory = getattr(module, name, None)
    if factory is None:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise CLIError(f"{source} has no {name!r}" + _did_you_mean(name, public))
    if not callable(factory):
        raise CLIError(f"{source}:{name} is not callable (it is a {type(factory).__name__})")
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:
        raise CLIError(f"{source}:{name} must take no arguments ({exc})") from exc
    except ValueError:  # no signature (a builtin): just call it
        pass
    try:
        model = factory()
    except Exception as exc:
        raise CLIError(f"calling {source}:{name}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise CLIError(f"{source}:{name}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        hint = _did_you_mean(name, known) or "; see torchvision.models.list_models()"
        raise CLIError(f"torchvision has no model {name!r}{hint}")
    kwargs = {}
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # segmentation / detection models: no download
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm_model(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise CLIError(f"timm:{name} needs timm, which is not installed: pip install timm") from exc
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        hint = _did_you_mean(name, timm.list_models())
        raise CLIError(f"timm cannot build {name!r}: {exc}{hint}") from exc


def _import_file(path: str) -> ModuleType:
    file = Path(path)
    if file.suffix != ".py":
        raise CLIError(f"{path} is not a Python file (expected path/to/file.py:factory)")
    if not file.is_file():
        raise CLIError(f"no such file: {path}")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"_fxmerge_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise CLIError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


# --------------------------------------------------------------------------- inputs
def parse_shape(text: str) -> tuple[tuple[int, ...], ...]:
    """``"1,3,224,224"`` → ``((1, 3, 224, 224),)``; several inputs are separated by ``;``."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(v) for v in part.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise CLIError(
                f"bad input shape {text!r}: expected integers separated by commas, e.g. 1,3,224,224"
            ) from None
        if not shape or any(v <= 0 for v in shape):
            raise CLIError(
                f"bad input shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224"
            )
        shapes.append(shape)
    return tuple(shapes)


def format_shape(shapes: Sequence[tuple[int, ...]]) -> str:
    """The inverse of :func:`parse_shape`: ``((1, 3, 224, 224),)`` → ``"1,3,224,224"``."""
    return ";".join(",".join(map(str, shape)) for shape in shapes)


def example_input(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A random example input (a tensor, or a tuple of tensors for several shapes)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    return tensors[0] if len(tensors) == 1 else tensors
