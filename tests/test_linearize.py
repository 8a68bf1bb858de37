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


def test_user_model_untouched_and_plan_attached():
    model = _randomise_bn(Chain())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    sg = fxmerge.analyze(model, x)
    plan = fxmerge.Plan.from_entries(
        sg, [e.id for e in sg.entries if e.span == "src:x->c3" and e.option.id == "keep"]
    )
    lin = fxmerge.linearize(model, x, plan, span_graph=sg)
    assert lin.fxmerge_plan == plan
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
