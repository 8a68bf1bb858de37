"""Diffusion U-Net patterns (issue #15) on small hand-made blocks, in every graph form.

* SiLU written ``x * sigmoid(x)`` is the activation ``silu`` in every spelling; a gate
  ``x * sigmoid(y)`` is not;
* a *normalised activation* (GroupNorm / LayerNorm / InstanceNorm, then an activation)
  after a conv is that conv's removable position; a norm whose input has other readers
  stays a boundary;
* a per-sample *side bias* (a time embedding added onto a conv's output) is accepted
  inside spans and merges exactly, folded into its Linear or carried by a 1×1 map;
* the optional *post-norm*, and the *identity option* of a conv after a nearest upsample.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge
from fxmerge.api import analyze_captured
from fxmerge.capture import capture_backend_graph
from fxmerge.latency import build_latency_table
from fxmerge.plan import Plan
from tests.test_latency import FakeBackend

SILU_SPELLINGS = {
    "x * torch.sigmoid(x)": lambda x, m: x * torch.sigmoid(x),
    "torch.sigmoid(x) * x": lambda x, m: torch.sigmoid(x) * x,
    "x * x.sigmoid()": lambda x, m: x * x.sigmoid(),
    "torch.mul(x, F.sigmoid(x))": lambda x, m: torch.mul(x, F.sigmoid(x)),
    "x.mul(torch.sigmoid(x))": lambda x, m: x.mul(torch.sigmoid(x)),
    "x * nn.Sigmoid()(x)": lambda x, m: x * m.sigmoid(x),
}


def dynamo_graph(model, inputs):
    """The graph and example inputs ``torch.compile`` hands a backend."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab)(*inputs)
    torch._dynamo.reset()
    assert len(graphs) == 1, "expected no graph break"
    return graphs[0]


def structure(graph) -> dict:
    return {
        "entry convs": sorted(e.conv.signature() for e in graph.entries),
        "positions": [(p.id, p.kind, p.activation, p.shape, p.pinned is not None) for p in graph.positions],
        "units": [(u.id, u.activation, u.norm, len(u.activation_nodes), len(u.side_biases)) for u in graph.units],
        "spans": [(s.id, s.dropped_activations, [o.id for o in s.options]) for s in graph.spans],
        "fingerprint": graph.fingerprint,
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def merges_exactly(model, inputs, graph, plan, tol=1e-5, **kwargs) -> torch.fx.GraphModule:
    lin = fxmerge.linearize(model, inputs, plan, span_graph=graph, **kwargs).eval()
    merged = fxmerge.merge(lin)
    with torch.no_grad():
        assert rel(merged(*inputs), lin(*inputs)) <= tol, plan.entries
    return merged


def only(graph, span_id: str, option: str = "keep") -> Plan:
    """A plan with ``span_id`` and every other unit kept as it is."""
    span = graph.span(span_id)
    others = [graph.keep_entry(u.id) for u in graph.units if u.id not in span.units]
    return Plan.from_entries(graph, [*others, f"{span_id}|{option}"])


# --------------------------------------------------------------------------- SiLU as a product
class ProductChain(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.sigmoid = nn.Sigmoid()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))

    def forward(self, x):
        act = SILU_SPELLINGS[self.spelling]
        return self.c(act(self.b(act(self.a(x), self)), self))


@pytest.mark.parametrize("form", ["fx", "export"])
@pytest.mark.parametrize("spelling", list(SILU_SPELLINGS))
def test_silu_written_as_a_product_is_one_activation(spelling, form):
    torch.manual_seed(0)
    model, x = ProductChain(spelling).eval(), torch.randn(1, 4, 8, 8)
    subject = torch.export.export(model, (x,)).module() if form == "export" else model
    graph = fxmerge.analyze(subject, x)
    assert [(u.activation, len(u.activation_nodes)) for u in graph.units] == [("silu", 2), ("silu", 2), (None, 0)]
    assert graph.rejections == ()
    assert graph.span("src:x->c").dropped_activations == ("a", "b")
    merged = merges_exactly(subject, (x,), graph, only(graph, "src:x->c"))
    assert not any("sigmoid" in str(n.target) for n in merged.graph.nodes)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y * torch.sigmoid(self.g(x)))


def test_a_gate_is_not_silu():
    graph = fxmerge.analyze(Gate().eval(), torch.randn(1, 4, 8, 8))
    assert graph.unit("a").activation is None
    assert graph.unit("g").activation == "sigmoid"  # a plain sigmoid closes the gate's conv
    assert not [s for s in graph.spans if len(s.units) > 1]


