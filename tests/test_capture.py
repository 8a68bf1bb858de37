"""Capture: the user's model is left alone, odd inputs and outputs work, untraceable
code is kept whole or reported, and the three graph forms give the same span graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.api import analyze_captured
from fxmerge.capture import CaptureError, capture, capture_backend_graph
from fxmerge.fxutil import shape_of
from tests.models import TopLevelUntraceable, build, example_input


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the user's model
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_is_not_mutated_or_remoded(train):
    model = build("basic_block", train=train)
    modes = {name: m.training for name, m in model.named_modules()}
    before = _state(model)
    children = dict(model.named_modules())

    fxmerge.analyze(model, example_input("basic_block"))

    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert dict(model.named_modules()) == children  # no module replaced


def test_training_mode_model_is_analysed_in_eval_mode():
    """BatchNorm folds (eval semantics) even when the user's model is in training mode."""
    graph = fxmerge.analyze(build("conv_chain", train=True), example_input("conv_chain"))
    assert all(len(u.affine_nodes) == 1 for u in graph.units)
    assert len([s for s in graph.spans if len(s.units) > 1]) == 3


def test_capture_records_shapes_and_dtypes():
    captured = capture(build("downsample_block"), example_input("downsample_block"))
    assert captured.form == "symbolic_trace"
    shapes = {n.name: shape_of(n) for n in captured.gm.graph.nodes}
    assert shapes["x"] == (1, 3, 32, 32)
    assert shapes["conv1"] == (1, 16, 16, 16)
    assert shapes["downsample_0"] == (1, 16, 16, 16)
    assert all(
        n.meta["tensor_meta"].dtype == torch.float32
        for n in captured.gm.graph.nodes
        if n.op not in ("output", "get_attr") and shape_of(n) is not None
    )


def test_shapes_come_from_the_real_run_when_meta_cannot_run_the_model():
    """A kept-whole leaf with data-dependent control flow cannot run on the meta device."""
    captured = capture(build("untraceable_child"), example_input("untraceable_child"))
    assert shape_of(next(n for n in captured.gm.graph.nodes if n.name == "gate")) == (1, 8, 16, 16)


# --------------------------------------------------------------------------- inputs and outputs
def test_tuple_inputs():
    graph = fxmerge.analyze(build("tuple_input"), example_input("tuple_input"))
    assert graph.input_shapes == ((1, 3, 16, 16), (1, 3, 16, 16))
    sources = [p.id for p in graph.positions if p.kind == "source"]
    assert sources == ["src:x", "src:y"]
    assert graph.unit("conv_x.0").input_position == "src:x"
    assert graph.unit("conv_y.0").input_position == "src:y"
    # the two convs meet at an add with no common source: kept as it is, body still merges
    assert graph.join("add").operands == ("conv_x.0", "conv_y.0")
    assert any("no common source" in r.reason for r in graph.rejections)
    assert "add->body.1.0" in {s.id for s in graph.spans}


def test_example_input_may_be_a_list():
    x, y = example_input("tuple_input")
    graph = fxmerge.analyze(build("tuple_input"), [x, y])
    assert len(graph.input_shapes) == 2


def test_dict_output():
    graph = fxmerge.analyze(build("dict_output"), example_input("dict_output"))
    assert graph.position("body.1.0").pinned == "a model output"
    assert graph.position("head.0").pinned == "a model output"
    assert graph.rejections == ()


def test_namedtuple_output():
    graph = fxmerge.analyze(build("namedtuple_output"), example_input("namedtuple_output"))
    assert graph.position("left.0").pinned == "a model output"
    assert graph.position("right.0").pinned == "a model output"
    assert graph.rejections == ()  # the namedtuple constructor is output structure, not a boundary


def test_bad_example_input_is_a_capture_error():
    with pytest.raises(CaptureError, match="example input"):
        fxmerge.analyze(build("conv_chain"), torch.randn(1, 5, 16, 16))
    with pytest.raises(TypeError, match="example_input"):
        fxmerge.analyze(build("conv_chain"), "not a tensor")


# --------------------------------------------------------------------------- untraceable code
def test_untraceable_submodule_is_kept_whole_and_reported():
    model = build("untraceable_child")
    graph = fxmerge.analyze(model, example_input("untraceable_child"))
    gate = [r for r in graph.rejections if r.node == "gate"]
    assert len(gate) == 1
    assert "untraceable" in gate[0].reason and "control flow" in gate[0].reason
    # the leaf's output starts a chain; the convs after it still merge
    assert graph.unit("post.0.0").input_position == "src:gate"
    assert "src:gate->post.1.0" in {s.id for s in graph.spans}
    assert graph.position("pre.0").pinned.startswith("read by gate")
    fxmerge.Plan.random(graph, seed=0).validate(graph)


def test_untraceable_top_level_forward_raises_capture_error():
    with pytest.raises(fxmerge.CaptureError, match=r"control flow") as info:
        fxmerge.analyze(TopLevelUntraceable().eval(), torch.randn(1, 3, 16, 16))
    assert "torch.export (strict=False)" in str(info.value)  # the fallback was tried, and said so
    assert "torch.export-ed program" in str(info.value)  # says what to do instead


