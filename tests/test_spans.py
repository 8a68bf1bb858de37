"""Span graph: which spans exist, their options and merged convs, the chain
structure, and plans over it, on the hand-built models."""

from __future__ import annotations

import pytest

import fxmerge
from fxmerge.ir import Parallel
from fxmerge.plan import Plan, PlanError
from tests.models import CASES, build, example_input


def analyze(name: str, **kwargs):
    return fxmerge.analyze(build(name), example_input(name), **kwargs)


def span_ids(graph) -> set[str]:
    return {s.id for s in graph.spans}


def keep(span):
    (option,) = [o for o in span.options if not o.pruned]
    return option.conv


# --------------------------------------------------------------------------- chains
def test_conv_chain_spans_and_options():
    graph = analyze("conv_chain")
    assert span_ids(graph) == {
        "src:x->layers.0.0",
        "src:x->layers.1.0",
        "src:x->layers.2.0",
        "layers.0.0->layers.1.0",
        "layers.0.0->layers.2.0",
        "layers.1.0->layers.2.0",
    }
    whole = graph.span("src:x->layers.2.0")
    assert whole.units == ("layers.0.0", "layers.1.0", "layers.2.0")
    assert whole.dropped_activations == ("layers.0.0", "layers.1.0")
    assert whole.joins == ()
    # options are grouped by the merged conv: 7x7 (keep), 5x5 (one pruned), 3x3 (both pruned)
    assert [o.conv.kernel_size for o in whole.options] == [(7, 7), (5, 5), (3, 3)]
    assert [len(o.pruned) for o in whole.options] == [0, 1, 2]
    assert whole.options[0].id == "keep"
    assert whole.options[2].id == "prune:layers.1.0+layers.2.0"
    assert set(whole.options[1].pruned) < {"layers.1.0", "layers.2.0"}  # layers.0.0 is 3 -> 8
    for option in whole.options:
        assert option.conv.padding == tuple(k // 2 for k in option.conv.kernel_size)
        assert option.conv.in_channels == 3 and option.conv.out_channels == 8
        assert option.conv.activation == "relu"  # the span's closing activation
        assert option.conv.output_shape == (1, 8, 16, 16)


def test_two_3x3_convs_merge_into_5x5_with_padding_2():
    graph = analyze("conv_chain")
    conv = keep(graph.span("layers.0.0->layers.2.0"))
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.stride == (1, 1)
    assert conv.in_channels == conv.out_channels == 8 and conv.groups == 1
    assert conv.input_shape == (1, 8, 16, 16) and conv.bias
    single = graph.span("layers.0.0->layers.1.0")
    assert single.options == (single.options[0],) and single.options[0].conv == graph.unit("layers.1.0").conv


def test_strided_3x3_then_3x3_merge_into_7x7_stride_2():
    graph = analyze("downsample_block")
    conv = keep(graph.span("stem.0->conv2"))
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert conv.input_shape == (1, 8, 32, 32) and conv.output_shape == (1, 16, 16, 16)
    pruned = [o for o in graph.span("stem.0->conv2").options if o.pruned]
    assert [(o.pruned, o.conv.kernel_size) for o in pruned] == [(("conv2",), (3, 3))]


def test_depthwise_chain_stays_depthwise():
    graph = analyze("depthwise_chain")
    conv = keep(graph.span("stem.0->dw2.0"))
    assert conv.kernel_size == (5, 5) and conv.groups == 8 and conv.is_depthwise
    # with the dense stem in the span the result is dense
    assert keep(graph.span("src:x->dw2.0")).groups == 1


def test_conv1d_chain_merges():
    graph = analyze("conv1d_chain")
    conv = keep(graph.span("src:x->c3"))
    assert conv.dims == 1 and conv.kernel_size == (7,) and conv.padding == (3,)


def test_shared_module_call_sites_merge_like_any_two_convs():
    graph = analyze("shared_conv")
    span = graph.span("stem->conv#1")
    assert span.units == ("conv", "conv#1")
    assert keep(span).kernel_size == (5, 5)
    # pruning either call site gives the same 3x3: one option for both, plus keep
    assert [o.conv.kernel_size for o in span.options] == [(5, 5), (3, 3)]
    assert span.options[1].id in ("prune:conv", "prune:conv#1")


def test_reflect_padding_conv_is_never_merged():
    graph = analyze("reflect_padding")
    assert span_ids(graph) == {"src:x->conv_a", "conv_a->conv_b", "conv_b->conv_c"}
    assert all(len(s.units) == 1 for s in graph.spans)
    assert graph.span("conv_a->conv_b").options[0].conv == graph.unit("conv_b").conv


def test_dict_output_position_is_pinned_and_not_crossed():
    graph = analyze("dict_output")
    assert "src:x->body.1.0" in span_ids(graph)
    assert not any(s.end == "head.0" and len(s.units) > 1 for s in graph.spans)


def test_untraceable_child_splits_the_chain():
    graph = analyze("untraceable_child")
    assert span_ids(graph) == {"src:x->pre.0", "src:gate->post.0.0", "src:gate->post.1.0", "post.0.0->post.1.0"}
    assert [c.positions for c in graph.chains] == [("src:x", "pre.0"), ("src:gate", "post.0.0", "post.1.0")]


# --------------------------------------------------------------------------- residual blocks
def test_basic_block_spans():
    graph = analyze("basic_block")
    assert span_ids(graph) == {
        "src:x->stem.0",
        # inside the branch
        "stem.0->conv1",
        "stem.0->conv2",
        "conv1->conv2",
        # covering the whole block (the identity skip is absorbed)
        "stem.0->add",
        "src:x->add",
    }
    # never from inside the branch to after the join, nor from before the block into it
    for span in graph.spans:
        assert not (span.start in ("conv1", "conv2") and span.end == "add"), span.id
        assert not (span.start == "src:x" and span.end in ("conv1", "conv2")), span.id
    block = graph.span("stem.0->add")
    assert block.units == ("conv1", "conv2") and block.joins == ("add",)
    assert block.dropped_activations == ("conv1",)
    assert [(o.id, o.conv.kernel_size, o.conv.padding) for o in block.options][0] == ("keep", (5, 5), (2, 2))
    assert [o.conv.kernel_size for o in block.options] == [(5, 5), (3, 3)]
    assert keep(graph.span("src:x->add")).kernel_size == (7, 7)
    assert keep(graph.span("src:x->add")).activation == "relu"


def test_basic_block_chain_structure():
    graph = analyze("basic_block")
    (chain,) = graph.chains
    assert chain.positions == ("src:x", "stem.0", "add")
    assert [s.kind for s in chain.steps] == ["unit", "parallel"]
    region = chain.steps[1].region
    assert isinstance(region, Parallel) and region.join == "add" and region.mergeable
    assert sorted(b.positions for b in region.branches) == [("stem.0",), ("stem.0", "conv1", "conv2")]


def test_projection_shortcut_is_absorbed():
    graph = analyze("downsample_block")
    block = graph.span("stem.0->add")
    assert block.units == ("conv1", "conv2", "downsample.0") and block.joins == ("add",)
    conv = keep(block)
    # 7x7 s2 branch; the 1x1 s2 projection sits at the centre tap of the same grid
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert conv.in_channels == 8 and conv.out_channels == 16
    assert keep(graph.span("src:x->add")).kernel_size == (9, 9)
    assert "conv1->add" not in span_ids(graph) and "downsample.0->add" not in span_ids(graph)


def test_inverted_residual_spans():
    graph = analyze("inverted_residual")
    multi = {s.id for s in graph.spans if len(s.units) > 1}
    assert multi == {
        "stem.0->depthwise.0",
        "stem.0->project.0",
        "expand.0->project.0",
        "stem.0->add",
        "src:x->add",
        "stem.0->head.0",
        "src:x->head.0",
    }
    block = graph.span("stem.0->add")
    assert block.units == ("expand.0", "depthwise.0", "project.0")
    assert block.dropped_activations == ("expand.0", "depthwise.0")
    # 1x1 -> dw3x3 -> 1x1 (+ identity) is a dense 3x3; pruning the depthwise conv leaves 1x1
    assert [(o.id, o.conv.kernel_size, o.conv.groups) for o in block.options] == [
        ("keep", (3, 3), 1),
        ("prune:depthwise.0", (1, 1), 1),
    ]
    assert keep(block).activation is None  # the linear bottleneck has no activation
    assert keep(graph.span("stem.0->head.0")).activation == "relu6"


def test_inception_cat_region():
    graph = analyze("inception")
    (chain,) = graph.chains
    assert chain.positions == ("src:x", "stem.0", "cat", "head.0")
    step = chain.steps[1]
    assert step.kind == "parallel" and step.region.join == "cat" and step.region.mergeable
    assert len(step.region.branches) == 3
    assert [b.positions for b in step.region.branches] == [("stem.0", "b1.0"), ("stem.0", "b3.0"), ("stem.0", "b5.0")]
    span = graph.span("stem.0->cat")
    assert span.units == ("b1.0", "b3.0", "b5.0") and span.joins == ("cat",)
    conv = keep(span)
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.out_channels == 12
    assert keep(graph.span("src:x->head.0")).kernel_size == (7, 7)
    assert not any(s.start in ("b1.0", "b3.0", "b5.0") for s in graph.spans)


def test_join_without_common_source_is_kept_as_it_is():
    graph = analyze("tuple_input")
    assert graph.position("conv_x.0").pinned.startswith("operand of add")
    assert not any("add" in s.joins for s in graph.spans)


# --------------------------------------------------------------------------- settings
def test_exclude_keeps_a_unit_out_of_every_multi_unit_span():
    graph = analyze("conv_chain", exclude=["layers.1"])
    assert span_ids(graph) == {"src:x->layers.0.0", "layers.0.0->layers.1.0", "layers.1.0->layers.2.0"}
    graph = analyze("basic_block", exclude=["conv2"])
    for span in graph.spans:
        assert "conv2" not in span.units or len(span.units) == 1
    assert "src:x->add" not in span_ids(graph)  # the block holds conv2, so it cannot merge
    assert not graph.chains[0].steps[1].region.mergeable


@pytest.mark.parametrize("max_kernel", [3, 5, 7])
def test_max_kernel_bounds_every_merged_kernel(max_kernel):
    graph = analyze("functional_activations", max_kernel=max_kernel)
    assert dict(graph.settings)["max_kernel"] == str(max_kernel)
    assert all(k <= max_kernel for e in graph.entries for k in e.conv.kernel_size)
    # a span whose every option is too big does not exist; others lose their big options
    whole = graph.span("src:x->c7")
    assert not any(o.id == "keep" for o in whole.options)
    assert max(o.conv.kernel_size[0] for o in whole.options) == max_kernel
    Plan.keep_all(graph).validate(graph)


def test_bad_settings():
    with pytest.raises(ValueError, match="max_kernel"):
        analyze("conv_chain", max_kernel=0)
    with pytest.raises(ValueError, match="unknown rules"):
        analyze("conv_chain", rules="nope")


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", list(CASES))
def test_span_graph_invariants(name):
    graph = analyze(name)
    index = {p.id: p.index for p in graph.positions}
    units = {u.id: u for u in graph.units}
    ids = [s.id for s in graph.spans]
    assert len(ids) == len(set(ids))
    for unit in graph.units:  # every unit has its single-unit span
        assert graph.single_unit_span(unit.id).units == (unit.id,)
    for span in graph.spans:
        assert index[span.start] < index[span.end], span.id
        assert span.options, span.id
        assert len({o.id for o in span.options}) == len(span.options)
        assert len({(o.conv.kernel_size, o.conv.stride, o.conv.groups) for o in span.options}) == len(span.options)
        if len(span.units) > 1:
            assert all(units[u].ineligible is None for u in span.units), span.id
            assert all(not graph.position(p).pinned for p in span.dropped_activations), span.id
        for option in span.options:
            assert set(option.pruned) <= {u for u in span.units if units[u].reducible}
            assert len(option.pruned) < len(span.units)
            conv = option.conv
            assert conv.input_shape == graph.position(span.start).shape, (span.id, option.id)
            assert conv.output_shape == graph.position(span.end).shape, (span.id, option.id)
            assert all(p >= 0 for p in conv.padding)
            assert conv.activation == graph.position(span.end).activation


@pytest.mark.parametrize("name", list(CASES))
def test_plans_validate(name):
    graph = analyze(name)
    plan = Plan.keep_all(graph)
    plan.validate(graph)
    assert len(plan.entries) == len(graph.units)
    assert all(e.endswith("|keep") for e in plan.entries)
    for seed in range(5):
        Plan.random(graph, seed=seed).validate(graph)


def test_plans_that_do_not_tile_are_rejected():
    graph = analyze("conv_chain")
    with pytest.raises(PlanError, match="in two chosen spans"):
        Plan.from_entries(graph, ["src:x->layers.1.0|keep", "layers.0.0->layers.2.0|keep"])
    with pytest.raises(PlanError, match="covers no span"):
        Plan.from_entries(graph, ["src:x->layers.1.0|keep"])
    plan = Plan.from_entries(graph, ["src:x->layers.1.0|keep", "layers.1.0->layers.2.0|keep"])
    assert plan.kept_positions(graph) == {"src:x", "layers.1.0", "layers.2.0"}


def test_random_plans_cover_the_block_both_ways():
    graph = analyze("basic_block")
    seen = set()
    for seed in range(40):
        plan = Plan.random(graph, seed=seed)
        plan.validate(graph)
        seen.add(any("add" in graph.span(e.split("|")[0]).joins for e in plan.entries))
    assert seen == {True, False}


def test_analysis_is_deterministic():
    a, b = analyze("inverted_residual"), analyze("inverted_residual")
    assert a == b and a.fingerprint == b.fingerprint


def test_merged_convs_above_the_weight_bound_are_not_offered(monkeypatch):
    from fxmerge.passes import spans

    assert "src:x->layers.2.0" in span_ids(analyze("conv_chain"))
    keep_7x7 = keep(analyze("conv_chain").span("src:x->layers.2.0"))
    weights = keep_7x7.out_channels * keep_7x7.in_channels * 49
    monkeypatch.setattr(spans, "MAX_MERGED_PARAMS", weights - 1)
    bounded = analyze("conv_chain").span("src:x->layers.2.0")
    assert [o.conv.kernel_size for o in bounded.options] == [(5, 5), (3, 3)]  # the 7×7 is too big now