# --------------------------------------------------------------------------- a DDPM-style block
NORMS = {
    "group": lambda c: nn.GroupNorm(4, c),
    "layer": lambda c: nn.LayerNorm([c, 8, 8]),
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
}


class TimeBlock(nn.Module):
    """conv_in → [norm1 → SiLU → conv1 (+ temb_proj(SiLU(temb))) → norm2 → SiLU → dropout → conv2] + skip
    → nearest upsample → conv_up. ``shortcut`` puts a 1×1 conv on the skip; ``reuse`` reads the
    time projection twice (so it cannot fold into the merged conv)."""

    def __init__(self, norm: str = "group", shortcut: bool = False, reuse: bool = False, cout: int = 8):
        super().__init__()
        self.reuse = reuse
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 8)
        self.conv1 = nn.Conv2d(8, cout, 3, padding=1)
        self.temb_proj = nn.Linear(6, cout)
        self.norm2 = NORMS[norm](cout)
        self.dropout = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(8, cout, 1) if shortcut or cout != 8 else None
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_up = nn.Conv2d(cout, cout, 3, padding=1)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)

    def forward(self, x, temb):
        x = self.conv_in(x)
        h = self.conv1(F.silu(self.norm1(x)))
        bias = self.temb_proj(F.silu(temb))
        h = h + bias[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        out = self.conv_up(self.up(skip + h))
        return out + bias.mean() if self.reuse else out


BLOCK = "src:silu->conv2"


def block_inputs(batch: int = 2):
    return torch.randn(batch, 3, 8, 8), torch.randn(batch, 6)


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_normalised_activation_is_the_conv_units_position(norm):
    torch.manual_seed(0)
    model, inputs = TimeBlock(norm).eval(), block_inputs()
    graph = fxmerge.analyze(model, inputs)
    conv1 = graph.unit("conv1")
    assert (conv1.activation, conv1.norm) == ("silu", f"{norm}_norm")
    assert len(conv1.side_biases) == 1 and conv1.conv.bias
    assert graph.span(BLOCK).dropped_activations == ("conv1",)
    assert graph.unit("conv2").input_position == "conv1"
    # norm1 reads conv_in's output, which the skip reads too: a boundary, not a removable position
    assert any(r.node == "norm1" and r.reason.startswith("group_norm kept") for r in graph.rejections)
    assert graph.unit("conv1").input_position == "src:silu"
    for option in graph.span(BLOCK).options:
        merged = merges_exactly(model, inputs, graph, only(graph, BLOCK, option.id))
        assert not any(isinstance(m, type(model.norm2)) for n, m in merged.named_modules() if n == "norm2")


@pytest.mark.parametrize("shortcut", [False, True])
def test_three_graph_forms_agree_on_a_time_embedding_block(shortcut):
    torch.manual_seed(0)
    model, inputs = TimeBlock(shortcut=shortcut).eval(), block_inputs(1)
    reference = structure(fxmerge.analyze(model, inputs))
    gm, example_inputs = dynamo_graph(model, inputs)
    forms = {
        "dynamo": analyze_captured(capture_backend_graph(gm, example_inputs, name=type(model).__name__)),
        "export": fxmerge.analyze(torch.export.export(model, inputs).module(), inputs),
    }
    for form, graph in forms.items():
        found = structure(graph)
        for key, value in reference.items():
            assert found[key] == value, f"{form} differs in {key}"


def _exported(model, inputs, form):
    """The model as fx traces it, or exported (static, or with a dynamic batch as capture does it)."""
    if form == "fx":
        return model
    if form == "export":
        return torch.export.export(model, inputs).module()
    doubled = tuple(torch.cat([t, t]) for t in inputs)  # the exporter specialises a batch of 1
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    return torch.export.export(model, doubled, dynamic_shapes=dynamic).module()


@pytest.mark.parametrize("form", ["fx", "export", "export-dynamic-batch"])
def test_a_side_bias_merges_exactly_and_folds_into_its_linear(form):
    torch.manual_seed(0)
    model, inputs = TimeBlock(cout=12).eval(), block_inputs()
    subject = _exported(model, inputs, form)
    graph = fxmerge.analyze(subject, inputs)
    merged = merges_exactly(subject, inputs, graph, only(graph, BLOCK))
    sides = {n: m for n, m in merged.named_modules() if n.startswith("fxmerge_side")}
    assert [type(m) for m in sides.values()] == [nn.Linear]
    assert tuple(next(iter(sides.values())).weight.shape) == (12, 6)  # A·W: C_out × the embedding width
    with torch.no_grad():  # exact for any time embedding, borders included
        x, temb = block_inputs(3)
        lin = fxmerge.linearize(subject, inputs, only(graph, BLOCK), span_graph=graph).eval()
        assert rel(merged(x, temb * 10), lin(x, temb * 10)) <= 1e-5


def test_a_side_bias_read_elsewhere_is_carried_by_a_1x1_map():
    torch.manual_seed(0)
    model, inputs = TimeBlock(reuse=True).eval(), block_inputs()
    graph = fxmerge.analyze(model, inputs)
    merged = merges_exactly(model, inputs, graph, only(graph, BLOCK))
    side = merged.get_submodule("fxmerge_side_1")
    assert isinstance(side, nn.Conv2d) and side.kernel_size == (1, 1) and side.bias is None
    assert isinstance(merged.get_submodule("temb_proj"), nn.Linear)  # kept: the output reads it too


class SideFromInput(nn.Module):
    """A side bias computed from the span input itself (a global pool of ``x``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.a(x) + F.adaptive_avg_pool2d(x, 1)
        return self.b(torch.relu(h))


def test_a_side_bias_that_depends_on_the_span_input_is_not_merged_from_there():
    graph = fxmerge.analyze(SideFromInput().eval(), torch.randn(1, 4, 8, 8))
    assert graph.unit("a").side_inputs == ("src:x",)
    assert {s.id for s in graph.spans} == {"src:x->a", "a->b"}


# --------------------------------------------------------------------------- post-norm
def test_the_post_norm_follows_a_span_that_removed_a_norm():
    torch.manual_seed(0)
    model, inputs = TimeBlock(cout=12).eval(), block_inputs()
    paper = fxmerge.analyze(model, inputs, rules="paper")
    plan = only(paper, BLOCK)
    lin = fxmerge.linearize(model, inputs, plan, span_graph=paper)
    norm = lin.get_submodule("fxmerge_postnorm_src_silu_conv2")
    assert (norm.num_groups, norm.num_channels) == (12, 12)  # 12 is no multiple of 32: GroupNorm(C, C)
    assert torch.equal(norm.weight, torch.ones(12)) and torch.equal(norm.bias, torch.zeros(12))
    assert norm.weight.requires_grad and any(p is norm.weight for p in lin.parameters())
    merged = merges_exactly(model, inputs, paper, plan)
    assert isinstance(merged.get_submodule("fxmerge_postnorm_src_silu_conv2"), nn.GroupNorm)
    general = fxmerge.analyze(model, inputs)
    plain = fxmerge.linearize(model, inputs, only(general, BLOCK), span_graph=general)
    assert not any(n.startswith("fxmerge_postnorm") for n, _ in plain.named_modules())
    forced = fxmerge.linearize(model, inputs, only(general, BLOCK), span_graph=general, postnorm=True)
    assert any(n.startswith("fxmerge_postnorm") for n, _ in forced.named_modules())


def test_the_post_norm_trains_in_the_linearized_model():
    torch.manual_seed(0)
    model, inputs = TimeBlock(cout=32).eval(), block_inputs()
    paper = fxmerge.analyze(model, inputs, rules="paper")
    lin = fxmerge.linearize(model, inputs, only(paper, BLOCK), span_graph=paper).train()
    norm = lin.get_submodule("fxmerge_postnorm_src_silu_conv2")
    assert norm.num_groups == 32
    lin(*inputs).square().mean().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- identity option
def test_a_conv_after_a_nearest_upsample_may_be_dropped():
    torch.manual_seed(0)
    model, inputs = TimeBlock().eval(), block_inputs()
    graph = fxmerge.analyze(model, inputs)
    assert [u.id for u in graph.units if u.droppable] == ["conv_up"]
    span = graph.single_unit_span("conv_up")
    assert [(o.id, o.identity) for o in span.options] == [("keep", False), ("prune:conv_up", True)]
    table = build_latency_table(graph, FakeBackend(), cache_dir=False, progress=False)
    assert table.entries[f"{span.id}|prune:conv_up"] == 0.0
    assert table.entries[f"{span.id}|keep"] > 0
    merged = merges_exactly(model, inputs, graph, only(graph, span.id, "prune:conv_up"))
    assert "conv_up" not in dict(merged.named_modules())
    with torch.no_grad():
        assert merged(*inputs).shape == model(*inputs).shape
