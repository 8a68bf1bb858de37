"""merge: exact against the linearized graph, in fp32 and fp64, with the promised conv count."""

import copy
import inspect

import pytest
import torch
import torchvision
from torch import nn

import fxmerge
from fxmerge.plan import Plan


def rel(a, b):
    """Largest error over the reference's largest magnitude; dict / tuple outputs (segmentation) compare leaf-wise."""
    if isinstance(b, dict):
        return max(rel(a[k], b[k]) for k in b)
    if isinstance(b, (tuple, list)):
        return max(rel(x, y) for x, y in zip(a, b))
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)  # ViT's head starts at zero


def randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


def conv_nodes(gm):
    from fxmerge.nodes import conv_site as conv_info

    return sum(conv_info(n, gm) is not None for n in gm.graph.nodes)


def expected_convs(sg, plan):
    in_spans = {u for e in plan.chosen(sg) for u in sg.span(e.span).units}
    kept = sum(not e.option.identity for e in plan.chosen(sg))  # an identity option leaves no conv
    return kept + sum(u.id not in in_spans for u in sg.units)


def _inputs(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _double(x) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in _inputs(x))


def check_model(model, x, plans, tol=1e-4):
    """Every plan linearizes and merges exactly; ``x`` is the input, or a tuple of inputs."""
    sg = fxmerge.analyze(model, x)
    seen = set()
    for plan in plans(sg):
        if plan.entries in seen:  # a model with few spans draws the same plan again
            continue
        seen.add(plan.entries)
        lin = fxmerge.linearize(model, x, plan, span_graph=sg).eval()
        merged = fxmerge.merge(lin)
        with torch.no_grad():
            reference = lin(*_inputs(x))
            error = rel(merged(*_inputs(x)), reference)
            if error > tol and _inputs(x)[0].dtype == torch.float32:
                error = float64_error(lin, x, error)
            assert error <= tol, plan.method
            if plan.method == "keep_all":
                assert rel(reference, model(*_inputs(x))) <= tol
        assert conv_nodes(merged) == expected_convs(sg, plan), plan.method
        check_promised_convs(merged, sg, plan)


def check_promised_convs(merged, sg, plan):
    """Every merged conv is exactly the conv its option promised (the one the latency table timed)."""
    chosen = {e.span: e for e in plan.chosen(sg)}
    for node in merged.graph.nodes:
        span = node.meta.get("fxmerge_span")
        if span is None:
            continue
        conv, promised = merged.get_submodule(node.target), chosen[span].conv
        emitted = (
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            tuple(conv.padding),
            tuple(conv.dilation),
            conv.groups,
        )
        expected = (
            promised.in_channels,
            promised.out_channels,
            promised.kernel_size,
            promised.stride,
            promised.padding,
            promised.dilation,
            promised.groups,
        )
        assert emitted == expected, f"span {span}: merged conv {emitted}, option promised {expected}"


def float64_error(lin, x, error32):
    """The merge error in float64, for a plan whose linearized network is ill-conditioned in fp32.

    A random plan on a deep random-init network can drop so many activations that the
    network itself amplifies rounding (EfficientNetV2's gates saturate on 1e5-sized
    inputs): its own fp32 forward then disagrees with its fp64 forward by more than the
    tolerance, and no fp32 merge could match it. Such a plan is checked in float64,
    where rounding is 1e-16; a well-conditioned one keeps the fp32 result.
    """
    lin64 = copy.deepcopy(lin).double()
    reference64 = lin64(*_double(x))
    conditioning = rel(_to_double(lin(*_inputs(x))), reference64)
    if conditioning <= error32 / 10:
        return error32  # fp32 itself is accurate here: the merge error is real
    return rel(fxmerge.merge(lin64)(*_double(x)), reference64)


def _to_double(output):
    if isinstance(output, dict):
        return {k: _to_double(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_to_double(v) for v in output)
    return output.double() if isinstance(output, torch.Tensor) else output


def keep_and_random(count):
    return lambda sg: [Plan.keep_all(sg)] + [Plan.random(sg, seed=s) for s in range(count)]


FAST_ZOO = [("mobilenet_v2", 32), ("squeezenet1_0", 64)]


@pytest.mark.parametrize("name,size", FAST_ZOO)
def test_zoo_fast(name, size):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomise_bn(torchvision.models.get_model(name, **kwargs))
    check_model(model, torch.randn(1, 3, size, size), keep_and_random(2))


def test_resnet18_one_random_plan():
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18())
    check_model(model, torch.randn(1, 3, 32, 32), lambda sg: [Plan.random(sg, seed=1)])


CLASSIFICATION = torchvision.models.list_models(module=torchvision.models)
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)


def _input_size(name: str) -> int:
    if name == "inception_v3":
        return 299
    if name.startswith(("vit_", "swin", "maxvit")):
        return 224  # fixed positional embeddings / window partitioning
    return 64


def _build(name: str) -> nn.Module:
    builder = torchvision.models.get_model_builder(name)
    kwargs = {}
    parameters = inspect.signature(builder).parameters
    if "weights_backbone" in parameters:
        kwargs["weights_backbone"] = None  # never download
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.get_model(name, weights=None, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_zoo_slow(name):
    size = _input_size(name)
    model = _build(name)
    torch.manual_seed(1)
    check_model(model, torch.randn(1, 3, size, size), keep_and_random(3))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 6, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Conv1d(6, 6, 3, padding=2, dilation=2)
        self.c = nn.Conv1d(6, 6, 3, padding=1, groups=3)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        return torch.relu(self.c(torch.relu(self.b(y))) + y)


def test_conv1d_and_float64_exactness():
    model = randomise_bn(Conv1dNet()).double()
    x = torch.randn(2, 3, 41, dtype=torch.float64)
    check_model(model, x, keep_and_random(6), tol=1e-10)


def test_no_plan_folds_batchnorm_only():
    model = randomise_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 32, 32)
    merged = fxmerge.merge(torch.fx.symbolic_trace(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    assert conv_nodes(merged) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    with torch.no_grad():
        assert rel(merged(x), model(x)) <= 1e-5


def test_training_mode_is_refused():
    model = torchvision.models.resnet18().train()
    with pytest.raises(fxmerge.MergeError, match="eval mode"):
        fxmerge.merge(torch.fx.symbolic_trace(model))


def test_plan_from_another_model_is_refused():
    model = randomise_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 32, 32)
    sg = fxmerge.analyze(model, x)
    lin = fxmerge.linearize(model, x, Plan.random(sg, seed=2), span_graph=sg).eval()
    with pytest.raises(fxmerge.PlanError, match="did not choose"):
        fxmerge.merge(lin, plan=Plan.keep_all(sg))


def test_merged_model_exports():
    model = randomise_bn(torchvision.models.mobilenet_v2())
    x = torch.randn(1, 3, 32, 32)
    sg = fxmerge.analyze(model, x)
    merged = fxmerge.merge(fxmerge.linearize(model, x, Plan.random(sg, seed=0), span_graph=sg).eval())
    exported = torch.export.export(merged, (x,))
    with torch.no_grad():
        assert rel(exported.module()(x), merged(x)) <= 1e-5
    import io

    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(merged, (x,), buffer, dynamo=False, opset_version=17)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel(torch.from_numpy(out), merged(x).detach()) <= 1e-4
