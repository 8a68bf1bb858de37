"""Paper rules: the LayerMerge search space.

* span by span against the reference implementation's own spaces
  (``../shared/reference/paper_space.json``: ResNet-34, MobileNetV2), with a readable
  difference when they disagree;
* on family members the file does not list (ResNet-18/50/101, Wide ResNet-50, ResNeXt-50,
  MobileNetV2 at other widths): span counts that follow the reference's pattern, options
  that are exactly the reachable merged convs, no span across a break, exact merges;
* the rules on small hand-made networks.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import fxmerge
from fxmerge import cli
from fxmerge.passes.rules import outside_table, paper_table
from fxmerge.passes.spans import MAX_MERGED_PARAMS
from fxmerge.plan import Plan

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "paper_space.json"

Key = tuple[str, tuple[str, ...]]  # (the conv after which the span starts, the span's convs in forward order)
OptionKey = tuple[int, int, bool]  # (kernel, stride, depthwise)


def option_key(option) -> OptionKey:
    conv = option.conv
    return (conv.kernel_size[0], conv.stride[0], conv.is_depthwise)


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


# --------------------------------------------------------------------- the reference's spaces
def reference_space(name: str) -> tuple[dict, dict[Key, set[OptionKey]]]:
    if not REFERENCE.exists():  # the workplace's shared folder sits next to the repository
        pytest.skip(f"{REFERENCE} not found")
    data = json.loads(REFERENCE.read_text())["models"][name]
    spans = {
        (s["after"], tuple(s["convs"])): {(o["kernel"], o["stride"], o["depthwise"]) for o in s["options"]}
        for s in data["span_list"]
    }
    return data, spans


def table_space(graph) -> dict[Key, set[OptionKey]]:
    """fxmerge's paper table in the reference's form: a span starts after the last main-path
    conv at or before its start position (a block output counts as after the block's last conv)."""
    outside = outside_table(graph)
    index = {p.id: p.index for p in graph.positions}
    stem = min(graph.units, key=lambda u: index[u.output_position]).id
    main = [u for u in graph.units if u.id not in outside or u.id == stem]

    def after(position: str) -> str:
        before = [u for u in main if index[u.output_position] <= index[position]]
        return max(before, key=lambda u: index[u.output_position]).id

    space: dict[Key, set[OptionKey]] = {}
    for span in paper_table(graph):
        key = (after(span.start), tuple(u for u in span.units if u not in outside))
        if key in space:  # a second span over the same convs: an extra span of its own
            key = (f"{key[0]} (again, as {span.id})", key[1])
        space[key] = {option_key(o) for o in span.options}
    return space


def difference(reference: dict[Key, set], actual: dict[Key, set]) -> str:
    """Missing spans, extra spans and option differences, one line each."""

    def name(key: Key) -> str:
        after, convs = key
        inside = convs[0] if len(convs) == 1 else f"{convs[0]} … {convs[-1]} ({len(convs)} convs)"
        return f"after {after}: {inside}"

    def listed(options: set[OptionKey]) -> str:
        return " ".join(f"{k}" + (f"s{s}" if s > 1 else "") + ("dw" if dw else "") for k, s, dw in sorted(options))

    missing = sorted(reference.keys() - actual.keys())
    extra = sorted(actual.keys() - reference.keys())
    changed = sorted(k for k in reference.keys() & actual.keys() if reference[k] != actual[k])
    lines = [f"reference {len(reference)} spans, fxmerge {len(actual)}"]
    lines += [f"missing ({len(missing)}):"] + [f"  {name(k)} [{listed(reference[k])}]" for k in missing]
    lines += [f"extra ({len(extra)}):"] + [f"  {name(k)} [{listed(actual[k])}]" for k in extra]
    lines += [f"options differ ({len(changed)}):"] + [
        f"  {name(k)}: reference [{listed(reference[k])}], fxmerge [{listed(actual[k])}]" for k in changed
    ]
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["resnet34", "mobilenet_v2"])
def test_the_reference_search_space_span_by_span(name):
    data, reference = reference_space(name)
    args = data["inspect_args"]
    exclude = [args[k + 1] for k, a in enumerate(args) if a == "--exclude"]
    model = torchvision.models.get_model(name).eval()
    graph = fxmerge.analyze(model, torch.randn(*data["input_shape"]), rules="paper", exclude=exclude)
    actual = table_space(graph)
    assert actual == reference, f"{name}: the paper table differs from the reference\n" + difference(reference, actual)
    assert (len(actual), sum(map(len, actual.values()))) == (data["spans"], data["entries"])
    assert dict(graph.settings) == {"max_kernel": "None", "max_units": "None"}


