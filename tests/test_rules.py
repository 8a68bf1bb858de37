"""Paper rules: the LayerMerge search space as a filter on the general span graph."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxmerge
from fxmerge import cli
from fxmerge.plan import Plan


def units_of(graph, span):
    return [graph.unit(u) for u in span.units]


def strided(unit) -> bool:
    return any(s > 1 for s in unit.conv.stride)


def multi_unit(graph):
    return [s for s in graph.spans if len(s.units) > 1 or s.joins]


@pytest.fixture(scope="module")
def resnet34():
    torch.manual_seed(0)
    model = torchvision.models.resnet34().eval()
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxmerge.analyze(model, x), fxmerge.analyze(model, x, rules="paper")


def test_paper_graph_is_a_subset_of_the_general_one(resnet34):
    _, _, general, paper = resnet34
    assert paper.rules == "paper"
    assert {s.id for s in paper.spans} < {s.id for s in general.spans}
    assert [u.id for u in paper.units] == [u.id for u in general.units]
    # every unit keeps the span that leaves it as it is
    for unit in paper.units:
        assert paper.single_unit_span(unit.id)


def test_the_stem_is_never_inside_a_span(resnet34):
    _, _, general, paper = resnet34
    assert all("conv1" not in s.units for s in multi_unit(paper))


def test_strided_basic_blocks_are_never_merged_whole(resnet34):
    """A basic block's strided 3×3 is followed by a 3×3: the break is its own position."""
    _, _, general, paper = resnet34
    for stage in ("layer2", "layer3", "layer4"):
        assert f"{stage}.0.conv1" in {p.id for p in paper.positions}
        assert not [s for s in multi_unit(paper) if f"{stage}.0.conv1" in s.units]
        whole = [s for s in multi_unit(general) if f"add:{stage}.0" in s.joins]
        assert whole, "the general rules do merge these blocks"
        assert not [s for s in multi_unit(paper) if f"add:{stage}.0" in s.joins]


def test_projection_shortcuts_merge_only_inside_whole_blocks():
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    paper = fxmerge.analyze(model, torch.randn(1, 3, 64, 64), rules="paper")
    for span in multi_unit(paper):
        for unit in span.units:
            if ".downsample." in unit:
                block = unit.split(".downsample.")[0]
                assert f"add:{block}" in span.joins, span.id
    # a bottleneck's strided 3×3 is followed by a 1×1 only: the whole block may merge, and the
    # break is at the block's output (the next block's source), which no span crosses
    ids = {s.id for s in paper.spans}
    assert "add:layer1.2->add:layer2.0" in ids
    assert "layer2.0.conv1->layer2.0.conv3" in ids
    assert not [s for s in paper.spans if "layer2.0.conv3" in s.units and "layer2.1.conv1" in s.units]


def test_at_most_one_strided_conv_and_only_1x1_after_it(resnet34):
    _, _, _, paper = resnet34
    for name in ("resnet34", "mobilenet_v2"):
        graph = paper if name == "resnet34" else fxmerge.analyze(
            torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64), rules="paper"
        )
        for span in multi_unit(graph):
            main_path = [u for u in units_of(graph, span) if ".downsample." not in u.id]
            order = sorted(main_path, key=lambda u: graph.position(u.output_position).index)
            seen = False
            for unit in order:
                if seen:
                    assert unit.conv.kernel_size == (1, 1) and not strided(unit), (name, span.id)
                seen = seen or strided(unit)


def test_mobilenet_v2_with_the_last_conv_excluded():
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 64, 64)
    graph = fxmerge.analyze(model, x, rules="paper", exclude=["features.18"])
    ids = {s.id for s in graph.spans}
    # an inverted residual with a strided depthwise conv merges whole (only a 1×1 follows it) ...
    assert "add:features.3->features.4.conv.2" in ids
    # ... and nothing crosses the position after it, the next residual block's source
    assert not [s for s in graph.spans if "features.4.conv.2" in s.units and "features.5.conv.0.0" in s.units]
    assert not [s for s in multi_unit(graph) if "features.18.0" in s.units]
    plan = Plan.random(graph, seed=3)
    plan.validate(graph)


class StridedThen(nn.Module):
    """stem → strided 3×3 → 1×1 → (3×3 → 3×3 + skip) or → 3×3, to place the break."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.point = nn.Conv2d(8, 8, 1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.point(torch.relu(self.down(x))))
        if self.residual:
            return torch.relu(self.b(torch.relu(self.a(x))) + x)
        return self.b(torch.relu(self.a(x)))


def test_break_at_the_residual_source_after_a_strided_conv():
    graph = fxmerge.analyze(StridedThen(residual=True).eval(), torch.randn(1, 3, 16, 16), rules="paper")
    ids = {s.id for s in graph.spans}
    assert "stem->point" in ids  # strided 3×3 then 1×1, up to the residual source
    assert "stem->add" not in ids and not [s for s in multi_unit(graph) if "down" in s.units and "a" in s.units]
    assert "point->add" in ids  # the whole block after the break


def test_break_at_the_strided_conv_when_a_wider_conv_follows():
    graph = fxmerge.analyze(StridedThen(residual=False).eval(), torch.randn(1, 3, 16, 16), rules="paper")
    assert not [s for s in multi_unit(graph) if "down" in s.units]
    assert "down->a" in {s.id for s in graph.spans}  # spans after the break are fine


class GroupedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dense = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.dense(torch.relu(self.grouped(torch.relu(self.stem(x)))))


def test_options_are_distinct_kernel_and_depthwise_with_the_heaviest_subset():
    model = GroupedPair().eval()
    with torch.no_grad():
        model.grouped.weight.mul_(10.0)  # the heavier conv of the two 3×3 options
    x = torch.randn(1, 3, 12, 12)
    general = fxmerge.analyze(model, x).span("stem->dense")
    paper = fxmerge.analyze(model, x, rules="paper").span("stem->dense")
    assert sorted((o.conv.kernel_size, o.conv.groups) for o in general.options) == [((3, 3), 1), ((3, 3), 2), ((5, 5), 1)]
    assert [(o.conv.kernel_size, o.pruned) for o in paper.options] == [((5, 5), ()), ((3, 3), ("dense",))]
    keys = [(o.conv.kernel_size, o.conv.is_depthwise) for o in paper.options]
    assert len(keys) == len(set(keys))


def test_a_random_paper_plan_merges_exactly():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    graph = fxmerge.analyze(model, x, rules="paper")
    for seed in range(2):
        plan = Plan.random(graph, seed=seed)
        assert plan.rules == "paper"
        linear = fxmerge.linearize(model, x, plan).eval()  # re-analyses with the plan's rules
        merged = fxmerge.merge(linear)
        with torch.no_grad():
            reference = linear(x)
            assert float((merged(x) - reference).abs().max() / reference.abs().max()) < 1e-4


@pytest.mark.parametrize("argv", [
    ["inspect", "torchvision:resnet34", "--rules", "paper", "--json"],
    ["inspect", "torchvision:mobilenet_v2", "--rules", "paper", "--exclude", "features.18", "--json"],
])
def test_inspect_with_paper_rules(argv, capsys):
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spans"] and report["entries"]
    assert any("paper rules" in r["node"] for r in report["rejections"])
