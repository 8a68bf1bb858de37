"""Match: units, joins, positions and boundaries of the hand-built models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.capture import capture
from fxmerge.fxutil import shape_of
from fxmerge.nodes import affine_site, conv_site, is_transparent, join_site
from fxmerge.passes.match import match
from tests.models import CASES, FunctionalActivations, build, example_input


def analyze(name: str, **kwargs):
    return fxmerge.analyze(build(name), example_input(name), **kwargs)


def matched(model: nn.Module, x):
    captured = capture(model, x)
    return captured, match(captured.gm)


# --------------------------------------------------------------------------- chains
def test_conv_chain():
    graph = analyze("conv_chain")
    assert [u.id for u in graph.units] == ["layers.0.0", "layers.1.0", "layers.2.0"]
    assert graph.joins == ()
    assert [p.id for p in graph.positions] == ["src:x", "layers.0.0", "layers.1.0", "layers.2.0"]
    assert [p.index for p in graph.positions] == [0, 1, 2, 3]
    assert [p.kind for p in graph.positions] == ["source", "unit", "unit", "unit"]
    assert [p.activation for p in graph.positions] == [None, "relu", "relu", "relu"]
    assert [p.pinned for p in graph.positions] == [None, None, None, "a model output"]
    assert [u.reducible for u in graph.units] == [False, True, True]  # 3 -> 8 is not C -> C
    assert [u.input_position for u in graph.units] == ["src:x", "layers.0.0", "layers.1.0"]
    first = graph.unit("layers.0.0")
    assert first.conv_node == "layers_0_0"
    assert first.affine_nodes == ("layers_0_1",)  # the BatchNorm folds into the unit
    assert first.activation_node == "layers_0_2"
    assert first.conv.in_channels == 3 and first.conv.out_channels == 8
    assert first.conv.kernel_size == (3, 3) and first.conv.padding == (1, 1) and first.conv.stride == (1, 1)
    assert first.conv.bias  # conv has no bias, but the folded BatchNorm gives it one
    assert first.conv.input_shape == (1, 3, 16, 16)
    assert first.conv.activation == "relu"
    assert graph.rejections == ()


def test_conv1d_chain():
    graph = analyze("conv1d_chain")
    assert [u.id for u in graph.units] == ["c1", "c2", "c3"]
    assert all(u.conv.dims == 1 for u in graph.units)
    assert graph.unit("c2").conv.kernel_size == (3,)
    assert [len(u.affine_nodes) for u in graph.units] == [1, 1, 0]
    assert [u.activation for u in graph.units] == ["relu", "relu", "relu"]
    assert graph.position("c3").shape == (1, 8, 32)


def test_functional_activations_in_every_spelling():
    graph = analyze("functional_activations")
    assert {u.id: u.activation for u in graph.units} == FunctionalActivations.ACTIVATIONS
    assert {p.id: p.activation for p in graph.positions if p.kind == "unit"} == FunctionalActivations.ACTIVATIONS
    assert all(u.activation_node is not None for u in graph.units if u.id != "c7")
    assert graph.rejections == ()


def test_module_called_at_two_sites_gives_two_units():
    graph = analyze("shared_conv")
    assert [u.id for u in graph.units] == ["stem", "conv", "conv#1"]
    first, second = graph.unit("conv"), graph.unit("conv#1")
    assert first.conv_node != second.conv_node
    assert first.conv == second.conv  # same module, same call shape
    assert second.input_position == "conv"
    # the ReLU module is shared too: one activation node per call site
    assert len({u.activation_node for u in graph.units}) == 3


def test_reflect_padding_conv_is_ineligible_with_reason():
    graph = analyze("reflect_padding")
    unit = graph.unit("conv_b")
    assert unit.ineligible == "padding_mode='reflect': only zero padding can be moved in front of a span"
    assert not unit.reducible
    assert graph.rejections == (fxmerge.ir.Rejection("conv_b", unit.ineligible),)
    assert graph.unit("conv_c").reducible


# --------------------------------------------------------------------------- joins
def test_basic_block():
    graph = analyze("basic_block")
    assert [u.id for u in graph.units] == ["stem.0", "conv1", "conv2"]
    (join,) = graph.joins
    assert join.id == "add" and join.kind == "add"
    assert join.operands == ("conv2", "stem.0")  # argument order of `out + s`
    assert join.activation == "relu" and join.ineligible is None
    assert graph.unit("conv2").activation is None  # the ReLU follows the add, not conv2
    assert [p.id for p in graph.positions] == ["src:x", "stem.0", "conv1", "conv2", "add"]
    assert [p.kind for p in graph.positions] == ["source", "unit", "unit", "unit", "join"]
    assert [p.activation for p in graph.positions] == [None, "relu", "relu", None, "relu"]
    assert graph.position("add").pinned == "a model output"
    assert graph.rejections == ()


def test_downsample_block():
    graph = analyze("downsample_block")
    assert [u.id for u in graph.units] == ["stem.0", "conv1", "conv2", "downsample.0"]
    shortcut = graph.unit("downsample.0")
    assert shortcut.input_position == "stem.0"
    assert shortcut.conv.kernel_size == (1, 1) and shortcut.conv.stride == (2, 2)
    assert shortcut.affine_nodes == ("downsample_1",)
    assert shortcut.activation is None and not shortcut.reducible
    assert graph.unit("conv1").conv.stride == (2, 2) and not graph.unit("conv1").reducible
    assert graph.unit("conv2").reducible
    assert graph.join("add").operands == ("conv2", "downsample.0")
    assert graph.position("add").shape == (1, 16, 16, 16)


def test_inverted_residual():
    graph = analyze("inverted_residual")
    assert [u.id for u in graph.units] == ["stem.0", "expand.0", "depthwise.0", "project.0", "head.0"]
    assert [u.activation for u in graph.units] == ["relu6", "relu6", "relu6", None, "relu6"]
    depthwise = graph.unit("depthwise.0")
    assert depthwise.conv.groups == 32 and depthwise.conv.is_depthwise and depthwise.reducible
    assert not graph.unit("expand.0").reducible and not graph.unit("project.0").reducible
    join = graph.join("add")
    assert join.operands == ("stem.0", "project.0") and join.activation is None
    assert graph.unit("head.0").input_position == "add"
    assert [p.pinned is not None for p in graph.positions] == [False] * 6 + [True]


def test_inception_concatenation():
    graph = analyze("inception")
    join = graph.join("cat")
    assert join.kind == "cat" and join.operands == ("b1.0", "b3.0", "b5.0") and join.ineligible is None
    assert graph.position("cat").shape == (1, 12, 16, 16)
    assert {graph.unit(u).input_position for u in ("b1.0", "b3.0", "b5.0")} == {"stem.0"}
    assert [graph.unit(u).conv.kernel_size for u in ("b1.0", "b3.0", "b5.0")] == [(1, 1), (3, 3), (5, 5)]


def test_positions_are_numbered_in_topological_order():
    for name in CASES:
        graph = analyze(name)
        index = {p.id: p.index for p in graph.positions}
        assert sorted(index.values()) == list(range(len(graph.positions))), name
        for unit in graph.units:
            assert index[unit.input_position] < index[unit.output_position], (name, unit.id)
        for join in graph.joins:
            assert all(index[o] < index[join.output_position] for o in join.operands), (name, join.id)


# --------------------------------------------------------------------------- what folds, what stops
class _Folding(nn.Module):
    """conv → *2 → +1 → dropout → identity → relu: the scalars fold, dropout and identity are transparent."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        return F.relu(self.ident(self.drop(self.conv(x) * 2.0 + 1.0)))


