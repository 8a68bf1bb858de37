"""linearize: the keep-everything plan is the original network; plans apply as stated."""

import pytest
import torch
import torchvision
from torch import nn

import fxmerge
from fxmerge.ops import SPAN_END, SPAN_PAD, is_marker


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.c3(x)


def _randomise_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_keep_all_is_the_original_network():
    model = _randomise_bn(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    sg = fxmerge.analyze(model, x)
    lin = fxmerge.linearize(model, x, fxmerge.Plan.keep_all(sg), span_graph=sg).eval()
    with torch.no_grad():
        assert rel(lin(x), model(x)) <= 1e-6
    assert not any(is_marker(n, SPAN_PAD) for n in lin.graph.nodes)


def test_user_model_untouched_and_plan_marked_in_the_graph():
    model = _randomise_bn(Chain())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    sg = fxmerge.analyze(model, x)
    plan = fxmerge.Plan.from_entries(sg, [e.id for e in sg.entries if e.span == "src:x->c3" and e.option.id == "keep"])
    lin = fxmerge.linearize(model, x, plan, span_graph=sg)
    assert [n.args[2] for n in lin.graph.nodes if is_marker(n, SPAN_PAD)] == ["src:x->c3"]  # the plan rides along
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    # one span over three convs: two ReLUs gone, one pad in front, every conv unpadded
    targets = [n for n in lin.graph.nodes if is_marker(n, SPAN_PAD)]
    assert len(targets) == 1 and targets[0].args[1] == [3, 3, 3, 3]  # p1 + p2*s1 + p3*s1*s2
    assert sum(is_marker(n, SPAN_END) for n in lin.graph.nodes) == 1
    assert not any(n.target in (torch.relu,) for n in lin.graph.nodes)


def test_linearized_model_trains():
    model = _randomise_bn(Chain())
    x = torch.randn(4, 3, 16, 16)
    sg = fxmerge.analyze(model, x)
    lin = fxmerge.linearize(model, x, fxmerge.Plan.random(sg, seed=3), span_graph=sg).train()
    before = {k: v.detach().clone() for k, v in lin.named_parameters()}
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = lin(x).square().mean()
    loss.backward()
    opt.step()
    changed = [k for k, v in lin.named_parameters() if not torch.equal(before[k], v)]
    assert any(k.startswith("c1") for k in changed) and any(k.startswith("c3") for k in changed)


def test_stale_and_foreign_plans_are_refused():
    x = torch.randn(1, 3, 16, 16)
    chain = _randomise_bn(Chain())
    sg = fxmerge.analyze(chain, x)
    other = fxmerge.analyze(_randomise_bn(torchvision.models.resnet18()), torch.randn(1, 3, 32, 32))
    with pytest.raises(fxmerge.PlanError, match="made for model 'ResNet'"):
        fxmerge.linearize(chain, x, fxmerge.Plan.keep_all(other))
    whole = fxmerge.Plan.from_entries(sg, [e.id for e in sg.entries if e.span == "src:x->c3" and e.option.id == "keep"])
    shrunk = fxmerge.analyze(chain, x, max_kernel=3)  # the 7x7 span no longer exists
    with pytest.raises(fxmerge.PlanError, match="stale"):
        whole.validate(shrunk)


# --------------------------------------------------------------------------- regressions (issue #13)
class TrailingIdentity(nn.Module):
    """conv → BN → ReLU → Identity, twice: timm's anti-aliasing / attention ``Identity`` after the act."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.a1, self.i1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity()
        self.c2, self.b2, self.a2, self.i2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity()
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.i1(self.a1(self.b1(self.c1(x))))
        x = self.i2(self.a2(self.b2(self.c2(x))))
        return self.c3(x)


def _every_plan_merges(model, x, sg, plans, tol=1e-5):
    for plan in plans:
        lin = fxmerge.linearize(model, x, plan, span_graph=sg).eval()
        merged = fxmerge.merge(lin)
        with torch.no_grad():
            assert rel(merged(x), lin(x)) <= tol, plan.describe(sg)


def _plans_through(sg, *span_ids):
    """Plans choosing each option of the named spans, every other unit kept."""
    plans = []
    for span_id in span_ids:
        span = sg.span(span_id)
        for option in span.options:
            others = [sg.keep_entry(u.id) for u in sg.units if u.id not in span.units]
            plans.append(fxmerge.Plan.from_entries(sg, [f"{span.id}|{option.id}", *others]))
    return plans


def test_unit_ending_in_activation_then_identity_merges():
    model = _randomise_bn(TrailingIdentity())
    x = torch.randn(1, 3, 12, 12)
    sg = fxmerge.analyze(model, x)
    assert sg.unit("c1").activation_node == "a1" and sg.position("c1").node == "i1"
    _every_plan_merges(model, x, sg, _plans_through(sg, "src:x->c2", "c1->c3", "src:x->c3"))


def test_export_form_graph_linearizes_and_runs():
    """aten.conv2d takes its stride as a list: unpadding must not fill it with an int."""
    model = _randomise_bn(Chain())
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    sg = fxmerge.analyze(program.module(), x)
    plan = fxmerge.Plan.random(sg, seed=1)
    lin = fxmerge.linearize(program.module(), x, plan, span_graph=sg).eval()
    with torch.no_grad():
        assert rel(fxmerge.merge(lin)(x), lin(x)) <= 1e-5
    _every_plan_merges(program.module(), x, sg, _plans_through(sg, "src:x->c3"))


def test_exported_program_is_accepted_by_linearize():
    model = _randomise_bn(Chain())
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    sg = fxmerge.analyze(program, x)
    lin = fxmerge.linearize(program, x, fxmerge.Plan.keep_all(sg)).eval()
    with torch.no_grad():
        assert rel(lin(x), model(x)) <= 1e-6


class NoActivationThenSpan(nn.Module):
    """c1 (no activation) → c2 → ReLU → c3: pruning c2, whose unit ends without an activation
    before the next span starts, must not delete the node that marks the next span's start."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.b2(self.c2(x))
        return self.c4(torch.relu(self.c3(x)))


def test_pruned_last_unit_without_activation_keeps_next_span_start():
    model = _randomise_bn(NoActivationThenSpan())
    x = torch.randn(1, 3, 12, 12)
    sg = fxmerge.analyze(model, x)
    assert sg.unit("c2").activation is None
    plan = fxmerge.Plan.from_entries(sg, ["src:x->c2|prune:c2", "c2->c4|keep"])
    _every_plan_merges(model, x, sg, [plan])
    _every_plan_merges(
        model, x, sg, [fxmerge.Plan.from_entries(sg, ["src:x->c2|prune:c2", "c2->c3|keep", "c3->c4|keep"])]
    )


class BareConvBetweenSpans(nn.Module):
    """A conv with neither norm nor activation ends one span and starts the next (timm's SeparableConv2d)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # bare: its output is its position
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.d(torch.relu(self.c(self.b(torch.relu(self.a(x))))))


def test_span_starting_at_a_bare_conv_that_an_earlier_span_rewrote():
    model, x = BareConvBetweenSpans().eval(), torch.randn(1, 4, 10, 10)
    sg = fxmerge.analyze(model, x)
    assert sg.position("b").node == "b"
    plan = fxmerge.Plan.from_entries(sg, ["src:x->b|keep", "b->d|keep"])
    _every_plan_merges(model, x, sg, [plan])


class AssertedNorms(nn.Module):
    """timm's BatchNormAct2d: each norm asserts on its input's rank; one reshape reads a size inside a span."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        torch._assert(y.ndim == 4, "4-d")
        y = torch.relu(self.b1(y))
        z = self.c2(y)
        torch._assert(z.dim() == 4, "4-d")
        channels, height = z.size(1), z.shape[2]
        out = self.c3(torch.relu(self.b2(z)))
        return out.reshape(out.shape[0], channels, height, -1)


def test_shape_checks_inside_spans_keep_nothing_alive():
    model = _randomise_bn(AssertedNorms())
    x = torch.randn(2, 3, 9, 9)
    sg = fxmerge.analyze(model, torch.randn(1, 3, 9, 9))
    plan = fxmerge.Plan.from_entries(sg, ["src:x->c3|keep"])
    lin = fxmerge.linearize(model, torch.randn(1, 3, 9, 9), plan, span_graph=sg).eval()
    merged = fxmerge.merge(lin)
    with torch.no_grad():
        assert rel(merged(x), lin(x)) <= 1e-5  # at another batch size than the example's
        assert lin(x).shape == model(x).shape == (2, 6, 9, 9)
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 1
    assert sum(n.target is torch.nn.functional.conv2d for n in merged.graph.nodes) == 0