class _ShapeGuarded(nn.Module):
    """smp's ``check_input_shape``: Python control flow on the input's shape at the top level."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )

    def forward(self, x):
        if x.shape[-1] % 8 != 0:
            raise ValueError("the input size must be divisible by 8")
        return self.body(x)


class _OptionalArguments(nn.Module):
    """diffusers' UNet2DModel: optional arguments tested with ``is None`` and a return flag."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.embed = nn.Embedding(4, 8)

    def forward(self, x, t, class_labels=None, return_dict=True):
        h = self.body(x) + t.reshape(-1, 1, 1, 1)
        if class_labels is not None:
            h = h + self.embed(class_labels)[:, :, None, None]
        return {"sample": h} if return_dict else (h,)


def test_top_level_control_flow_falls_back_to_export_and_says_so():
    captured = capture(_ShapeGuarded().eval(), torch.randn(1, 3, 16, 16))
    assert captured.form == "export"
    assert any("torch.export (strict=False, dynamic batch)" in note for note in captured.notes)
    graph = analyze_captured(captured)
    assert "src:x->body.3" in {s.id for s in graph.spans}


class _BatchReshape(nn.Module):
    """Attention-style reshapes from ``x.shape`` behind a shape check: export bakes them unless batch is dynamic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, t):
        if x.shape[-1] % 4 != 0:
            raise ValueError("the input size must be divisible by 4")
        n, c, h, w = x.shape
        y = self.conv(x).reshape(n, 4, h * w).softmax(-1).reshape(n, 4, h, w)
        return y * t.reshape(n, 1, 1, 1)


class _BatchOfOne(nn.Module):
    """A model that only runs at batch 1 (it flattens the batch away): exported statically."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 4 != 0:
            raise ValueError("the input size must be divisible by 4")
        return self.conv(x).reshape(4, 8, 8)


def test_export_capture_keeps_the_batch_dimension_dynamic():
    model = _BatchReshape().eval()
    captured = capture(model, (torch.randn(1, 3, 8, 8), torch.tensor([2.0])))
    assert any("dynamic batch" in note for note in captured.notes)
    x, t = torch.randn(5, 3, 8, 8), torch.randn(5)
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(x, t), model(x, t))
    static = capture(_BatchOfOne().eval(), torch.randn(1, 3, 8, 8))
    assert static.form == "export" and not any("dynamic batch" in note for note in static.notes)


