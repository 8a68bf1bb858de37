"""Latency backends: where a module is timed.

Every backend follows one small protocol (:class:`LatencyBackend`): it knows its
runtime's name and version, the device it runs on, its thread count and dtype, and
``measure(module, example_input)`` returns a :class:`Measurement`. Those
attributes are what the latency cache is keyed on, so a measurement is reused only
where it would come out the same.

``eager``        plain PyTorch under ``torch.inference_mode()`` (CPU or CUDA).
``onnxruntime``  ``torch.onnx.export`` (TorchScript exporter, dynamo exporter as a
                 fallback) and an ``InferenceSession`` on the CPU execution
                 provider with every graph optimisation on. The default on CPU.
``inductor``     ``torch.compile(backend="inductor")`` with freezing (CPU or CUDA).
``tensorrt``     Torch-TensorRT's dynamo path (CUDA only), fp32 or fp16.
``auto``         tensorrt on CUDA when it is installed, else eager on CUDA, else
                 onnxruntime on CPU.

A backend that is not installed or cannot run on this machine raises
:class:`BackendUnavailable` when it is created, saying what to install or which
device it needs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fxmerge.export import export_onnx
from fxmerge.fxutil import as_inputs
from fxmerge.latency.timing import (
    Measurement,
    TimingPolicy,
    device_name,
    physical_cores,
    time_runs,
    timed_block,
)


class BackendUnavailable(RuntimeError):
    """A latency backend is not installed, or cannot run on this machine."""


class UnknownBackend(BackendUnavailable, ValueError):
    """No latency backend has this name."""


@runtime_checkable
class LatencyBackend(Protocol):
    """Times a module on one runtime and device."""

    name: str
    version: str
    device: str  # "cpu" or "cuda"
    device_name: str
    threads: int
    dtype: torch.dtype

    def measure(self, module: nn.Module, example_input: Tensor | tuple) -> Measurement: ...


# ------------------------------------------------------------------ shared plumbing


def _batch_size(inputs: tuple) -> int:
    for value in inputs:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _normalise_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


class _Backend:
    """What the concrete backends share: settings, placement and the timing loop."""

    name = "?"
    # Whether a conv timed alone pays costs (session call, layout reorders) that the same
    # conv inside a whole model does not; the latency table then subtracts them.
    standalone_overhead = False
    # Grad mode for compiling and running; Torch-TensorRT's export needs plain no_grad.
    grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode

    def __init__(
        self,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        dtype: torch.dtype | str = torch.float32,
        policy: TimingPolicy | None = None,
    ) -> None:
        self.torch_device = torch.device(device)
        if self.torch_device.type not in ("cpu", "cuda"):
            raise BackendUnavailable(f"{self.name} backend: unsupported device {str(device)!r} (use 'cpu' or 'cuda')")
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"{self.name} on cuda needs an NVIDIA GPU; torch.cuda.is_available() is False here"
            )
        self.device = self.torch_device.type
        self.threads = int(threads) if threads else physical_cores()
        self.dtype = _normalise_dtype(dtype)
        self.policy = policy or TimingPolicy()
        self.version = torch.__version__
        self.device_name = device_name(self.torch_device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, device={self.device!r}, "
            f"device_name={self.device_name!r}, threads={self.threads}, dtype={self.dtype})"
        )

    @property
    def settings(self) -> dict:
        """Settings beyond the shared ones that change a measurement (part of the cache key)."""
        return {}

    # The entry points --------------------------------------------------------------
    def measure(self, module: nn.Module, example_input: Tensor | tuple) -> Measurement:
        """Prepare ``module`` (untimed), then time it according to the backend's policy."""
        return self.runner(module, example_input).measure()

    def runner(self, module: nn.Module, example_input: Tensor | tuple) -> Runner:
        """``module`` prepared once (exported, compiled, a session built) for repeated timing."""
        module, inputs = self._place(module, as_inputs(example_input))
        with self._torch_threads(), type(self).grad_mode():
            step = self._prepare(module, inputs)
        return Runner(self, step, _batch_size(inputs))

    def _prepare(self, module: nn.Module, inputs: tuple) -> Callable[[], object]:
        """Build what runs the module once (export, compile, ...); called untimed."""
        raise NotImplementedError

    # Helpers ---------------------------------------------------------------------
    def _place(self, module: nn.Module, inputs: tuple) -> tuple[nn.Module, tuple]:
        """The module and inputs on this backend's device and dtype, in eval mode.

        The caller's module is copied rather than changed when it needs moving.
        """
        tensors = itertools.chain(module.parameters(), module.buffers())
        training = any(m.training for m in module.modules())
        if training or any(not self._is_placed(t) for t in tensors):
            module = copy.deepcopy(module).to(device=self.torch_device, dtype=self.dtype).eval()
        placed = tuple(self._place_tensor(x) for x in inputs)
        return module, placed

    def _is_placed(self, tensor: Tensor) -> bool:
        if tensor.device.type != self.device:
            return False
        return not tensor.is_floating_point() or tensor.dtype == self.dtype

    def _place_tensor(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        value = value.to(self.torch_device)
        return value.to(self.dtype) if value.is_floating_point() else value

    @contextlib.contextmanager
    def _torch_threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


class Runner:
    """A prepared module: time it by policy, or in blocks of runs (for interleaved comparisons)."""

    def __init__(self, backend: _Backend, step: Callable[[], object], batch_size: int) -> None:
        self.backend = backend
        self.step = step
        self.batch_size = batch_size

    def measure(self, policy: TimingPolicy | None = None) -> Measurement:
        backend = self.backend
        with backend._torch_threads(), type(backend).grad_mode():
            return time_runs(
                self.step,
                policy or backend.policy,
                batch_size=self.batch_size,
                threads=backend.threads,
                cuda=backend.device == "cuda",
            )

    def block(self, runs: int, warmup: int = 2) -> list[float]:
        """``runs`` timed runs in a row (after ``warmup`` untimed ones), in milliseconds."""
        policy = TimingPolicy(warmup=warmup, runs=runs, min_runs=runs, max_time_s=float("inf"), rel_error=0.0)
        backend = self.backend
        with backend._torch_threads(), type(backend).grad_mode():
            return timed_block(self.step, policy, cuda=backend.device == "cuda")


# ------------------------------------------------------------------ eager


class EagerBackend(_Backend):
    """Plain PyTorch, no compilation: the module's forward as it is."""

    name = "eager"

    def _prepare(self, module: nn.Module, inputs: tuple) -> Callable[[], object]:
        return lambda: module(*inputs)


# ------------------------------------------------------------------ onnxruntime


class OnnxRuntimeBackend(_Backend):
    """ONNX Runtime on the CPU execution provider, all graph optimisations on.

    The module is exported in memory with the TorchScript exporter (a few
    milliseconds for a conv); if that fails, with the dynamo exporter (seconds).
    ``intra_op_num_threads`` is the backend's thread count, ``inter_op_num_threads``
    is 1 and execution is sequential, so timings are stable. Idle worker threads do
    not spin (``spinning=False``): two sessions timed in alternation would otherwise
    steal each other's cores.
    """

    name = "onnxruntime"
    standalone_overhead = True  # NCHW↔NCHWc reorders around a lone conv, and the session call

    @property
    def settings(self) -> dict:
        return {"spinning": self.spinning}

    def __init__(self, device: str | torch.device = "cpu", *, spinning: bool = False, **kwargs: Any) -> None:
        self.spinning = bool(spinning)
        try:
            self._ort = importlib.import_module("onnxruntime")
        except ImportError as error:
            raise BackendUnavailable("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime") from error
        if torch.device(device).type != "cpu":
            raise BackendUnavailable(
                "the onnxruntime backend runs on the CPU execution provider only; "
                "on a GPU use backend='tensorrt' or 'eager'"
            )
        super().__init__(device, **kwargs)
        if self.dtype not in (torch.float32, torch.float16):
            raise BackendUnavailable(
                f"onnxruntime's CPU provider runs float32 or float16 convs, not {self.dtype}; "
                "use backend='eager' for other dtypes"
            )
        self.version = self._ort.__version__

    def _prepare(self, module: nn.Module, inputs: tuple) -> Callable[[], object]:
        ort = self._ort
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        names = [f"input_{i}" for i in range(len(tensors))]
        model_bytes = export_onnx(module, inputs, names)

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # idle worker threads that spin steal cores from the other model of an interleaved comparison
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

        arrays = [t.detach().cpu().numpy() for t in tensors]
        by_name = dict(zip(names, arrays))
        # An exporter may rename inputs or drop unused ones: feed what the graph asks for.
        graph_inputs = [i.name for i in session.get_inputs()]
        if all(n in by_name for n in graph_inputs):
            feeds = {n: by_name[n] for n in graph_inputs}
        else:
            feeds = dict(zip(graph_inputs, arrays))
        return lambda: session.run(None, feeds)


# ------------------------------------------------------------------ inductor


class InductorBackend(_Backend):
    """``torch.compile(backend="inductor")`` with freezing (weights become constants).

    The first run compiles (untimed). Every measurement compiles a fresh module, so
    the backend calls :func:`torch.compiler.reset` before and after it: timing
    hundreds of distinct convs would otherwise hit dynamo's recompile limit and
    silently fall back to eager. Other functions compiled in this process simply
    recompile on their next call.
    """

    name = "inductor"

    def __init__(self, device: str | torch.device = "cpu", **kwargs: Any) -> None:
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            try:
                importlib.import_module("triton")
            except ImportError as error:
                raise BackendUnavailable("inductor on cuda needs Triton: pip install triton") from error
        super().__init__(device, **kwargs)

    def measure(self, module: nn.Module, example_input: Tensor | tuple) -> Measurement:
        torch.compiler.reset()
        try:
            return super().measure(module, example_input)
        finally:
            torch.compiler.reset()

    def runner(self, module: nn.Module, example_input: Tensor | tuple) -> Runner:
        inductor_config = importlib.import_module("torch._inductor.config")
        with inductor_config.patch(freezing=True):
            return super().runner(module, example_input)

    def _prepare(self, module: nn.Module, inputs: tuple) -> Callable[[], object]:
        compiled = torch.compile(module, backend="inductor", dynamic=False)
        try:
            compiled(*inputs)
        except Exception as error:
            hint = "a working C++ compiler (g++, or $CXX)" if self.device == "cpu" else "a working Triton"
            raise BackendUnavailable(
                f"inductor could not compile on {self.device} (it needs {hint}): {type(error).__name__}: {error}"
            ) from error
        return lambda: compiled(*inputs)


# ------------------------------------------------------------------ tensorrt


class TensorRTBackend(_Backend):
    """Torch-TensorRT's dynamo path on an NVIDIA GPU.

    The module and inputs are cast to the backend's dtype (fp32 or fp16) and
    compiled with ``min_block_size=1``, so even a single conv becomes a TensorRT
    engine instead of falling back to PyTorch.
    """

    name = "tensorrt"
    grad_mode = torch.no_grad

    def __init__(self, device: str | torch.device = "cuda", **kwargs: Any) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("tensorrt needs an NVIDIA GPU; torch.cuda.is_available() is False here")
        if torch.device(device).type != "cuda":
            raise BackendUnavailable(f"tensorrt runs on CUDA only; got device={str(device)!r}, use device='cuda'")
        try:
            self._trt = importlib.import_module("torch_tensorrt")
        except ImportError as error:
            raise BackendUnavailable(
                "the tensorrt backend needs Torch-TensorRT: pip install fxmerge[tensorrt]"
            ) from error
        super().__init__(device, **kwargs)
        if self.dtype not in (torch.float32, torch.float16):
            raise BackendUnavailable(f"tensorrt backend: dtype must be float32 or float16, got {self.dtype}")
        self.version = self._trt.__version__

    def _prepare(self, module: nn.Module, inputs: tuple) -> Callable[[], object]:
        settings: dict[str, Any] = {"min_block_size": 1}
        parameters = inspect.signature(self._trt.dynamo.compile).parameters
        if "use_explicit_typing" in parameters:
            settings["use_explicit_typing"] = True  # the cast module's dtypes are what runs
        else:
            settings["enabled_precisions"] = {self.dtype}
        compiled = self._trt.compile(module, ir="dynamo", inputs=list(inputs), **settings)
        return lambda: compiled(*inputs)


# ------------------------------------------------------------------ selection

BACKENDS: dict[str, type[_Backend]] = {
    "eager": EagerBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "inductor": InductorBackend,
    "tensorrt": TensorRTBackend,
}


def get_backend(
    name: str = "auto",
    device: str | torch.device | None = None,
    threads: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    runs: int = 50,
    warmup: int = 10,
    *,
    min_runs: int = 5,
    max_time_s: float = 1.0,
) -> LatencyBackend:
    """The latency backend called ``name`` on ``device``.

    ``device`` defaults to ``"cuda"`` for tensorrt and ``"cpu"`` for every other
    name (``auto`` included: pass ``device="cuda"`` to time on a GPU).
    ``threads`` defaults to the number of physical cores. A measurement makes
    ``warmup`` untimed runs, then up to ``runs`` timed runs, stopping early (after
    at least ``min_runs``) once ``max_time_s`` seconds are spent.

    Raises :class:`UnknownBackend` (a ``ValueError``) for a name that is no backend,
    and :class:`BackendUnavailable` when the backend cannot run here.
    """
    policy = TimingPolicy(warmup=warmup, runs=runs, min_runs=min(min_runs, runs), max_time_s=max_time_s)
    settings: dict[str, Any] = {"threads": threads, "dtype": dtype, "policy": policy}
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"ort": "onnxruntime", "trt": "tensorrt", "torchtensorrt": "tensorrt", "torch": "eager"}
    key = aliases.get(key, key)
    if key == "auto":
        return _auto(device or "cpu", settings)
    if key not in BACKENDS:
        valid = ", ".join(["auto", *BACKENDS])
        raise UnknownBackend(f"unknown latency backend {name!r}; valid names: {valid}")
    if device is None:
        device = "cuda" if key == "tensorrt" else "cpu"
    return BACKENDS[key](device, **settings)


def _auto(device: str | torch.device, settings: dict[str, Any]) -> LatencyBackend:
    if torch.device(device).type == "cuda":
        try:
            return TensorRTBackend(device, **settings)
        except BackendUnavailable:
            return EagerBackend(device, **settings)
    return OnnxRuntimeBackend(device, **settings)


def resolve_backend(backend: LatencyBackend | str) -> LatencyBackend:
    """A backend object from a backend or a backend name."""
    return get_backend(backend) if isinstance(backend, str) else backend
