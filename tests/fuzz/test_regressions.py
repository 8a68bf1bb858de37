"""Regression tests: shrunk networks from the fuzzer and the known bugs of issue #17.

Each network is the fuzzer's description (``tests/fuzz/spec.py``), pasted from
``to_source()``. Tests marked ``xfail(strict=True)`` are open library bugs (see
``FINDINGS.md``): when one is fixed its test XPASSes and fails the suite — then drop
the marker, and the matching entry in ``tests/fuzz/known.py``. The plans are given
as explicit entry ids so that the tests do not depend on ``Plan.random``.
"""

from __future__ import annotations

import pytest
import torch

import fxmerge
from tests.fuzz.build import build_net, example_inputs
from tests.fuzz.checks import check_conv_specs, check_exact, check_same_span_graph
from tests.fuzz.forms import FORMS, FormGraph, span_graph_in_form
from tests.fuzz.spec import Act, Boundary, Branches, Conv, Extra, Net, Op, Residual, Unit  # noqa: F401 - sources use them


def merge_plan(net: Net, entries: tuple[str, ...], form: str = "fx") -> tuple[FormGraph, torch.fx.GraphModule]:
    """Linearize and merge ``net`` with the plan ``entries`` in ``form``; check exactness and conv shapes."""
    model, inputs = build_net(net), example_inputs(net)
    graph = span_graph_in_form(model, inputs, form)
    plan = fxmerge.Plan.from_entries(graph.span_graph, entries)
    linear = fxmerge.linearize(graph.module, graph.inputs, plan, span_graph=graph.span_graph).eval()
    merged = fxmerge.merge(linear)
    check_exact(linear, merged, graph.inputs)
    check_conv_specs(graph, plan, linear, merged)
    return graph, merged


def same_span_graph(net: Net) -> None:
    model, inputs = build_net(net), example_inputs(net)
    check_same_span_graph({form: span_graph_in_form(model, inputs, form) for form in FORMS})


def fxmerge_ops_left(merged: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in merged.graph.nodes if n.op == "call_function" and "fxmerge" in str(n.target)]


# ------------------------------------------------------------------ bugs found by the fuzzer
BARE_CHAIN = Net(
    blocks=(
        Unit(Conv(4, (1, 1)), norm=None, act=None),
        Unit(Conv(4, (1, 1), bias=False), norm=None, act=None),
        Unit(Conv(4, (1, 1), bias=False), norm=None, act=None),
        Unit(Conv(4, (1, 1), bias=False), norm=None, act=None),
    ),
    channels=1,
    size=(5, 5),
)


def test_span_after_a_span_ending_at_a_bare_module_conv():
    """Found by the fuzzer (FINDINGS.md #1, fixed): linearize's KeyError on the second span."""
    merge_plan(BARE_CHAIN, ("src:x->blocks.1.conv|keep", "blocks.1.conv->blocks.3.conv|keep"))


SHARED_IDENTITY = Net(
    blocks=(
        Op("identity"),
        Residual(
            body=(
                Unit(Conv(2, (3, 3), padding=(1, 1)), norm=None),
                Unit(Conv(2, (3, 3), padding=(1, 1)), norm=None, act=None),
            ),
        ),
    ),
    channels=2,
    size=(6, 6),
)


def test_transparent_op_shared_by_a_span_input_and_a_skip():
    """Found by the fuzzer (FINDINGS.md #2, fixed): the skip read the span's padded input through the Identity."""
    merge_plan(SHARED_IDENTITY, ("src:x->blocks.1.body.blocks.1.conv|keep",))


SHARED_IDENTITY_NO_MARGIN = Net(
    blocks=(
        Unit(Conv(2, (1, 1)), norm="gn", act=None),
        Op("identity"),
        Residual(
            body=(
                Unit(Conv(1, (1, 1), bias=False), norm=None, act=None),
                Unit(Conv(2, (1, 1), bias=False), norm=None, act=None),
            ),
        ),
    ),
    channels=2,
    size=(4, 4),
)


