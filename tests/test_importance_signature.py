"""Entry networks that compute the same thing share one evaluation (fxmerge.importance.signature)."""

from __future__ import annotations

import collections
import operator

import pytest
import torch
import torch.fx
from torch import nn

from fxmerge.api import analyze_captured
from fxmerge.capture import capture
from fxmerge.importance import build_importance_table, single_entry_plan
from fxmerge.importance.distortion import Distortion
from fxmerge.importance.signature import network_signature
from fxmerge.ops import SPAN_CROP, SPAN_END, SPAN_PAD
from fxmerge.passes.linearize import linearize

QUIET = {"progress": False, "cache_dir": False}


class Block(nn.Module):
    """stem → residual block (conv → bn → relu → conv → bn, + skip, relu) → strided block → head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.d = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b(self.a(x)) + x)
        x = torch.relu(self.d(self.c(x)) + self.down(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = Block().eval()
    for m in model.modules():  # BatchNorms that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 12, 12)
    captured = capture(model, x)
    return captured, analyze_captured(captured)


def networks(captured, sg):
    for entry in sg.entries:
        yield entry.id, linearize(captured, sg, single_entry_plan(sg, entry.id), share_parameters=True)


def test_equal_signatures_mean_bit_identical_outputs(block):
    captured, sg = block
    groups = collections.defaultdict(list)
    for entry_id, gm in networks(captured, sg):
        signature = network_signature(gm, captured.gm)
        assert signature is not None, entry_id  # nothing here reads an object of its own
        groups[signature].append(gm)
    repeated = [gms for gms in groups.values() if len(gms) > 1]
    assert len(repeated) >= 2  # a span ending before an add and the one ending after it, per block
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        for gms in repeated:
            first = gms[0](x)
            for gm in gms[1:]:
                assert torch.equal(gm(x), first)
        distinct = [gms[0](x) for gms in groups.values()]
    assert sum(torch.equal(distinct[0], out) for out in distinct) == 1  # distinct signatures, distinct outputs


def test_the_table_is_the_same_with_and_without_sharing(block, monkeypatch):
    captured, sg = block
    shared = build_importance_table(captured, sg, "distortion", **QUIET)
    assert shared.info["repeated_networks"] >= 2
    monkeypatch.setattr(Distortion, "same_network_same_delta", False)
    apart = build_importance_table(captured, sg, "distortion", **QUIET)
    assert apart.info["repeated_networks"] == 0
    assert dict(shared.entries) == dict(apart.entries)  # exactly: the outputs are bit-identical
    assert min(apart.entries.values()) < 1.0 - 1e-6  # the comparison is not between ones


def graph_module(build, root: nn.Module | None = None) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return torch.fx.GraphModule(root or nn.Module(), graph)


def test_a_crop_undoing_a_pad_and_an_end_marker_are_the_identity():
    def span(skip_from_pad: bool, crop_by: int = 1):
        def build(graph, x):  # relu(pad(x)) cropped, plus a skip
            pad = graph.call_function(SPAN_PAD, (x, [1, 1, 1, 1], "a->b"))
            inner = graph.call_function(SPAN_CROP, (graph.call_function(torch.relu, (pad,)), [-1, -1, -1, -1], "a->b"))
            skip = graph.call_function(SPAN_CROP, (pad, [-crop_by] * 4, "a->b")) if skip_from_pad else x
            end = graph.call_function(SPAN_END, (graph.call_function(operator.add, (inner, skip)), "a->b"))
            return graph.call_function(torch.sigmoid, (end,))

        return build

    padded, plain, other = graph_module(span(True)), graph_module(span(False)), graph_module(span(True, 0))
    assert network_signature(padded, padded) == network_signature(plain, plain) is not None
    assert network_signature(other, other) != network_signature(plain, plain)
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(padded(x), plain(x))


def test_no_signature_when_a_dropped_copy_is_written_in_place():
    def writes_copy(graph, x):
        pad = graph.call_function(SPAN_PAD, (x, [1, 1, 1, 1], "a->b"))
        crop = graph.call_function(SPAN_CROP, (pad, [-1, -1, -1, -1], "a->b"))
        return graph.call_function(operator.add, (graph.call_function(torch.relu_, (crop,)), x))

    gm = graph_module(writes_copy)
    assert network_signature(gm, gm) is None  # x would be read after relu_ wrote into it
    root = nn.Module()
    root.act = nn.ReLU(inplace=True)
    gm = graph_module(lambda g, x: g.call_function(operator.add, (g.call_module("act", (x,)), x)), root)
    assert network_signature(gm, gm) is None


def test_a_conv_module_and_the_same_functional_conv_have_one_signature():
    root = nn.Module()
    root.conv = nn.Conv2d(3, 4, 3, padding=1)

    def functional(stride):
        def build(graph, x):
            weight, bias = graph.get_attr("conv.weight"), graph.get_attr("conv.bias")
            return graph.call_function(torch.conv2d, (x, weight, bias, [stride, stride], [1, 1], [1, 1], 1))

        return build

    module = graph_module(lambda g, x: g.call_module("conv", (x,)), root)
    same, strided = graph_module(functional(1), root), graph_module(functional(2), root)
    assert network_signature(module, root) == network_signature(same, root) is not None
    assert network_signature(strided, root) != network_signature(module, root)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(module(x), same(x))


def test_objects_that_are_not_the_captured_models_give_no_signature():
    root, other = nn.Module(), nn.Module()
    root.conv = other.conv = nn.Conv2d(3, 4, 3)
    gm = graph_module(lambda g, x: g.call_module("conv", (x,)), root)
    assert network_signature(gm, root) is not None
    assert network_signature(gm, nn.Sequential(nn.Conv2d(3, 4, 3))) is None  # a fresh module per entry
