"""Importance: what each entry (span, option) of a span graph costs in accuracy.

Every estimator gives each entry a change ``Δ`` relative to the unmodified model,
measured on the network that applies *only that entry* (:func:`single_entry_plan`:
the entry, and every other unit kept as it is), and stores it as ``I = exp(Δ)``.
A drop gives ``I < 1``. The solver maximises the sum of ``I`` over a plan's entries.
An entry whose span holds one unit and prunes nothing *is* the original network,
so it gets ``Δ = 0`` (``I = 1`` exactly) without being evaluated — except under
``paper``, which re-initialises that conv and evaluates it.

Estimators (:data:`ESTIMATORS`, one module each):

``distortion`` (:mod:`.distortion`)
    No labels needed: ``Δ = −D``, the divergence of the entry's output from the
    original's on calibration inputs (``data``, else seeded random batches).
``loss`` (:mod:`.loss`)
    Labelled data, no training: the change of the loss, or of top-1 accuracy.
``finetune`` (:mod:`.finetune`)
    A cheap LayerMerge-style estimator: fine-tune the entry's network for a few
    steps, then measure its metric change on a disjoint evaluation split.
``paper`` (:mod:`.paper`)
    The LayerMerge reference's estimator: one epoch of SGD on a holdout-train split,
    the accuracy (or relative loss) change on a disjoint holdout-val split
    (:mod:`.holdout`); spans of one conv re-initialised and evaluated.
a callable ``score(model) -> float`` (:mod:`.user`)
    ``Δ = score(entry-applied model) − score(original)``.
``auto``
    ``loss`` when ``data`` yields ``(input, label)`` batches, else ``distortion``.

The rest of the package: :mod:`.table` (the table, the build loop, and its
sharding across the processes of a ``torchrun`` group), :mod:`.tuning` (what the
training estimators share),
:mod:`.entries` (which entries, and the plan of one), :mod:`.factory` (estimator
names, options and defaults), :mod:`.data` (reading ``data=``), :mod:`.replay`
(recording the original run once and serving every unchanged node from it),
:mod:`.keys` (cache keys and fingerprints), :mod:`.base` (the estimator interface).

Entries are linearized from the one captured graph: estimators that only evaluate
share the captured model's parameters, ``finetune``, ``paper`` and a user callable
get their own copy. Every evaluated entry's ``Δ`` is cached at once, atomically, under a key
of the span graph, the entry, the estimator and its options, the model's weights,
the data and ``cache_key``: an interrupted build resumes with only the missing
entries and a repeated build evaluates nothing.
"""

from fxmerge.importance.entries import single_entry_plan
from fxmerge.importance.factory import DEFAULTS, ESTIMATORS
from fxmerge.importance.keys import default_cache_dir
from fxmerge.importance.replay import Recorder, Replay, reusable_nodes
from fxmerge.importance.table import ImportanceTable, build_importance_table

__all__ = [
    "DEFAULTS",
    "ESTIMATORS",
    "ImportanceTable",
    "Recorder",
    "Replay",
    "build_importance_table",
    "default_cache_dir",
    "reusable_nodes",
    "single_entry_plan",
]