def test_merged_graph_keeps_a_span_pad_read_through_a_shared_identity():
    """FINDINGS.md #2 with a zero margin (fixed): merge left fxmerge::span_pad in the graph, so no ONNX export."""
    _, merged = merge_plan(
        SHARED_IDENTITY_NO_MARGIN, ("src:x->blocks.0.conv|keep", "src:blocks.0.norm->blocks.2.body.blocks.1.conv|keep")
    )
    assert fxmerge_ops_left(merged) == []


CHANNEL_AFFINE = Net(blocks=(Unit(Conv(2, (1, 1)), norm="channel", act=None),), channels=2, size=(4, 4))


def test_channel_affine_parameter_is_a_source_position():
    """Found by the fuzzer (FINDINGS.md #4, fixed): a (1, C, 1, 1) shift parameter became a source position."""
    same_span_graph(CHANNEL_AFFINE)


@pytest.mark.parametrize("form", FORMS)
def test_per_channel_affine_inside_a_span_merges(form):
    """Found by the fuzzer (FINDINGS.md #9, fixed): a per-channel affine inside a span must merge."""
    net = Net(
        blocks=(Unit(Conv(2, (1, 1)), norm="channel", act=None), Unit(Conv(2, (1, 1)), norm=None, act=None)),
        channels=2,
        size=(4, 4),
    )
    merge_plan(net, ("src:x->blocks.1.conv|keep",), form)


PYTHON_ASSERT = Net(
    blocks=(
        Unit(Conv(2, (1, 1)), norm=None, act=None),
        Op("assert_shape"),
        Unit(Conv(2, (1, 1)), norm=None, act=None),
    ),
    channels=2,
    size=(4, 4),
)


def test_python_shape_assert_makes_a_leaf():
    """Found by the fuzzer (FINDINGS.md #5, fixed): a Python shape assert made a leaf in the fx form only."""
    same_span_graph(PYTHON_ASSERT)


WIDE_PREFIX = Net(
    blocks=(
        Unit(Conv(4, (1, 1), stride=(2, 2)), norm=None, act=None),
        Unit(Conv(8, (5, 5), dilation=(2, 2), padding=(4, 4)), norm=None, act=None),
        Unit(Conv(4, (1, 1)), norm=None, act=None),
    ),
    size=(8, 8),
)


@pytest.mark.parametrize("form", FORMS)
def test_span_after_a_prefix_wider_than_max_kernel(form):
    """Found by the fuzzer (FINDINGS.md #3, fixed): StopIteration in the span enumerator."""
    model, inputs = build_net(WIDE_PREFIX), example_inputs(WIDE_PREFIX)
    span_graph_in_form(model, inputs, form)


IN_PLACE_ADD = Net(
    blocks=(
        Residual(
            body=(
                Unit(Conv(1, (5, 5), padding=(2, 2), bias=False), norm=None, act=None),
                Residual(
                    body=(Unit(Conv(1, (3, 3), padding=(1, 1), bias=False), norm=None, act=None),),
                    add="+=",
                ),
                Unit(Conv(1, (1, 3), padding=(0, 1), bias=False), norm=None, act=None),
            ),
        ),
    ),
    channels=1,
    size=(4, 4),
)


@pytest.mark.parametrize("form", FORMS)
def test_pruning_makes_an_in_place_add_write_into_the_span_input(form):
    """Found by the fuzzer (FINDINGS.md #6, fixed): `a += b` in the dynamo / export graph wrote into the span input."""
    merge_plan(
        IN_PLACE_ADD,
        ("src:x->add:blocks.0|prune:blocks.0.body.blocks.0.conv+blocks.0.body.blocks.1.body.blocks.0.conv",),
        form,
    )


def _unit1() -> Unit:
    return Unit(Conv(1, (1, 1), bias=False), norm=None, act=None)


THREE_WAY_ADD = Net(
    blocks=(Residual(body=(_unit1(), Branches(((_unit1(),), (_unit1(),), (_unit1(),))))),),
    channels=1,
    size=(4, 4),
)


