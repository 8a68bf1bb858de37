"""``fxmerge.analyze`` on the torchvision model zoo (random weights, nothing downloaded).

The default run analyses a representative subset; ``-m slow`` sweeps every
classification and segmentation model torchvision lists. Every model must analyse
without an exception, and both ``Plan.keep_all`` and ``Plan.random`` must validate.
Transformers (ViT, Swin) have no merge-able convs beyond the patch embedding: they
analyse to a near-empty span graph with reasons, not an error.
"""

from __future__ import annotations

import gc
import inspect
import time

import pytest
import torch
import torchvision

from fxmerge.api import analyze_captured
from fxmerge.capture import capture
from fxmerge.plan import Plan

CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)

FAST = (
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "squeezenet1_0",
    "googlenet",
    "regnet_x_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "convnext_tiny",
    "vit_b_16",
    "fcn_resnet50",
    "lraspp_mobilenet_v3_large",
)
"""A default-run subset: plain, residual, inverted-residual with SE, Fire, Inception,
grouped, dense, channel-shuffle, ConvNeXt, a transformer and two segmentation heads."""

# models that merge at least one pair of convs (a sanity check on the sweep's results)
_HAS_MULTI_UNIT_SPANS = (
    "resnet",
    "resnext",
    "wide_resnet",
    "mobilenet",
    "mnasnet",
    "efficientnet",
    "regnet",
    "vgg",
    "alexnet",
    "squeezenet",
    "googlenet",
    "inception",
    "densenet",
    "shufflenet",
    "fcn_",
    "deeplabv3_",
    "lraspp_",
)


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build(name: str) -> torch.nn.Module:
    """A torchvision model with random weights and no pretrained backbone."""
    kwargs = {}
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def check(name: str, record_property=None) -> None:
    model = build(name)
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    captured = capture(model, x)
    graph = analyze_captured(captured)
    seconds = time.perf_counter() - start
    paper = analyze_captured(captured, rules="paper")
    if record_property is not None:
        record_property("analyze_seconds", round(seconds, 2))
    del model
    gc.collect()

    Plan.keep_all(graph).validate(graph)
    Plan.random(graph, seed=0).validate(graph)
    Plan.random(paper, seed=0).validate(paper)
    # the paper rules have no kernel or span-length bound: compare within the general bounds
    assert {s.id for s in paper.spans if len(s.units) <= 12} <= {s.id for s in graph.spans}

    assert len(graph.spans) >= len(graph.units)  # every unit has its single-unit span
    shapes = {p.id: p.shape for p in graph.positions}
    for entry in graph.entries:
        assert entry.conv.input_shape == shapes[entry.start], entry.id
        assert entry.conv.output_shape == shapes[entry.end], entry.id
    for span in graph.spans:  # a merged kernel is bounded (a single conv keeps its own size)
        if len(span.units) > 1:
            assert all(max(o.conv.kernel_size) <= 15 for o in span.options), span.id
    if name.startswith(("vit_", "swin_")):
        assert len(graph.units) <= 1 and len(graph.spans) <= 1  # the patch embedding only
        assert len(graph.rejections) > 50  # and every other op, with a reason
        assert all(r.reason for r in graph.rejections)
    if name.startswith(_HAS_MULTI_UNIT_SPANS):
        assert any(len(s.units) > 1 for s in graph.spans), name


@pytest.mark.parametrize("name", FAST)
def test_zoo_subset(name, record_property):
    check(name, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_zoo_sweep(name, record_property):
    check(name, record_property)


def test_subset_names_exist():
    assert set(FAST) <= set(CLASSIFICATION + SEGMENTATION)
    assert len(CLASSIFICATION) > 70 and len(SEGMENTATION) >= 6
