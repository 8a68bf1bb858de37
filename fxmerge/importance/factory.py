"""Which estimator, with which options, on what data.

:func:`make_estimator` resolves the estimator name (``auto`` becomes ``loss`` when
``data`` yields ``(input, label)`` batches, else ``distortion``), checks the options
against :data:`DEFAULTS` (an unknown option is an error that lists the valid ones),
reads the data once, and builds the estimator. Options and their defaults:

* every built-in estimator: ``batch_size=64`` (batching a Dataset),
  ``max_batches=None`` (read every batch).
* ``distortion``: ``random_batches=4``, ``seed=0`` (calibration inputs when ``data``
  is None); ``reuse=True`` (serve the unchanged prefix from the original run);
  ``cache_mb=2048`` (memory for recorded activations; batches beyond it are
  evaluated with a full forward).
* ``loss``: ``metric="loss"`` or ``"accuracy"``; ``loss_fn=None``, ``seed=0``;
  ``reuse``, ``cache_mb`` as above.
* ``finetune``: ``steps=50``, ``optimizer="sgd"`` (or ``"adam"``, or
  ``callable(params, lr) -> Optimizer``), ``lr=0.01``, ``momentum=0.9``,
  ``weight_decay=0.0``, ``metric="accuracy"``, ``loss_fn=None``,
  ``reinit_single=True``, ``eval_fraction=0.5``, ``eval_data=None``, ``seed=0``
  (see :mod:`fxmerge.importance.finetune`).
* ``paper``: ``epochs=1``, ``lr=0.01``, ``momentum=0.9``, ``weight_decay=1e-5``,
  ``nesterov=True``, ``schedule="cos"`` (or ``"const"``), ``metric="auto"``
  (``"accuracy"`` without ``loss_fn``, ``"loss"`` with one), ``loss_fn=None``,
  ``reinit_single=True``, ``holdout_train=None``,
  ``holdout_val=0.5``, ``eval_data=None``, ``seed=0`` (see :mod:`fxmerge.importance.paper`
  and :mod:`fxmerge.importance.holdout`).
* a callable: no options.

``loss_fn(model, batch) -> scalar`` means the same to ``loss``, ``finetune`` and
``paper`` (:data:`fxmerge.importance.base.BatchLoss`): the loss of one batch as
``data=`` gives it, for a task that is not classification (the batches then need no
labels). It trains the ``finetune`` and ``paper`` networks, and ``Δ`` becomes the
relative change of its mean, ``−(L_entry − L_orig) / L_orig``, measured with torch's
RNG at ``seed`` so that a loss drawing noise gives every entry the same draws.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from fxmerge.capture import Captured
from fxmerge.importance.base import Estimator
from fxmerge.importance.data import Data, device_of, load_data, needs_labels
from fxmerge.importance.distortion import Distortion
from fxmerge.importance.finetune import Finetune
from fxmerge.importance.holdout import make_holdout
from fxmerge.importance.loss import Loss
from fxmerge.importance.paper import Paper
from fxmerge.importance.user import UserScore
from fxmerge.ir import SpanGraph

_WITH_LOSS_FN = " Or pass loss_fn=(model, batch) -> loss with data= batches for a task without labels."
ESTIMATORS = ("auto", "distortion", "loss", "finetune", "paper")
METRICS = ("loss", "accuracy")

_COMMON = {"batch_size": 64, "max_batches": None}
DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "distortion": MappingProxyType({**_COMMON, "random_batches": 4, "seed": 0, "reuse": True, "cache_mb": 2048}),
        "loss": MappingProxyType(
            {**_COMMON, "metric": "loss", "loss_fn": None, "seed": 0, "reuse": True, "cache_mb": 2048}
        ),
        "finetune": MappingProxyType(
            {
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
            }
        ),
        "paper": MappingProxyType(
            {
                **_COMMON,
                "epochs": 1,
                "lr": 0.01,
                "momentum": 0.9,
                "weight_decay": 1e-5,
                "nesterov": True,
                "schedule": "cos",
                "metric": "auto",
                "loss_fn": None,
                "reinit_single": True,
                "holdout_train": None,
                "holdout_val": 0.5,
                "eval_data": None,
                "seed": 0,
            }
        ),
        "callable": MappingProxyType({}),
    }
)


def resolve_name(estimator: str | Callable) -> tuple[str, Callable | None]:
    """``(name, callable)``: ``("callable", fn)`` for a user callable, else the checked name."""
    if callable(estimator) and not isinstance(estimator, str):
        return "callable", estimator
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown importance estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}, "
            "or pass a callable (model) -> float score"
        )
    return estimator, None


def check_options(name: str, options: Mapping[str, Any], why: str = "") -> dict:
    """``options`` over the defaults of estimator ``name``; unknown or invalid ones raise."""
    allowed = {**DEFAULTS["distortion"], **DEFAULTS["loss"]} if name == "auto" else dict(DEFAULTS[name])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        because = f" ({why})" if why else ""
        raise TypeError(
            f"unknown option(s) {unknown} for importance estimator {name!r}{because}; valid options: {valid}"
        )
    merged = {**allowed, **options}
    metrics = (*METRICS, "auto") if name == "paper" else METRICS
    if "metric" in merged and merged["metric"] not in metrics:
        raise ValueError(f"metric must be one of {metrics}, got {merged['metric']!r}")
    if merged.get("loss_fn") is not None and not callable(merged["loss_fn"]):
        raise TypeError("loss_fn must be a callable (model, batch) -> scalar loss")
    if name == "paper":
        _check_paper(merged)
    if name == "finetune":
        if int(merged["steps"]) < 0:
            raise ValueError(f"steps must be >= 0, got {merged['steps']!r}")
        if not 0 < float(merged["eval_fraction"]) < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {merged['eval_fraction']!r}")
        if not (callable(merged["optimizer"]) or merged["optimizer"] in ("sgd", "adam")):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable (params, lr), got {merged['optimizer']!r}")
    return merged


def _check_paper(options: Mapping[str, Any]) -> None:
    if int(options["epochs"]) < 1:
        raise ValueError(f"epochs must be >= 1, got {options['epochs']!r}")
    if options["schedule"] not in ("cos", "const"):
        raise ValueError(f"schedule must be 'cos' or 'const', got {options['schedule']!r}")


def make_estimator(
    estimator: str | Callable,
    captured: Captured,
    span_graph: SpanGraph,
    data: Any,
    given: Mapping[str, Any],
) -> Estimator:
    """The estimator ``estimator`` names, with options ``given`` checked, reading ``data`` once."""
    name, fn = resolve_name(estimator)
    options = check_options(name, given)
    if fn is not None:
        return UserScore(captured, span_graph, fn)
    if name == "paper":
        return _paper(captured, span_graph, data, options)
    loaded = _load(data, captured, options, random_batches=name in ("auto", "distortion"))
    if name == "auto":
        name = "loss" if loaded.labelled else "distortion"
        why = "data= yields (input, label) batches" if loaded.labelled else "data= has no labels"
        options = check_options(name, given, why=f"estimator='auto' chose {name!r}: {why}")
    user_loss = options.get("loss_fn") is not None
    if name in ("loss", "finetune") and not loaded.labelled and not user_loss:
        raise ValueError(needs_labels(name, captured.example_inputs, loaded) + _WITH_LOSS_FN)
    if name == "distortion":
        return Distortion(captured, span_graph, options, loaded)
    if name == "loss":
        return Loss(captured, span_graph, options, loaded)
    eval_loaded = None
    if options["eval_data"] is not None:
        eval_loaded = _load(options["eval_data"], captured, options, random_batches=False)
        if not eval_loaded.labelled and not user_loss:
            raise ValueError(needs_labels("finetune", captured.example_inputs, eval_loaded, what="eval_data"))
    return Finetune(captured, span_graph, options, loaded, eval_loaded)


def _paper(captured: Captured, span_graph: SpanGraph, data: Any, options: Mapping[str, Any]) -> Paper:
    if data is None:
        raise ValueError(needs_labels("paper", captured.example_inputs, None) + _WITH_LOSS_FN)
    device = device_of(captured.example_inputs, captured.gm)
    holdout = make_holdout(
        data,
        options["eval_data"],
        device,
        holdout_train=options["holdout_train"],
        holdout_val=options["holdout_val"],
        batch_size=options["batch_size"],
        max_batches=options["max_batches"],
        seed=options["seed"],
    )
    return Paper(captured, span_graph, options, holdout, device)


def _load(data: Any, captured: Captured, options: Mapping[str, Any], *, random_batches: bool) -> Data:
    inputs = captured.example_inputs
    return load_data(
        data,
        inputs,
        device_of(inputs, captured.gm),
        batch_size=options["batch_size"],
        max_batches=options["max_batches"],
        random_batches=options.get("random_batches", 0) if random_batches else 0,
        seed=options.get("seed", 0) if random_batches else 0,
    )
