"""Importance: what each entry (span, option) of a span graph costs in accuracy.

Every estimator gives each entry a change Δ relative to the unmodified model,
measured on the network that applies *only that entry* (:func:`single_entry_plan`:
the entry, and every other unit kept as it is), and stores it as ``I = exp(Δ)``.
A drop gives ``I < 1``. The solver maximises the sum of ``I`` over a plan's
entries. An entry whose span holds one unit and prunes nothing *is* the original
network, so it gets ``Δ = 0`` (``I = 1`` exactly) without being evaluated.

Estimators (``ESTIMATORS``):

``distortion``
    No labels needed. ``Δ = −D`` where ``D`` is the divergence between the
    original model's output and the entry's output on calibration inputs:
    ``KL(softmax(orig) ‖ softmax(entry))`` (mean over samples) for 2-D outputs
    (classifier logits), relative squared error ``‖entry − orig‖² / ‖orig‖²`` for
    any other tensor; a tuple or dict output sums the divergences of its floating
    tensors. Calibration inputs come from ``data``; without it, ``random_batches``
    standard-normal batches shaped like ``example_input`` are drawn (seeded), and
    ``info["data"]`` says so.
``loss``
    Labelled data, no training. ``Δ = −(loss_entry − loss_orig)`` (cross-entropy,
    or ``loss_fn(output, label)`` returning a batch mean), or with
    ``metric="accuracy"``, ``Δ = acc_entry − acc_orig`` (top-1, as a fraction).
``finetune``
    LayerMerge's estimator. The entry-applied network is fine-tuned for ``steps``
    steps on a training split, then ``Δ`` is its metric change on a disjoint
    evaluation split (relative to the original model, not fine-tuned).
a callable ``score(model) -> float``
    ``Δ = score(entry-applied model) − score(original)``; both models are
    GraphModules in eval mode. Cached only when ``cache_key=`` is given.
``auto``
    ``loss`` when ``data`` yields ``(input, label)`` batches, else ``distortion``.

Reuse of what does not change (``distortion`` and ``loss``): each calibration
batch runs through the captured original graph once, under an Interpreter that
records every node's output by name (cloned, so a later in-place op cannot change
the record). An entry's linearized graph keeps the captured node names for
everything it did not touch; a node whose name, op, target, arguments (by name)
and module or attribute values are those of the original, and whose inputs are all
such nodes, computes exactly what it computed in the original run. That is every
node not downstream of the span's first new or rewired node; :class:`_Replay`
serves those from the record, so only the span and what follows it is computed per
entry. Values handed from the record to a recomputed node are cloned first, since
the record is shared by every entry and the node may write in place.

Cache and resume: every evaluated entry's Δ is written at once, atomically, to
``<cache_dir>/<sha>.json`` (default ``$FXMERGE_CACHE_DIR/importance``, else
``$XDG_CACHE_HOME/fxmerge/importance``, else ``~/.cache/fxmerge/importance``). The
key holds the span graph's fingerprint, the entry id, the estimator and its
options, a fingerprint of the model's state_dict values and one of the data, so an
interrupted build resumes with only the missing entries and a repeated build
evaluates nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_arg
from torch.utils._pytree import tree_leaves, tree_map
from tqdm.auto import tqdm

from fxmerge.capture import capture
from fxmerge.ir import Entry, SpanGraph
from fxmerge.latency.cache import write_atomic
from fxmerge.passes.linearize import linearize
from fxmerge.plan import Plan, PlanError

__all__ = ["ESTIMATORS", "ImportanceTable", "build_importance_table", "single_entry_plan"]

ESTIMATORS = ("auto", "distortion", "loss", "finetune")
FORMAT = "fxmerge.importance_table/1"
ENTRY_FORMAT = "fxmerge.importance.entry/1"
ORIGINAL = "<original>"  # cache id of a reference score that costs an evaluation of its own

_COMMON = {"batch_size": 64, "max_batches": None}
DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "distortion": MappingProxyType(
        {**_COMMON, "random_batches": 4, "seed": 0, "reuse": True, "cache_mb": 2048}
    ),
    "loss": MappingProxyType(
        {**_COMMON, "metric": "loss", "loss_fn": None, "reuse": True, "cache_mb": 2048}
    ),
    "finetune": MappingProxyType({
        **_COMMON,
        "steps": 50,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "optimizer": "sgd",
        "metric": "accuracy",
        "loss_fn": None,
        "reinit_single": True,
        "eval_fraction": 0.5,
        "eval_data": None,
        "seed": 0,
    }),
    "callable": MappingProxyType({}),
})
# options that never change a result (or enter the key another way)
_NOT_IN_KEY = frozenset({"reuse", "cache_mb", "eval_data"})
_METRICS = ("loss", "accuracy")


# --------------------------------------------------------------------------- the table
def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ImportanceTable:
    """Importance ``I = exp(Δ)`` of every entry id; ``I < 1`` is a drop, ``I == 1`` no change.

    ``estimator`` names how it was estimated; ``info`` holds the options, what data
    was used, the reference value of the original model, how many entries were
    evaluated, read from the cache or free, and the build time.
    """

    estimator: str
    entries: Mapping[str, float]
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", _frozen({str(k): float(v) for k, v in self.entries.items()}))
        object.__setattr__(self, "info", _frozen(self.info))

    def __getitem__(self, entry_id: str) -> float:
        return self.entries[entry_id]

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def delta(self, entry_id: str) -> float:
        """``Δ = log I`` of one entry (``-inf`` for an entry that broke the network)."""
        value = self.entries[entry_id]
        return math.log(value) if value > 0 else -math.inf

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "estimator": self.estimator,
            "entries": dict(self.entries),
            "info": json.loads(json.dumps(dict(self.info), default=str)),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ImportanceTable:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an importance table: format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            estimator=str(data["estimator"]),
            entries={str(k): float(v) for k, v in data["entries"].items()},
            info=dict(data.get("info", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- plans
def single_entry_plan(span_graph: SpanGraph, entry_id: str) -> Plan:
    """The plan that applies only ``entry_id``: every unit outside its span stays as it is."""
    entry = _entry_index(span_graph).get(entry_id)
    if entry is None:
        raise PlanError(f"entry {entry_id!r} is not in the span graph of {span_graph.model!r}")
    inside = set(span_graph.span(entry.span).units)
    chosen = [entry_id]
    for unit in span_graph.units:
        if unit.id not in inside:
            span = span_graph.single_unit_span(unit.id)
            keep = next((o for o in span.options if not o.pruned), None)
            if keep is None:
                raise PlanError(f"span {span.id!r} has no option that keeps every conv")
            chosen.append(f"{span.id}|{keep.id}")
    return Plan.from_entries(span_graph, chosen, method=f"single_entry({entry_id})")


def _entry_index(span_graph: SpanGraph) -> dict[str, Entry]:
    return {e.id: e for e in span_graph.entries}


def _is_identity(span_graph: SpanGraph, entry: Entry) -> bool:
    """One unit, nothing pruned, nothing absorbed: the entry is the original network."""
    span = span_graph.span(entry.span)
    return len(span.units) == 1 and not span.joins and not entry.option.pruned


# --------------------------------------------------------------------------- build
def build_importance_table(
    model: nn.Module,
    example_input,
    span_graph: SpanGraph,
    estimator: str | Callable[[nn.Module], float] = "auto",
    *,
    data=None,
    entries: Iterable[str] | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    cache_key: str | None = None,
    progress: bool = True,
    **options,
) -> ImportanceTable:
    """Estimate ``I = exp(Δ)`` for every entry of ``span_graph`` (see the module docstring).

    ``data``: an iterable of batches (a DataLoader, a list...), each an input batch
    or an ``(input, label)`` pair, or a map-style Dataset of ``(input, label)``
    items (batched by ``batch_size``). It is read once, up to ``max_batches``
    batches, and kept in memory. For a model with k > 1 inputs a batch is a
    k-tuple of tensors, or ``((x1, .., xk), label)``.

    ``entries``: build only these entry ids (default: every entry).
    ``cache_dir``: where entries are cached (default: see module docstring);
    ``False`` disables the cache. ``cache_key``: an extra string in every key;
    a user callable is cached only when it is given.

    Options (``**options``) and their defaults:

    * every built-in estimator: ``batch_size=64`` (batching a Dataset),
      ``max_batches=None`` (read every batch).
    * ``distortion``: ``random_batches=4``, ``seed=0`` (calibration inputs when
      ``data`` is None); ``reuse=True`` (serve the unchanged prefix from the
      original run); ``cache_mb=2048`` (memory for recorded activations; batches
      beyond it are evaluated with a full forward).
    * ``loss``: ``metric="loss"`` or ``"accuracy"``; ``loss_fn=None``
      (cross-entropy; else ``loss_fn(output, label) -> mean loss``); ``reuse``,
      ``cache_mb`` as above.
    * ``finetune``: ``steps=50``, ``optimizer="sgd"`` (momentum 0.9; or ``"adam"``,
      or ``callable(params, lr) -> Optimizer``), ``lr=0.01``, ``momentum=0.9``,
      ``weight_decay=0.0``, ``metric="accuracy"``, ``loss_fn=None``,
      ``reinit_single=True``, ``eval_fraction=0.5``, ``eval_data=None``,
      ``seed=0``. The training split is the first ``1 - eval_fraction`` of the
      batches (cycled for ``steps`` steps, BatchNorm in train mode), the evaluation
      split the rest, unless ``eval_data`` gives the evaluation batches (then every
      batch of ``data`` trains). With ``reinit_single`` a span that keeps exactly
      one conv re-initialises it (Kaiming normal, fan-out, bias zero) before
      fine-tuning, as the reference implementation does for spans pruned to one
      conv. Every parameter of the network is trained.
    """
    start = time.perf_counter()
    name, fn = _resolve_name(estimator)
    given = dict(options)
    options = _check_options(name, given)
    captured = capture(model, example_input)
    if captured.name != span_graph.model:
        raise PlanError(
            f"this span graph was made for model {span_graph.model!r}, not {captured.name!r}; "
            "analyze this model first"
        )
    base = captured.gm
    base.eval()
    inputs = captured.example_inputs
    device = _device_of(inputs, base)

    index = _entry_index(span_graph)
    if entries is None:
        wanted = list(index.values())
    else:
        ids = list(entries)
        unknown = [e for e in ids if e not in index]
        if unknown:
            raise KeyError(
                f"{len(unknown)} requested entries are not in the span graph of {span_graph.model!r} "
                f"(first: {unknown[0]!r})"
            )
        wanted = [index[e] for e in dict.fromkeys(ids)]

    # which estimator, on what data
    loaded = None
    if fn is None:
        loaded = _load_data(
            data,
            inputs,
            device,
            batch_size=options["batch_size"],
            max_batches=options["max_batches"],
            random_batches=options.get("random_batches", 0) if name in ("auto", "distortion") else 0,
            seed=options.get("seed", 0),
        )
        if name == "auto":
            name = "loss" if loaded.labelled else "distortion"
            why = "data= yields (input, label) batches" if loaded.labelled else "data= has no labels"
            options = _check_options(name, given, why=f"estimator='auto' chose {name!r}: {why}")
        if name in ("loss", "finetune") and not loaded.labelled:
            raise ValueError(_needs_labels(name, inputs, loaded))
    if name == "distortion":
        est: _Estimator = _Distortion(base, loaded, options)
    elif name == "loss":
        est = _Loss(base, loaded, options)
    elif name == "finetune":
        eval_loaded = None
        if options["eval_data"] is not None:
            eval_loaded = _load_data(
                options["eval_data"], inputs, device, batch_size=options["batch_size"],
                max_batches=options["max_batches"], random_batches=0, seed=0,
            )
            if not eval_loaded.labelled:
                raise ValueError(_needs_labels("finetune", inputs, eval_loaded, what="eval_data"))
        est = _Finetune(base, loaded, options, eval_loaded, span_graph)
    else:
        est = _UserScore(base, fn, span_graph, inputs)

    cache = None
    if cache_dir is not False and (fn is None or cache_key is not None):
        cache = _EntryCache(default_cache_dir() if cache_dir in (None, True) else cache_dir)
    key = {
        "format": ENTRY_FORMAT,
        "span_graph": span_graph.fingerprint,
        "model": _fingerprint(sorted(base.state_dict().items())),
        "estimator": "callable" if fn is not None else est.label,  # cache_key names the callable
        "options": _key_options(options),
        "data": est.data_fingerprint,
        "cache_key": cache_key,
    }

    apply = _Linearizer(base, inputs, span_graph)
    values: dict[str, float] = {}
    nonfinite: list[str] = []
    todo = [e for e in wanted if not _is_identity(span_graph, e)]
    for entry in wanted:
        if _is_identity(span_graph, entry):
            values[entry.id] = 1.0
    evaluated = cached = 0
    bar = tqdm(total=len(todo), desc=f"importance ({est.label})", unit="entry", disable=not progress, leave=False)
    with bar:
        for entry in todo:
            fields = {**key, "entry": entry.id}
            delta = cache.get(fields) if cache else None
            if delta is None:
                began = time.perf_counter()
                est.prepare(cache, key)
                gm = apply(single_entry_plan(span_graph, entry.id), shared=est.shares_parameters)
                delta = float(est.delta(gm, entry))
                del gm
                if cache:
                    cache.put(fields, delta, time.perf_counter() - began)
                evaluated += 1
            else:
                cached += 1
            if not math.isfinite(delta):
                nonfinite.append(entry.id)
            values[entry.id] = _importance(delta)
            bar.set_postfix(evaluated=evaluated, cached=cached, refresh=False)
            bar.update()

    info = {
        "span_graph": span_graph.fingerprint,
        "options": _key_options(options),
        "data": est.description,
        "reference": est.reference,
        "evaluated": evaluated,
        "cached": cached,
        "identity": len(wanted) - len(todo),
        "nonfinite": nonfinite,
        "cache_dir": str(cache.directory) if cache else None,
        "seconds": time.perf_counter() - start,
        **est.stats(),
    }
    if apply.fallback:
        info["shared_linearize_failed"] = apply.fallback
    return ImportanceTable(estimator=est.label, entries={e.id: values[e.id] for e in wanted}, info=info)


def _importance(delta: float) -> float:
    """``exp(Δ)``; a NaN (a broken network) scores 0, overflow is capped."""
    if math.isnan(delta):
        return 0.0
    return math.exp(min(delta, 50.0))


def _resolve_name(estimator) -> tuple[str, Callable | None]:
    if callable(estimator) and not isinstance(estimator, str):
        return "callable", estimator
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown importance estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}, "
            "or pass a callable (model) -> float score"
        )
    return estimator, None


def _check_options(name: str, options: Mapping, why: str = "") -> dict:
    if name == "auto":
        allowed = {**DEFAULTS["distortion"], **DEFAULTS["loss"]}
    else:
        allowed = dict(DEFAULTS[name])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        because = f" ({why})" if why else ""
        raise TypeError(
            f"unknown option(s) {unknown} for importance estimator {name!r}{because}; valid options: {valid}"
        )
    merged = {**allowed, **options}
    if "metric" in merged and merged["metric"] not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {merged['metric']!r}")
    if name == "finetune":
        if int(merged["steps"]) < 0:
            raise ValueError(f"steps must be >= 0, got {merged['steps']!r}")
        if not 0 < float(merged["eval_fraction"]) < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {merged['eval_fraction']!r}")
        if not (callable(merged["optimizer"]) or merged["optimizer"] in ("sgd", "adam")):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable (params, lr), got {merged['optimizer']!r}")
    return merged


def _key_options(options: Mapping) -> dict:
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if callable(value):
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
        return repr(value)

    return {k: plain(v) for k, v in sorted(options.items()) if k not in _NOT_IN_KEY}


def _device_of(inputs: tuple, module: nn.Module) -> torch.device:
    for value in inputs:
        if isinstance(value, Tensor):
            return value.device
    for value in module.parameters():
        return value.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- data
@dataclass
class _Batch:
    inputs: tuple
    label: Tensor | None

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and isinstance(self.inputs[0], Tensor) else 1


@dataclass
class _Data:
    batches: list[_Batch]
    labelled: bool
    description: str
    fingerprint: str


_INPUT_KEYS = ("input", "inputs", "image", "images", "x")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def _batch_form(example_inputs: tuple) -> str:
    if len(example_inputs) == 1:
        return "a tensor batch x, or a pair (x, label)"
    k = len(example_inputs)
    return f"a {k}-tuple of tensors (x1, .., x{k}), or ((x1, .., x{k}), label)"


def _parse_batch(batch, example_inputs: tuple, device: torch.device) -> _Batch:
    k = len(example_inputs)
    inputs = label = None
    if isinstance(batch, Tensor) and k == 1:
        inputs = (batch,)
    elif isinstance(batch, Mapping):
        x = next((batch[key] for key in _INPUT_KEYS if key in batch), None)
        if x is not None:
            inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            label = next((batch[key] for key in _LABEL_KEYS if key in batch), None)
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
        if k == 1 and len(items) in (1, 2) and isinstance(items[0], Tensor):
            inputs = (items[0],)
            label = items[1] if len(items) == 2 else None
        elif k > 1 and len(items) == k and all(isinstance(t, Tensor) for t in items):
            inputs = tuple(items)
        elif k > 1 and len(items) == 2 and isinstance(items[0], (tuple, list)) and len(items[0]) == k:
            inputs, label = tuple(items[0]), items[1]
    if inputs is None or len(inputs) != k:
        raise ValueError(
            f"cannot read a batch of type {type(batch).__name__} as model input: each batch of data= "
            f"must be {_batch_form(example_inputs)}"
        )
    inputs = tuple(t.to(device) if isinstance(t, Tensor) else t for t in inputs)
    if label is not None:
        label = torch.as_tensor(label).to(device)
    return _Batch(inputs, label)


def _load_data(data, example_inputs: tuple, device, *, batch_size, max_batches, random_batches, seed) -> _Data:
    """Read ``data`` once into a list of batches (or draw random ones when it is None)."""
    if data is None:
        generator = torch.Generator().manual_seed(int(seed))
        batches = []
        for _ in range(max(int(random_batches), 1)):
            inputs = tuple(
                torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                if isinstance(t, Tensor) and t.is_floating_point() else t
                for t in example_inputs
            )
            batches.append(_Batch(inputs, None))
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, Tensor)]
        return _Data(
            batches,
            False,
            f"{len(batches)} random standard-normal batches shaped like example_input {shapes} "
            f"(seed {seed}); no data= given, pass real inputs for a meaningful estimate",
            _data_fingerprint(batches),
        )
    if isinstance(data, Tensor):
        source: Iterable = [data]
    elif isinstance(data, torch.utils.data.DataLoader):
        source = data
    elif isinstance(data, torch.utils.data.Dataset):
        source = torch.utils.data.DataLoader(data, batch_size=int(batch_size), shuffle=False)
    elif isinstance(data, Iterable):
        source = data
    else:
        raise TypeError(
            f"data must be an iterable of batches (each {_batch_form(example_inputs)}), a DataLoader or "
            f"a Dataset; got {type(data).__name__}"
        )
    batches = []
    for batch in source:
        if max_batches is not None and len(batches) >= int(max_batches):
            break
        batches.append(_parse_batch(batch, example_inputs, device))
    if not batches:
        raise ValueError("data= yielded no batches")
    labelled = {b.label is not None for b in batches}
    if len(labelled) > 1:
        raise ValueError("data= mixes labelled (input, label) batches with unlabelled ones")
    is_labelled = labelled.pop()
    samples = sum(b.size for b in batches)
    kind = "labelled" if is_labelled else "unlabelled"
    return _Data(batches, is_labelled, f"{len(batches)} {kind} batches, {samples} samples", _data_fingerprint(batches))


def _needs_labels(name: str, example_inputs: tuple, loaded: _Data | None, what: str = "data") -> str:
    got = "no data" if loaded is None or "random" in loaded.description else "unlabelled batches"
    return (
        f"importance estimator {name!r} needs labelled data, got {got}: pass {what}= as an iterable of "
        f"(input, label) batches — e.g. a DataLoader over a Dataset whose items are (input, label) — "
        f"where each batch is {_batch_form(example_inputs)} and label holds class indices "
        f"(input batch shaped like {[tuple(t.shape) for t in example_inputs if isinstance(t, Tensor)]}). "
        "Without labels, use estimator='distortion'."
    )


# --------------------------------------------------------------------------- fingerprints
def _digest(h, tensor: Tensor) -> None:
    """Shape, dtype, two float64 sums (rounded, so thread counts do not matter) and a strided sample."""
    t = tensor.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel() == 0:
        return
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.reshape(-1)
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    sums = (flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64))
    h.update(" ".join(f"{float(v):.9g}" for v in sums).encode())
    sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float64).cpu()
    h.update(sample.numpy().tobytes())


def _fingerprint(named: Iterable[tuple[str, Any]]) -> str:
    """A hash of summary statistics of every tensor (order- and position-sensitive)."""
    h = hashlib.sha256()
    for name, value in named:
        h.update(f"{name}:".encode())
        if isinstance(value, Tensor):
            _digest(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:32]


def _data_fingerprint(batches: list[_Batch]) -> str:
    def items():
        for k, batch in enumerate(batches):
            for j, t in enumerate(batch.inputs):
                yield f"{k}.{j}", t
            yield f"{k}.label", batch.label

    return _fingerprint(items())


# --------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """Where importance entries are cached unless told otherwise."""
    root = os.environ.get("FXMERGE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "importance"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fxmerge" / "importance"


class _EntryCache:
    """One small JSON file per (key, entry): Δ and how long it took."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, fields: dict) -> Path:
        payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return self.directory / f"{hashlib.sha256(payload.encode()).hexdigest()[:40]}.json"

    def get(self, fields: dict) -> float | None:
        try:
            data = json.loads(self.path(fields).read_text())
            if data.get("format") != ENTRY_FORMAT or data.get("key") != json.loads(json.dumps(fields)):
                return None
            return float(data["delta"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, fields: dict, delta: float, seconds: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = delta if math.isfinite(delta) else str(delta)  # "nan" / "-inf": JSON has no such numbers
        payload = {"format": ENTRY_FORMAT, "key": fields, "delta": stored, "seconds": seconds}
        write_atomic(self.path(fields), json.dumps(payload, indent=1, sort_keys=True))




# --------------------------------------------------------------------------- linearize
class _Linearizer:
    """Applies plans to the captured graph.

    ``shared=False`` is :func:`~fxmerge.passes.linearize.linearize` itself: a
    network with its own copy of every parameter (fine-tuning, user callables).
    ``shared=True`` (evaluation only) runs ``linearize`` on a copy of the captured
    model whose tensors live on the ``meta`` device — the rewrite only reads
    shapes, so nothing of size is copied — and binds the rewritten graph to the
    captured model's own modules and parameters. Should that fail for some graph
    (a tensor constant the meta device cannot stand in for), it falls back to the
    copying path for the rest of the build and says why in ``fallback``.
    """

    def __init__(self, base: torch.fx.GraphModule, inputs: tuple, span_graph: SpanGraph) -> None:
        self.base = base
        self.inputs = inputs
        self.span_graph = span_graph
        self.fallback: str | None = None
        self._shell: torch.fx.GraphModule | None = None

    def __call__(self, plan: Plan, *, shared: bool) -> torch.fx.GraphModule:
        if shared and self.fallback is None:
            try:
                return self._shared(plan)
            except Exception as exc:  # noqa: BLE001 - the copying path always works
                self.fallback = f"{type(exc).__name__}: {exc}"
        return linearize(self.base, self.inputs, plan, span_graph=self.span_graph)

    def _shared(self, plan: Plan) -> torch.fx.GraphModule:
        if self._shell is None:
            memo = {
                id(t): (nn.Parameter(t.to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else t.to("meta"))
                for t in (*self.base.parameters(), *self.base.buffers())
            }
            self._shell = copy.deepcopy(self.base, memo)
        meta_inputs = tuple(t.to("meta") if isinstance(t, Tensor) else t for t in self.inputs)
        rewritten = linearize(self._shell, meta_inputs, plan, span_graph=self.span_graph)
        gm = torch.fx.GraphModule(self.base, copy.deepcopy(rewritten.graph), type(self.base).__name__)
        gm.fxmerge_plan = plan
        gm.fxmerge_span_graph = self.span_graph
        return gm.eval()


# --------------------------------------------------------------------------- reuse
def _clone(value):
    return value.clone() if isinstance(value, Tensor) else value


class _Recorder(torch.fx.Interpreter):
    """Runs the original graph and keeps a copy of every node's output, by node name."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.op not in ("placeholder", "get_attr", "output"):
            self.values[n.name] = tree_map(_clone, result)  # before a later in-place op changes it
        return result


class _Replay(torch.fx.Interpreter):
    """Runs a linearized graph; nodes in ``reusable`` take their recorded value."""

    def __init__(self, gm: torch.fx.GraphModule, values: Mapping[str, Any], reusable: frozenset[str]) -> None:
        super().__init__(gm)
        self.values = values
        self.reusable = reusable

    def run_node(self, n: torch.fx.Node):
        if n.name in self.reusable:
            return self.values[n.name]
        with self._set_current_node(n):
            args = map_arg(n.args, self._load)
            kwargs = map_arg(n.kwargs, self._load)
            return getattr(self, n.op)(n.target, args, kwargs)

    def _load(self, arg: torch.fx.Node):
        value = self.env[arg]
        if arg.name in self.reusable or arg.op == "placeholder":
            return tree_map(_clone, value)  # shared by every entry: the consumer may write in place
        return value


def _fetch(module: nn.Module, path: str):
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _same(a, b) -> bool:
    """Structural equality of node arguments, nodes compared by name."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (
            isinstance(a, (tuple, list)) and isinstance(b, (tuple, list))
            and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return _same_tensor(a, b)
    if isinstance(a, slice) and isinstance(b, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable means different
        return False


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
        and a.device == b.device and torch.equal(a, b)
    )


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    sa.update(a.named_buffers())
    sb.update(b.named_buffers())
    return sa.keys() == sb.keys() and all(_same_tensor(sa[k], sb[k]) for k in sa)


def reusable_nodes(gm: torch.fx.GraphModule, original: torch.fx.GraphModule) -> frozenset[str]:
    """Names of ``gm``'s nodes that compute exactly what the same-named node of ``original`` did.

    A node qualifies when it exists in ``original`` under the same name with the same
    op, target and arguments (nodes compared by name), its module or attribute has
    the same values, and every node it reads qualifies (or is a placeholder, or a
    ``get_attr`` of equal value). That excludes everything downstream of the first
    node the rewrite added or changed. Placeholders and ``get_attr`` nodes are never
    served from a record, so they are not in the result.
    """
    before = {n.name: n for n in original.graph.nodes}
    ok: set[str] = set()
    result: set[str] = set()
    for node in gm.graph.nodes:
        old = before.get(node.name)
        if old is None or old.op != node.op or old.target != node.target or node.op == "output":
            continue
        if node.op == "placeholder":
            ok.add(node.name)
            continue
        if node.op == "get_attr":
            try:
                same = _same(_fetch(gm, node.target), _fetch(original, node.target))
            except AttributeError:
                same = False
            if same:
                ok.add(node.name)
            continue
        if node.op == "call_module":
            try:
                if not _same_module(gm.get_submodule(node.target), original.get_submodule(node.target)):
                    continue
            except AttributeError:
                continue
        if not all(arg.name in ok for arg in node.all_input_nodes):
            continue
        if not _same((node.args, node.kwargs), (old.args, old.kwargs)):
            continue
        ok.add(node.name)
        result.add(node.name)
    return frozenset(result)


# --------------------------------------------------------------------------- outputs
def _tensors(output) -> list[Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, Tensor) and t.is_floating_point()]


def _first_tensor(output) -> Tensor:
    found = _tensors(output)
    if not found:
        raise ValueError(f"the model's output ({type(output).__name__}) holds no floating tensor")
    return found[0]


class _Divergence:
    """Accumulates ``KL`` (2-D outputs) or relative squared error over batches, per output tensor."""

    def __init__(self) -> None:
        self.parts: dict[int, list[float]] = {}

    def add(self, reference, output) -> None:
        for k, (ref, out) in enumerate(zip(_tensors(reference), _tensors(output))):
            part = self.parts.setdefault(k, [0.0, 0.0])
            ref64, out64 = ref.detach().double(), out.detach().double()
            if ref.dim() == 2:
                p = F.log_softmax(ref64, dim=1)
                q = F.log_softmax(out64, dim=1)
                part[0] += float((p.exp() * (p - q)).sum())
                part[1] += ref.shape[0]
            else:
                part[0] += float(((out64 - ref64) ** 2).sum())
                part[1] += float((ref64**2).sum())

    def value(self) -> float:
        return math.fsum(num / den if den > 0 else (0.0 if num == 0 else math.inf) for num, den in self.parts.values())


def _evaluate(outputs: Iterable[tuple[Any, _Batch]], metric: str, loss_fn) -> float:
    """Mean loss or top-1 accuracy over ``(output, batch)`` pairs, weighted by batch size."""
    total = count = 0.0
    for output, batch in outputs:
        logits = _first_tensor(output)
        n = batch.size
        if metric == "accuracy":
            total += float((logits.argmax(dim=1) == batch.label).sum())
        else:
            total += float((loss_fn or F.cross_entropy)(logits, batch.label)) * n
        count += n
    return total / count


def _signed(metric: str, value: float, reference: float) -> float:
    """Δ: a higher loss or a lower accuracy is a drop."""
    return -(value - reference) if metric == "loss" else value - reference


# --------------------------------------------------------------------------- estimators
class _Estimator:
    label: str = ""
    shares_parameters = False  # evaluation only: the entry's network may share the original's tensors
    reference: float | None = None
    description: str = ""
    data_fingerprint: str | None = None

    def prepare(self, cache: _EntryCache | None, key: dict) -> None:  # pragma: no cover - interface
        """Called before the first entry that is not cached (not at all if all are)."""

    def delta(self, gm: torch.fx.GraphModule, entry: Entry) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def stats(self) -> dict:
        return {}


class _Recorded(_Estimator):
    """Distortion and loss: each batch's original run is recorded once and replayed per entry."""

    shares_parameters = True

    def __init__(self, base: torch.fx.GraphModule, data: _Data, options: Mapping) -> None:
        self.base = base
        self.data = data
        self.options = options
        self.description = data.description
        self.data_fingerprint = data.fingerprint
        self.records: list[tuple[_Batch, Any, dict | None]] | None = None
        self.reused = self.nodes = 0

    def prepare(self, cache, key) -> None:
        if self.records is not None:
            return
        budget = float(self.options["cache_mb"]) * 2**20
        used = 0.0
        self.records = []
        with torch.no_grad():
            for batch in self.data.batches:
                values = None
                if self.options["reuse"] and used < budget:
                    recorder = _Recorder(self.base)
                    output = recorder.run(*batch.inputs)
                    used += sum(t.nbytes for t in tree_leaves(recorder.values) if isinstance(t, Tensor))
                    values = recorder.values if used <= budget else None
                else:
                    output = self.base(*batch.inputs)
                self.records.append((batch, tree_map(_clone, output), values))
        self.recorded_batches = sum(values is not None for _, _, values in self.records)
        self.on_recorded()

    def on_recorded(self) -> None:
        pass

    def outputs(self, gm: torch.fx.GraphModule):
        """``(reference output, entry output, batch)`` for every batch."""
        gm.eval()
        reusable = reusable_nodes(gm, self.base) if self.options["reuse"] else frozenset()
        self.reused += len(reusable)
        self.nodes += sum(n.op not in ("placeholder", "get_attr", "output") for n in gm.graph.nodes)
        with torch.no_grad():
            for batch, reference, values in self.records:
                if values is not None and reusable:
                    output = _Replay(gm, values, reusable).run(*batch.inputs)
                else:
                    output = gm(*batch.inputs)
                yield reference, output, batch

    def stats(self) -> dict:
        if self.records is None:
            return {}
        return {
            "recorded_batches": self.recorded_batches,
            "reused_nodes": self.reused / self.nodes if self.nodes else 0.0,
        }


class _Distortion(_Recorded):
    label = "distortion"

    def __init__(self, base, data, options) -> None:
        super().__init__(base, data, options)
        self.reference = 0.0

    def delta(self, gm, entry) -> float:
        divergence = _Divergence()
        for reference, output, _ in self.outputs(gm):
            divergence.add(reference, output)
        return -divergence.value()


class _Loss(_Recorded):
    label = "loss"

    def on_recorded(self) -> None:
        self.reference = _evaluate(
            ((ref, batch) for batch, ref, _ in self.records), self.options["metric"], self.options["loss_fn"]
        )

    def delta(self, gm, entry) -> float:
        metric = self.options["metric"]
        value = _evaluate(((out, batch) for _, out, batch in self.outputs(gm)), metric, self.options["loss_fn"])
        return _signed(metric, value, self.reference)


class _Finetune(_Estimator):
    label = "finetune"

    def __init__(self, base, data: _Data, options, eval_data: _Data | None, span_graph: SpanGraph) -> None:
        self.base = base
        self.options = options
        self.span_graph = span_graph
        if eval_data is not None:
            self.train, self.eval = data.batches, eval_data.batches
            self.data_fingerprint = f"{data.fingerprint}+{eval_data.fingerprint}"
        else:
            n = len(data.batches)
            n_eval = math.ceil(n * float(options["eval_fraction"]))
            if n < 2 or n_eval >= n:
                raise ValueError(
                    f"finetune needs at least 2 batches to split into a training and an evaluation part "
                    f"(got {n}); pass more data, a smaller batch_size, or eval_data="
                )
            self.train, self.eval = data.batches[: n - n_eval], data.batches[n - n_eval :]
            self.data_fingerprint = f"{data.fingerprint}/{options['eval_fraction']}"
        samples = sum(b.size for b in self.train), sum(b.size for b in self.eval)
        self.description = (
            f"fine-tune on {len(self.train)} batches ({samples[0]} samples), "
            f"evaluate on {len(self.eval)} batches ({samples[1]} samples)"
        )
        self.reinitialised = 0

    def _metric(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return _evaluate(((model(*b.inputs), b) for b in self.eval), self.options["metric"], self.options["loss_fn"])

    def prepare(self, cache, key) -> None:
        if self.reference is None:
            self.reference = self._metric(self.base)

    def _optimizer(self, params: list) -> torch.optim.Optimizer:
        opt, lr = self.options["optimizer"], float(self.options["lr"])
        if callable(opt):
            return opt(params, lr)
        if opt == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=float(self.options["weight_decay"]))
        return torch.optim.SGD(
            params, lr=lr, momentum=float(self.options["momentum"]), weight_decay=float(self.options["weight_decay"])
        )

    def _reinit(self, gm: torch.fx.GraphModule, entry: Entry, generator: torch.Generator) -> None:
        span = self.span_graph.span(entry.span)
        kept = [u for u in span.units if u not in entry.option.pruned]
        if len(kept) != 1:
            return
        found = _conv_parameters(self.base, self.span_graph.unit(kept[0]).conv_node)
        if found is None:
            return
        weight_path, bias_path = found
        with torch.no_grad():
            weight = _fetch(gm, weight_path)
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if bias_path is not None:
                _fetch(gm, bias_path).zero_()
        self.reinitialised += 1

    def delta(self, gm, entry) -> float:
        seed = int(self.options["seed"]) + int(hashlib.sha256(entry.id.encode()).hexdigest()[:8], 16)
        device = next((t.device for t in self.train[0].inputs if isinstance(t, Tensor)), torch.device("cpu"))
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if self.options["reinit_single"]:
                self._reinit(gm, entry, torch.Generator(device=device).manual_seed(seed))
            params = list(gm.parameters())
            for p in params:
                p.requires_grad_(True)
            optimizer = self._optimizer(params)
            loss_fn = self.options["loss_fn"] or F.cross_entropy
            gm.train()
            with torch.enable_grad():
                for step in range(int(self.options["steps"])):
                    batch = self.train[step % len(self.train)]
                    loss = loss_fn(_first_tensor(gm(*batch.inputs)), batch.label)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            value = self._metric(gm)
        return _signed(self.options["metric"], value, self.reference)

    def stats(self) -> dict:
        return {"reinitialised": self.reinitialised}


def _conv_parameters(base: torch.fx.GraphModule, conv_node: str) -> tuple[str, str | None] | None:
    """Attribute paths of a conv call site's weight and bias, in any graph form."""
    node = next((n for n in base.graph.nodes if n.name == conv_node), None)
    if node is None:
        return None
    if node.op == "call_module":
        module = base.get_submodule(node.target)
        bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
        return f"{node.target}.weight", bias
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    bias_path = bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None
    return weight.target, bias_path


class _UserScore(_Estimator):
    """A user's ``score(model) -> float``; the original is scored once (and cached with the entries)."""

    def __init__(self, base, fn: Callable, span_graph: SpanGraph, inputs: tuple) -> None:
        self.base = base
        self.fn = fn
        self.span_graph = span_graph
        self.inputs = inputs
        self.label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
        self.description = "user callable (data= is not used)"

    def prepare(self, cache, key) -> None:
        if self.reference is not None:
            return
        fields = {**key, "entry": ORIGINAL}
        value = cache.get(fields) if cache else None
        if value is None:
            began = time.perf_counter()
            original = linearize(self.base, self.inputs, Plan.keep_all(self.span_graph), span_graph=self.span_graph)
            value = float(self.fn(original.eval()))
            if cache:
                cache.put(fields, value, time.perf_counter() - began)
        self.reference = value

    def delta(self, gm, entry) -> float:
        return float(self.fn(gm.eval())) - self.reference