def test_arguments_not_given_keep_their_python_defaults():
    model, x, t = _OptionalArguments().eval(), torch.randn(1, 3, 8, 8), torch.tensor([3.0])
    captured = capture(model, (x, t))
    assert captured.form == "symbolic_trace" and captured.notes == ()
    assert [n.target for n in captured.gm.graph.nodes if n.op == "placeholder"] == ["x", "t"]
    assert not any(n.op == "call_module" and n.target == "embed" for n in captured.gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(captured.gm(x, t)["sample"], model(x, t)["sample"])
    graph = analyze_captured(captured)
    assert "src:x->body.2" in {s.id for s in graph.spans}


def test_missing_required_argument_is_a_clear_error():
    with pytest.raises(CaptureError, match=r"needs argument\(s\) \['t'\]"):
        capture(_OptionalArguments().eval(), torch.randn(1, 3, 8, 8))


# --------------------------------------------------------------------------- three graph forms
def _dynamo_graph(model, x):
    """The graph and example inputs ``torch.compile`` hands a backend."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        torch.compile(model, backend=grab)(*inputs)
    torch._dynamo.reset()
    assert len(graphs) == 1, "expected no graph break"
    return graphs[0]


def _three_forms(name):
    model, x = build(name), example_input(name)
    inputs = x if isinstance(x, tuple) else (x,)
    traced = fxmerge.analyze(model, x)
    gm, example_inputs = _dynamo_graph(model, x)
    captured = capture_backend_graph(gm, example_inputs, name=type(model).__name__)
    dynamo = analyze_captured(captured)
    exported_program = torch.export.export(model, inputs)
    exported = fxmerge.analyze(exported_program, x)
    exported_module = fxmerge.analyze(exported_program.module(), x)
    return {"symbolic_trace": traced, "dynamo": dynamo, "export": exported, "export.module()": exported_module}


def _structure(graph):
    return {
        "entry convs": sorted(e.conv.signature() for e in graph.entries),
        "positions": [(p.kind, p.activation, p.shape, p.pinned is not None) for p in graph.positions],
        "unit ids": [u.id for u in graph.units],
        "join ids": [j.id for j in graph.joins],
        "position ids": [p.id for p in graph.positions],
        "span ids": [s.id for s in graph.spans],
        "entry ids": [e.id for e in graph.entries],
        "chains": graph.chains,
        "fingerprint": graph.fingerprint,
    }


FORM_CASES = [
    "basic_block",
    "downsample_block",
    "inverted_residual",
    "inception",
    "conv_chain",
    "functional_activations",
    "shared_conv",
    "depthwise_chain",
    "conv1d_chain",
    "dict_output",
    "namedtuple_output",
    "tuple_input",
]


@pytest.mark.parametrize("name", FORM_CASES)
def test_three_graph_forms_give_the_same_span_graph(name):
    """symbolic_trace, a torch.compile backend graph and torch.export agree on
    everything: entries, positions, and every id (units from weight paths, joins and
    sources from module paths)."""
    forms = _three_forms(name)
    reference = _structure(forms["symbolic_trace"])
    assert reference["entry convs"]
    for form, graph in forms.items():
        structure = _structure(graph)
        for key, value in reference.items():
            assert structure[key] == value, f"{form} differs in {key}"


def test_backend_graph_parameters_become_constants():
    model, x = build("inverted_residual"), example_input("inverted_residual")
    gm, example_inputs = _dynamo_graph(model, x)
    captured = capture_backend_graph(gm, example_inputs)
    assert captured.form == "dynamo"
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1  # only x; every weight and BN statistic is a get_attr now
    assert captured.runtime_inputs == (next(i for i, t in enumerate(example_inputs) if t.shape == x.shape),)
    assert torch.allclose(captured.gm(x)[0], model(x), atol=1e-6)


def test_export_relu6_and_inplace_ops_are_recognised():
    model, x = build("inverted_residual"), example_input("inverted_residual")
    graph = fxmerge.analyze(torch.export.export(model, (x,)), x)
    assert [u.activation for u in graph.units] == ["relu6", "relu6", "relu6", None, "relu6"]
    assert graph.rejections == ()  # export's _guards_fn is dropped, not reported


def test_reflect_padding_is_a_boundary_in_every_form():
    """symbolic_trace sees a Conv2d(padding_mode="reflect") (an ineligible unit);
    torch.compile and torch.export see an explicit reflect pad followed by an unpadded
    conv, so the pad is the boundary there. Either way no span crosses the padding."""
    forms = _three_forms("reflect_padding")
    traced = forms["symbolic_trace"]
    assert traced.unit("conv_b").ineligible.startswith("padding_mode='reflect'")
    assert not any("conv_b" in s.units and len(s.units) > 1 for s in traced.spans)
    for form in ("dynamo", "export"):
        graph = forms[form]
        assert any(r.reason.startswith("pad is not") for r in graph.rejections), form
        assert graph.unit("conv_b").input_position == "src:conv_b", form  # starts at the pad's output
        assert not any(s.start == "conv_a" and len(s.units) > 1 for s in graph.spans), form


def _torchvision_three_forms(name: str, size: int):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    traced = fxmerge.analyze(model, x)
    gm, example_inputs = _dynamo_graph(model, x)
    dynamo = analyze_captured(capture_backend_graph(gm, example_inputs, name=type(model).__name__))
    exported = fxmerge.analyze(torch.export.export(model, (x,)), x)
    return traced, {"dynamo": dynamo, "export": exported}


def _assert_same_structure(name, traced, others):
    reference = _structure(traced)
    for form, graph in others.items():
        structure = _structure(graph)
        for key, value in reference.items():
            assert structure[key] == value, f"{name}: {form} differs in {key}"


def test_three_graph_forms_agree_on_resnet18():
    traced, others = _torchvision_three_forms("resnet18", 64)
    assert len(traced.units) == 20 and len(traced.joins) == 8
    _assert_same_structure("resnet18", traced, others)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "regnet_y_400mf",
        "inception_v3",
        "googlenet",
        "densenet121",
        "shufflenet_v2_x0_5",
        "resnext50_32x4d",
        "convnext_tiny",
    ],
)
def test_three_graph_forms_agree_on_torchvision(name):
    """Everything but the pinned reasons and rejections (which quote node and op
    names, e.g. MaxPool2d vs max_pool2d) is identical across the three forms."""
    traced, others = _torchvision_three_forms(name, 96 if name == "inception_v3" else 64)
    _assert_same_structure(name, traced, others)


class _PythonShapeAssert(nn.Module):
    """A Python ``assert`` on a traced shape inside a submodule: symbolic_trace can only keep it whole."""

    class Checked(nn.Module):
        def forward(self, x):
            assert x.shape[1] == 4, "four channels"
            return x

    def __init__(self):
        super().__init__()
        self.a, self.check, self.b = nn.Conv2d(3, 4, 3, padding=1), self.Checked(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.check(torch.relu(self.a(x))))


def test_a_submodule_traced_only_as_a_leaf_is_captured_through_export_instead():
    captured = capture(_PythonShapeAssert().eval(), torch.randn(1, 3, 8, 8))
    assert captured.form == "export" and captured.leaves == ()
    assert "could only keep 1 submodule(s) whole (check)" in captured.notes[0]
    assert "src:x->b" in {s.id for s in analyze_captured(captured).spans}  # the check splits nothing
