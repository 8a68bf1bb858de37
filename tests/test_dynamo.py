"""The torch.compile backend: matches eager, merges a linearized model's spans, needs no import."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision

import fxmerge
from fxmerge.dynamo import fxmerge_backend
from fxmerge.nodes import conv_site as conv_info
from fxmerge.plan import Plan
from tests.test_merge import expected_convs, randomise_bn, rel


def convs(gm):
    return sum(conv_info(n, gm) is not None for n in gm.graph.nodes)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_backend_folds_batchnorm_and_matches_eager(name):
    model = randomise_bn(torchvision.models.get_model(name))
    x = torch.randn(2, 3, 32, 32)
    graphs = []
    compiled = torch.compile(model, backend=fxmerge_backend, options={"inner": "eager", "callback": graphs.append})
    with torch.no_grad():
        assert rel(compiled(x), model(x)) <= 1e-5
    assert sum(convs(g) for g in graphs) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for g in graphs for m in g.modules())


def test_backend_merges_a_linearized_model():
    model = randomise_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 32, 32)
    sg = fxmerge.analyze(model, x)
    plan = Plan.random(sg, seed=4)
    lin = fxmerge.linearize(model, x, plan, span_graph=sg).eval()
    graphs = []
    compiled = torch.compile(
        lin, backend="fxmerge", options={"inner": "eager", "plan": plan, "callback": graphs.append}
    )
    with torch.no_grad():
        assert rel(compiled(x), lin(x)) <= 1e-4
    assert sum(convs(g) for g in graphs) == expected_convs(sg, plan)


def test_backend_refuses_training_mode():
    model = torchvision.models.resnet18().train()
    compiled = torch.compile(model, backend=fxmerge_backend, options={"inner": "eager"})
    with pytest.raises(Exception, match="eval"):
        compiled(torch.randn(2, 3, 32, 32))


def test_inductor_inner_backend():
    model = randomise_bn(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, backend="fxmerge")
    with torch.no_grad():
        assert rel(compiled(x), model(x)) <= 1e-4


def test_backend_found_without_importing_fxmerge():
    script = textwrap.dedent(
        """
        import sys, torch, torchvision
        model = torchvision.models.resnet18().eval()
        x = torch.randn(1, 3, 32, 32)
        out = torch.compile(model, backend="fxmerge", options={"inner": "eager"})(x)
        assert torch.allclose(out, model(x), rtol=1e-4, atol=1e-4)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
