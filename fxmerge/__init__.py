"""fxmerge: make any CNN shallower with exact, latency-aware conv merging (LayerMerge on torch.fx)."""

from fxmerge.activations import register_activation
from fxmerge.analysis import analyze
from fxmerge.capture import CaptureError
from fxmerge.ir import SpanGraph
from fxmerge.plan import Plan, PlanError

__all__ = ["CaptureError", "Plan", "PlanError", "SpanGraph", "analyze", "register_activation"]
__version__ = "0.1.0"