@pytest.mark.parametrize("name,max_kernel", [("resnet34", 5), ("mobilenet_v2", 7)])
def test_a_user_max_kernel_cuts_the_reference_table_to_its_small_options(name, max_kernel):
    data, reference = reference_space(name)
    args = data["inspect_args"]
    exclude = [args[k + 1] for k, a in enumerate(args) if a == "--exclude"]
    model = torchvision.models.get_model(name).eval()
    graph = fxmerge.analyze(
        model, torch.randn(*data["input_shape"]), rules="paper", exclude=exclude, max_kernel=max_kernel
    )
    cut = {key: {o for o in options if o[0] <= max_kernel} for key, options in reference.items()}
    expected = {key: options for key, options in cut.items() if options}
    actual = table_space(graph)
    assert actual == expected, difference(expected, actual)


def test_units_outside_the_table_keep_one_fixed_span(resnet34):
    """The stem and the projection shortcuts (and excluded convs): never a choice of their own."""
    _, _, _, paper = resnet34
    outside = outside_table(paper)
    assert list(outside) == ["conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    for unit in outside:  # ResNet-34's projection blocks are strided: they never merge whole
        assert [s for s in paper.spans if unit in s.units] == [paper.single_unit_span(unit)]
        assert len(paper.single_unit_span(unit).options) == 1
    table = paper_table(paper)
    assert len(paper.spans) == len(table) + len(outside)
    note = [r.reason for r in paper.rejections if r.reason.startswith("search table")]
    assert note and f"{len(table)} spans" in note[0] and "conv1 (the stem)" in note[0]


def test_the_difference_is_readable():
    reference = {("a", ("b", "c")): {(3, 1, False), (5, 1, False)}, ("a", ("b",)): {(3, 1, False)}}
    actual = {("a", ("b", "c")): {(3, 1, False)}, ("c", ("d",)): {(3, 2, True)}}
    text = difference(reference, actual)
    assert "missing (1):\n  after a: b [3]" in text
    assert "extra (1):\n  after c: d [3s2dw]" in text
    assert "options differ (1):\n  after a: b … c (2 convs): reference [3 5], fxmerge [3]" in text


# --------------------------------------------------------------------- the families, beyond the file
FAMILY = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "mobilenet_v2_0.5": lambda: torchvision.models.mobilenet_v2(width_mult=0.5),
    "mobilenet_v2_1.4": lambda: torchvision.models.mobilenet_v2(width_mult=1.4),
}


def expected_span_count(model: nn.Module) -> int:
    """The reference's pattern. ResNet, per stage: the spans inside each block (a basic block:
    its two convs; a bottleneck: conv1, conv1–2, conv2, conv2–3, conv3, less conv2–3 when conv2
    is strided) and every run of whole blocks, the strided first block excepted.
    MobileNetV2 (last 1×1 excluded): the same 171 at every width."""
    if isinstance(model, torchvision.models.MobileNetV2):
        return 171
    inside = 5 if isinstance(model.layer1[0], Bottleneck) else 2
    total = 0
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        down = stage[0].downsample
        is_strided = down is not None and down[0].stride[0] > 1
        whole = len(stage) - 1 if is_strided else len(stage)
        total += inside * len(stage) - (is_strided and inside == 5) + whole * (whole + 1) // 2
    return total


def reachable(graph, span, outside) -> set[OptionKey]:
    """The reference's option rule, counted per conv kind: kernel 1 + Σ(k − 1) over the kept
    convs, the span's stride, depthwise when every kept conv is; reducible convs may go, one
    stays. fxmerge also drops merged convs over MAX_MERGED_PARAMS weights."""
    convs = [graph.unit(u) for u in span.units if u not in outside]
    kinds: dict[tuple[int, bool], list[int]] = {}
    for unit in convs:
        low_high = kinds.setdefault((unit.conv.kernel_size[0], unit.conv.is_depthwise), [0, 0])
        low_high[0] += not unit.reducible
        low_high[1] += 1
    stride = max(u.conv.stride[0] for u in convs)
    c_in, c_out = (graph.position(p).shape[1] for p in (span.start, span.end))
    found = set()
    for counts in itertools.product(*(range(lo, hi + 1) for lo, hi in kinds.values())):
        if not any(counts):
            continue
        kernel = 1 + sum((k - 1) * n for (k, _), n in zip(kinds, counts))
        depthwise = all(dw or not n for (_, dw), n in zip(kinds, counts))
        weights = c_out * (1 if depthwise else c_in) * kernel * kernel
        if len(convs) == 1 or weights <= MAX_MERGED_PARAMS:
            found.add((kernel, stride, depthwise))
    return found