def test_scalar_affines_fold_and_identity_ops_are_transparent():
    captured, m = matched(_Folding(), torch.randn(1, 3, 8, 8))
    (unit,) = m.units
    assert unit.affine_nodes == ("mul", "add")
    assert unit.activation == "relu"
    assert m.rejections == ()
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    assert [affine_site(nodes[name], captured.gm).kind for name in unit.affine_nodes] == ["mul", "add"]
    assert is_transparent(nodes["drop"], captured.gm) and is_transparent(nodes["ident"], captured.gm)


def test_batchnorm_affine_matches_the_module():
    model = build("conv_chain")
    captured, _ = matched(model, example_input("conv_chain"))
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    info = affine_site(nodes["layers_0_1"], captured.gm)
    assert info is not None and info.input is nodes["layers_0_0"]
    y = torch.randn(1, 8, 4, 4)
    expected = model.layers[0][1](y)
    folded = y * info.scale.view(1, -1, 1, 1) + info.shift.view(1, -1, 1, 1)
    torch.testing.assert_close(folded.to(expected.dtype), expected)
    conv = conv_site(nodes["layers_0_0"], captured.gm)
    assert conv.path == "layers.0.0" and conv.params.weight is captured.gm.get_submodule("layers.0.0").weight
    assert conv_site(nodes["layers_0_1"], captured.gm) is None


