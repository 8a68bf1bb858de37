"""Latency: time convs and models on a backend, and the latency table the solver uses.

``get_backend(name, device=...)`` picks a backend (eager, onnxruntime, inductor,
tensorrt, or auto); ``build_latency_table(span_graph, backend)`` times every span
option (deduplicated and cached on disk); ``calibrate`` adds the end-to-end offset
measured on the original model; ``measure_model`` times any module end to end;
``side_by_side`` times two modules in alternating rounds.
"""

from fxmerge.latency.backends import (
    BACKENDS,
    BackendUnavailable,
    LatencyBackend,
    UnknownBackend,
    get_backend,
)
from fxmerge.latency.cache import default_cache_dir
from fxmerge.latency.compare import median_latency, side_by_side
from fxmerge.latency.conv import conv_module, spec_input
from fxmerge.latency.table import LatencyTable, build_latency_table, calibrate, measure_model
from fxmerge.latency.timing import Measurement

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "LatencyBackend",
    "LatencyTable",
    "Measurement",
    "UnknownBackend",
    "build_latency_table",
    "calibrate",
    "conv_module",
    "default_cache_dir",
    "get_backend",
    "measure_model",
    "median_latency",
    "side_by_side",
    "spec_input",
]