def assert_no_span_crosses_a_break(graph, table, outside, residual_strides: bool) -> None:
    """ResNet: a strided conv is the last conv of every span holding it. MobileNetV2: only
    1×1 convs follow it, and the span ends inside the strided block."""
    for span in table:
        convs = [graph.unit(u) for u in span.units if u not in outside]
        for k, unit in enumerate(convs):
            if not strided(unit) or len(convs) == 1:
                continue
            rest = convs[k + 1 :]
            if residual_strides:
                assert not rest, span.id
            else:
                assert all(u.conv.kernel_size == (1, 1) and not strided(u) for u in rest), span.id
                assert all(u.id.split(".")[1] == unit.id.split(".")[1] for u in rest), span.id


@pytest.mark.parametrize("name", FAMILY)
def test_family_members_follow_the_reference_pattern(name):
    model = FAMILY[name]().eval()
    is_mobilenet = isinstance(model, torchvision.models.MobileNetV2)
    graph = fxmerge.analyze(
        model, torch.randn(1, 3, 64, 64), rules="paper", exclude=["features.18"] if is_mobilenet else []
    )
    outside = outside_table(graph)
    table = paper_table(graph)
    assert len(table) == expected_span_count(model)
    for span in table:
        assert {option_key(o) for o in span.options} == reachable(graph, span, outside), span.id
    assert_no_span_crosses_a_break(graph, table, outside, residual_strides=not is_mobilenet)
    Plan.random(graph, seed=0).validate(graph)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


def assert_random_paper_plans_merge(model: nn.Module, seeds, exclude=()) -> None:
    torch.manual_seed(0)
    model = randomise_bn(model)
    x = torch.randn(1, 3, 32, 32)
    graph = fxmerge.analyze(model, x, rules="paper", exclude=list(exclude))
    for seed in seeds:
        plan = Plan.random(graph, seed=seed)
        linear = fxmerge.linearize(model, x, plan, span_graph=graph).eval()
        merged = fxmerge.merge(linear)
        with torch.no_grad():
            reference = linear(x)
            error = float((merged(x) - reference).abs().max() / reference.abs().max())
        assert error < 1e-4, (plan.method, error)


SMALL_MEMBERS = {
    "mobilenet_v2_0.5": lambda: torchvision.models.mobilenet_v2(width_mult=0.5),
    "bottleneck_2211": lambda: ResNet(Bottleneck, [2, 2, 1, 1]),
    "grouped_bottleneck_2211": lambda: ResNet(Bottleneck, [2, 2, 1, 1], groups=4, width_per_group=16),
    "basic_3111": lambda: ResNet(BasicBlock, [3, 1, 1, 1]),
}


@pytest.mark.parametrize("name", SMALL_MEMBERS)
def test_random_paper_plans_merge_exactly_on_small_members(name):
    model = SMALL_MEMBERS[name]()
    assert_random_paper_plans_merge(model, seeds=(0, 1), exclude=("features.18",) if "mobilenet" in name else ())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v2_1.4"])
def test_random_paper_plans_merge_exactly_on_family_members(name):
    assert_random_paper_plans_merge(FAMILY[name](), seeds=(0, 1, 2))


# --------------------------------------------------------------------- the rules, one by one


def test_paper_spans_within_the_general_bounds_are_general_spans(resnet34):
    _, _, general, paper = resnet34
    assert paper.rules == "paper"
    assert [u.id for u in paper.units] == [u.id for u in general.units]
    assert {s.id for s in paper.spans if len(s.units) <= 12} < {s.id for s in general.spans}
    for unit in paper.units:  # every unit keeps the span that leaves it as it is
        assert paper.single_unit_span(unit.id)
    # no kernel cap: five stage-3 blocks offer up to 21×21, the general rules stop at 15
    whole = paper.span("add:layer3.0->add:layer3.5")
    assert max(o.conv.kernel_size[0] for o in whole.options) == 21
    assert max(o.conv.kernel_size[0] for o in general.span("add:layer3.0->add:layer3.5").options) == 15


def test_the_stem_is_never_inside_a_span(resnet34):
    _, _, _, paper = resnet34
    assert all("conv1" not in s.units for s in multi_unit(paper))


def test_a_whole_residual_branch_from_its_source_is_the_whole_block(resnet34):
    _, _, general, paper = resnet34
    assert "add:layer1.0->layer1.1.conv2" in {s.id for s in general.spans}  # the branch without its skip
    ids = {s.id for s in paper.spans}
    assert "add:layer1.0->layer1.1.conv2" not in ids and "add:layer1.0->add:layer1.1" in ids
    assert "layer1.1.conv1->layer1.1.conv2" in ids  # a branch's tail stays