class _Boundaries(nn.Module):
    """BatchNorm on the input, an add broadcast over channels and a cat along the width: all boundaries."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(1, 1, 8, 8))  # (1, C, 1, 1) would be a side bias
        self.other = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.bn(x)
        y = self.conv(x) + self.bias.expand(1, 1, 8, 8).clone()
        return torch.cat([y, self.other(x)], dim=3)


def test_unmergeable_ops_are_reported_not_fatal():
    model = _Boundaries().eval()
    graph = fxmerge.analyze(model, torch.randn(1, 3, 8, 8))
    reasons: dict[str, list[str]] = {}
    for r in graph.rejections:
        reasons.setdefault(r.node, []).append(r.reason)
    assert reasons["bn"] == ["BatchNorm not directly after a conv or join"]
    assert reasons["add"][0] == "add broadcasts (1, 4, 8, 8) with (1, 1, 8, 8)"
    assert reasons["cat"][0] == "cat along dim 3, not the channel dim"
    assert graph.unit("conv").input_position == "src:bn"
    fxmerge.Plan.keep_all(graph).validate(graph)


def test_join_site_recognises_every_spelling():
    class Adds(nn.Module):
        def forward(self, x):
            a = x + x.relu()
            b = torch.add(a, x)
            c = b.add(a)
            c += b
            return torch.cat([a, c], 1)

    captured, _ = matched(Adds(), torch.randn(1, 2, 4, 4))
    sites = [join_site(n, shape_of) for n in captured.gm.graph.nodes]
    kinds = [site.kind for site in sites if site is not None]
    assert kinds == ["add", "add", "add", "add", "cat"]


# --------------------------------------------------------------------------- exclusion
@pytest.mark.parametrize("exclude", [["layers.1"], ["layers.1.0"]])
def test_exclude_marks_the_unit_ineligible(exclude):
    graph = analyze("conv_chain", exclude=exclude)
    assert graph.unit("layers.1.0").ineligible == "excluded by the user"
    assert graph.unit("layers.0.0").ineligible is None and graph.unit("layers.2.0").ineligible is None
    assert ("layers_1_0", "excluded by the user") in [(r.node, r.reason) for r in graph.rejections]


def test_exclude_prefix_matches_whole_names_only():
    graph = analyze("conv_chain", exclude=["layers.1.0.x", "layers.", "layer"])
    assert all(u.ineligible is None for u in graph.units)


# --------------------------------------------------------------------------- shape-only readers (issue #13)
class _ShapeChecked(nn.Module):
    """timm's BatchNormAct2d: the norm asserts on its input's ndim and reads its size."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.c1(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        y = torch.relu(self.b1(y))
        z = self.c2(y)
        torch._assert(z.dim() == 4 and z.shape[1] == 8, "expected 8 channels")
        n, c = z.size(0), z.size(1)
        return torch.relu(self.b2(z)).reshape(n, c, -1)


@pytest.mark.parametrize("form", ["symbolic_trace", "export"])
def test_shape_only_readers_split_no_unit_and_pin_nothing(form):
    model, x = _ShapeChecked().eval(), torch.randn(1, 3, 8, 8)
    source = torch.export.export(model, (x,)).module() if form == "export" else model
    graph = fxmerge.analyze(source, x)
    assert [len(u.affine_nodes) for u in graph.units] == [1, 1]
    assert [u.activation for u in graph.units] == ["relu", "relu"]
    assert graph.position("c1").pinned is None
    assert "src:x->c2" in {s.id for s in graph.spans}
    assert not any("getattr" in r.reason or "_assert" in r.reason or "eq " in r.reason for r in graph.rejections)
