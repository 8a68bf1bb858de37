"""A user's estimator: a callable ``score(model) -> float``.

``Δ = score(entry-applied model) − score(original)``. Both models are GraphModules
in eval mode with their own copy of every parameter (the callable may train or
change them). The original is the keep-all plan linearized, scored once; the build
caches that score with the entries, under the entry id ``<original>``. ``data=`` is
not used, and entries are cached only when the build is given a ``cache_key``
(which then names the callable).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch import nn
from typing_extensions import override

from fxmerge.capture import Captured
from fxmerge.importance.base import Estimator
from fxmerge.ir import Entry, SpanGraph
from fxmerge.plan import Plan


def callable_label(fn: Callable) -> str:
    """The name a user callable goes by in the table (its qualified name)."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


class UserScore(Estimator):
    """A user's ``score(model) -> float``; the original is scored once (and cached with the entries)."""

    caches_reference = True
    needs_cache_key = True  # nothing else identifies the callable across runs

    def __init__(self, captured: Captured, span_graph: SpanGraph, fn: Callable[[nn.Module], float]) -> None:
        super().__init__(captured, span_graph, {})
        self.fn = fn
        self.label = callable_label(fn)
        self.description = "user callable (data= is not used)"

    @property
    @override
    def key_label(self) -> str:
        return "callable"  # the cache_key names the callable

    @override
    def prepare(self) -> None:
        if self.reference is None:
            self.reference = float(self.fn(self.network(Plan.keep_all(self.span_graph)).eval()))

    @override
    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:
        assert self.reference is not None, "prepare() first"
        return float(self.fn(gm.eval())) - self.reference