@pytest.mark.parametrize("form", FORMS)
def test_three_way_add_after_a_unit_inside_a_residual_body(form):
    """Found by the fuzzer (FINDINGS.md #7, fixed): the branch convs of `(a + b) + c` got no span."""
    model, inputs = build_net(THREE_WAY_ADD), example_inputs(THREE_WAY_ADD)
    graph = span_graph_in_form(model, inputs, form).span_graph
    assert len({s.units[0] for s in graph.spans if len(s.units) == 1}) == len(graph.units) == 4
    merge_plan(THREE_WAY_ADD, fxmerge.Plan.keep_all(graph).entries, form)


@pytest.mark.parametrize("kind", ["identity", "stochastic_depth"])
def test_transparent_op_between_a_norm_and_its_activation(kind):
    """Found by the fuzzer (FINDINGS.md #8, fixed): GroupNorm → Identity → act is one normalised activation."""
    net = Net(blocks=(Unit(Conv(2, (1, 1)), norm="gn", extras=(Extra(kind, where="norm"),)),), channels=2, size=(4, 4))
    same_span_graph(net)


# ------------------------------------------------------------------ known bugs of issue #17 (fixed)
def _conv3(out: int = 8) -> Conv:
    return Conv(out, (3, 3), padding=(1, 1))


IDENTITY_AFTER_ACT = Net(blocks=(Unit(_conv3()), Unit(_conv3(), extras=(Extra("identity"),)), Unit(_conv3())))


@pytest.mark.parametrize(
    "entries",
    [
        ("src:x->blocks.1.conv|keep", "blocks.1.conv->blocks.2.conv|keep"),
        ("src:x->blocks.1.conv|prune:blocks.1.conv", "blocks.1.conv->blocks.2.conv|keep"),
    ],
    ids=["keep", "prune-last"],
)
def test_identity_after_the_activation_that_ends_a_span(entries):
    """timm's anti-aliasing / attention ``nn.Identity`` after the act: the span's end is the act's input."""
    merge_plan(IDENTITY_AFTER_ACT, entries)


NDIM_ASSERT = Net(
    blocks=(
        Unit(_conv3(), extras=(Extra("assert_ndim", where="conv"),)),
        Unit(_conv3(), extras=(Extra("assert_dim", where="conv"),)),
    )
)


def test_shape_asserts_on_a_conv_output_do_not_split_the_unit():
    """``torch._assert(x.ndim == 4)`` / ``x.dim()`` read only the shape: BatchNorm and ReLU stay in the unit."""
    model, inputs = build_net(NDIM_ASSERT), example_inputs(NDIM_ASSERT)
    graph = span_graph_in_form(model, inputs, "fx").span_graph
    assert [(len(u.affine_nodes), u.activation) for u in graph.units] == [(1, "relu"), (1, "relu")]
    same_span_graph(NDIM_ASSERT)
    merge_plan(NDIM_ASSERT, ("src:x->blocks.1.conv|keep",))


BARE_PAIR = Net(blocks=(Unit(Conv(8, (1, 1)), norm=None, act=None), Unit(Conv(8, (1, 1)), norm=None, act=None)))


@pytest.mark.parametrize("form", FORMS)
def test_conv_with_default_stride_in_every_form(form):
    """``torch.export`` drops default arguments (``aten.conv2d(x, w, b)``): unpadding must not add an int stride."""
    merge_plan(BARE_PAIR, ("src:x->blocks.1.conv|keep",), form)


PRUNE_LAST = Net(blocks=(Unit(_conv3()), Unit(_conv3(), act=None), Unit(_conv3()), Unit(_conv3())))


@pytest.mark.parametrize("form", FORMS)
def test_pruning_the_last_unit_without_activation_then_another_span(form):
    merge_plan(PRUNE_LAST, ("src:x->blocks.1.conv|prune:blocks.1.conv", "blocks.1.conv->blocks.3.conv|keep"), form)