def test_strided_basic_blocks_are_never_merged_whole(resnet34):
    """A basic block's strided 3×3 is followed by a 3×3: the break is its own position."""
    _, _, general, paper = resnet34
    for stage in ("layer2", "layer3", "layer4"):
        assert f"{stage}.0.conv1" in {p.id for p in paper.positions}
        assert not [s for s in multi_unit(paper) if f"{stage}.0.conv1" in s.units]
        whole = [s for s in multi_unit(general) if f"add:{stage}.0" in s.joins]
        assert whole, "the general rules do merge these blocks"
        assert not [s for s in multi_unit(paper) if f"add:{stage}.0" in s.joins]


def test_a_strided_bottleneck_breaks_at_its_strided_conv():
    """The reference breaks a strided bottleneck after its strided 3×3 (ResNet-50 positions
    11, 23, 41), not after the 1×1 that follows it: the block never merges whole."""
    torch.manual_seed(0)
    paper = fxmerge.analyze(torchvision.models.resnet50().eval(), torch.randn(1, 3, 64, 64), rules="paper")
    ids = {s.id for s in paper.spans}
    assert "add:layer1.2->layer2.0.conv2" in ids  # conv1–conv2, ending at the break
    assert "layer2.0.conv2->layer2.0.conv3" in ids  # conv3 alone after it
    assert "add:layer1.2->add:layer2.0" not in ids and "layer2.0.conv1->layer2.0.conv3" not in ids
    for span in multi_unit(paper):
        for unit in span.units:
            if ".downsample." in unit:  # projection shortcuts merge only inside whole blocks
                assert f"add:{unit.split('.downsample.')[0]}" in span.joins, span.id
    assert "src:maxpool->add:layer1.0" in ids  # a stride-1 projection block merges whole


def test_at_most_one_strided_conv_and_only_1x1_after_it(resnet34):
    _, _, _, paper = resnet34
    mobilenet = fxmerge.analyze(torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64), rules="paper")
    for name, graph in (("resnet34", paper), ("mobilenet_v2", mobilenet)):
        for span in multi_unit(graph):
            main_path = [graph.unit(u) for u in span.units if ".downsample." not in u]
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
    # a span of 21 convs: no bound on a span's units under the paper rules
    assert "features.7.conv.2->features.14.conv.2" in ids
    assert len(graph.span("features.7.conv.2->features.14.conv.2").units) == 21
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
    assert sorted((o.conv.kernel_size, o.conv.groups) for o in general.options) == [
        ((3, 3), 1),
        ((3, 3), 2),
        ((5, 5), 1),
    ]
    assert [(o.conv.kernel_size, o.pruned) for o in paper.options] == [((5, 5), ()), ((3, 3), ("dense",))]
    keys = [(o.conv.kernel_size, o.conv.is_depthwise) for o in paper.options]
    assert len(keys) == len(set(keys))


class Chain(nn.Module):
    """A stem and ten C→C 3×3 convs, conv ``k``'s weights scaled by ``k + 1``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(10))
        with torch.no_grad():
            for k, conv in enumerate(self.convs):
                conv.weight.copy_(torch.full_like(conv.weight, 0.01 * (k + 1)))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


@pytest.mark.parametrize("rules", ["general", "paper"])
def test_options_are_exact_for_many_reducible_convs(rules):
    """Ten reducible convs: every kernel 3…21 is reachable (an enumeration capped at two pruned
    convs offered only 17, 19 and 21), each by keeping the heaviest, i.e. the last, convs."""
    graph = fxmerge.analyze(Chain().eval(), torch.randn(1, 3, 24, 24), rules=rules, max_kernel=21)
    span = graph.span("stem->convs.9")
    assert sorted(o.conv.kernel_size[0] for o in span.options) == list(range(3, 22, 2))
    for option in span.options:
        kept = (option.conv.kernel_size[0] - 1) // 2
        assert option.pruned == tuple(f"convs.{k}" for k in range(10 - kept)), option.id


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


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "torchvision:resnet34", "--rules", "paper", "--json"],
        ["inspect", "torchvision:mobilenet_v2", "--rules", "paper", "--exclude", "features.18", "--json"],
    ],
)
def test_inspect_with_paper_rules(argv, capsys):
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spans"] and report["entries"]
    assert any("paper rules" in r["node"] for r in report["rejections"])
