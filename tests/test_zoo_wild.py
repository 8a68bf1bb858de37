"""Models as users hold them: timm CNNs, segmentation_models_pytorch and diffusers models.

Every model captures (falling back to ``torch.export`` where its top-level forward
cannot be traced), analyses, and merges exactly on the keep-all plan and two random
plans (relative error ≤ 1e-4, re-checked in float64 where the fp32 network itself is
ill-conditioned; every merged conv equals the conv its option promised). A model
whose convs are followed by BatchNorm must offer at least one multi-conv span,
unless its structure leaves no chain to merge (listed below with why). A fast
subset runs by default; the whole sweep is marked ``slow``.
"""

from __future__ import annotations

import pytest

import fxmerge
from tests.test_merge import check_model, keep_and_random
from tests.zoo_wild import DIFFUSERS, SMP, TIMM, build

NOTHING_TO_CHAIN = {
    # every 3×3 conv reads a channel split added to the previous conv's output (hierarchical
    # residual-like connections), and every other conv a multi-input concatenation: no
    # position lies between two convs on a single path, so no span holds more than one conv
    "timm:res2net50_14w_8s": "hierarchical split-and-add blocks leave no conv chain",
}
FAST = ["timm:regnetx_002", "timm:lcnet_050", "timm:dla46_c"]


def _library(spec: str) -> None:
    pytest.importorskip(
        {"timm": "timm", "smp": "segmentation_models_pytorch", "diffusers": "diffusers"}[spec.split(":")[0]]
    )


def check_wild(spec: str) -> None:
    _library(spec)
    model, inputs = build(spec)
    graph = fxmerge.analyze(model, inputs)
    multi = [s for s in graph.spans if len(s.units) > 1]
    if spec not in NOTHING_TO_CHAIN:
        assert multi, f"{spec}: no multi-conv span; top reasons: {[r.reason for r in graph.rejections][:5]}"
    check_model(model, inputs if len(inputs) > 1 else inputs[0], keep_and_random(2))


@pytest.mark.parametrize("spec", FAST)
def test_wild_fast(spec):
    check_wild(spec)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec", [f"timm:{n}" for n in TIMM] + [f"smp:{n}" for n in SMP] + [f"diffusers:{n}" for n in DIFFUSERS]
)
def test_wild_slow(spec):
    check_wild(spec)
