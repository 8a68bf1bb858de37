"""The ``torch.compile`` backend ``"fxmerge"``.

``torch.compile(model, backend="fxmerge")`` works without importing fxmerge first:
the backend is registered through the ``torch_dynamo_backends`` entry point. For
every graph Dynamo hands over, the backend

1. lifts the parameters Dynamo passes as inputs into constants of the graph
   (``fxmerge.capture.lift_parameters``) — weights are **folded as constants**,
   like Inductor's freezing, so the compiled model is for inference: later changes
   to the module's parameters are not seen, and it does not train;
2. runs ``fxmerge.merge``: with ``options={"plan": plan}`` on a model produced by
   ``fxmerge.linearize`` it merges the plan's spans; without a plan it folds
   BatchNorms and constant affines into their convs;
3. hands the merged graph to an inner backend: ``options={"inner": "inductor"}``
   (the default), ``"eager"`` or ``"tensorrt"`` (Torch-TensorRT, CUDA only).

``options={"callback": fn}`` calls ``fn(merged_graph_module)`` for each graph, to
inspect what was merged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxmerge.capture import lift_parameters
from fxmerge.passes.merge import MergeError, merge

INNER_BACKENDS = ("inductor", "eager", "tensorrt")


def _training_batchnorms(gm: torch.fx.GraphModule) -> list[str]:
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is F.batch_norm:
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
            if training:
                found.append(node.name)
        elif node.target in (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default):
            found.append(node.name)
    return found


def _inner(name: str) -> Callable:
    if name == "eager":
        return lambda gm, _inputs: gm.forward
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if name == "tensorrt":
        if not torch.cuda.is_available():
            raise RuntimeError("inner backend 'tensorrt' needs an NVIDIA GPU; torch.cuda.is_available() is False")
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "inner backend 'tensorrt' needs Torch-TensorRT: pip install 'fxmerge[tensorrt]'"
            ) from exc
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("torch_tensorrt")
    raise ValueError(f"unknown inner backend {name!r}; choose one of {INNER_BACKENDS}")


def fxmerge_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **_: Any):
    """Dynamo backend: merge (or fold BatchNorms), then compile with the inner backend."""
    options = dict(options or {})
    plan = options.pop("plan", None)
    inner_name = options.pop("inner", "inductor")
    callback = options.pop("callback", None)
    if options:
        raise ValueError(f"unknown fxmerge backend option(s) {sorted(options)}; known: plan, inner, callback")
    inner = _inner(inner_name)
    training = _training_batchnorms(gm)
    if training:
        raise MergeError(
            f"the model reached torch.compile in training mode (BatchNorm {training[0]} uses batch statistics); "
            "the fxmerge backend folds weights for inference: call model.eval() first"
        )
    # Dynamo reads the placeholders of the graph it handed over: lift on a copy
    lifted, keep = lift_parameters(copy.deepcopy(gm), example_inputs)
    lifted.eval()
    merged = merge(lifted, plan=plan, inplace=True)
    if callback is not None:
        callback(merged)
    runtime_inputs = [example_inputs[k] for k in keep]
    compiled = inner(merged, runtime_inputs)

    if len(keep) == len(example_inputs):
        return compiled

    def run(*args):
        return compiled(*[args[k] for k in keep])

    return run
