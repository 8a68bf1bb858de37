"""fxmerge: make any CNN shallower with exact, latency-aware conv merging (LayerMerge on torch.fx).

The public API; see README.md for a walk-through and docs/ARCHITECTURE.md for the design.
"""

from fxmerge.activations import register_activation
from fxmerge.api import analyze, linearize
from fxmerge.capture import CaptureError
from fxmerge.ir import SpanGraph
from fxmerge.passes.merge import MergeError, merge
from fxmerge.plan import Plan, PlanError

__all__ = [
    "CaptureError",
    "MergeError",
    "Plan",
    "PlanError",
    "SpanGraph",
    "analyze",
    "linearize",
    "merge",
    "register_activation",
]
__version__ = "0.1.0"


def __getattr__(name):
    # heavier stages load on first use, so `import fxmerge` stays light
    if name == "solve":
        from fxmerge.solver import solve

        return solve
    if name in ("compress", "CompressResult"):
        from fxmerge import api

        return getattr(api, name)
    raise AttributeError(f"module 'fxmerge' has no attribute {name!r}")
