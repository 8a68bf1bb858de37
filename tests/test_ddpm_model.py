"""The DDPM U-Net test model against the reference search space ``ddpm_space.json``."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import fxmerge
from fxmerge.passes.rules import outside_table, paper_table
from tests.ddpm_model import DDPMUNet
from tests.reference_space import REFERENCE, compare, load_reference, space_of_graph
from tests.test_merge import check_promised_convs

pytestmark = pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} not found")

UNNUMBERED = (".q", ".k", ".v", ".proj_out", ".nin_shortcut")  # convs the reference does not number


def small_model(**overrides) -> DDPMUNet:
    config = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16)
    return DDPMUNet(**{**config, **overrides}).eval()


def conv_calls(model: nn.Module, *inputs) -> list[tuple[str, list[int]]]:
    """Every conv call in forward order: (module name, [out, in, kh, kw, stride, padding])."""
    calls: list[tuple[str, list[int]]] = []

    def record(name):
        def hook(module, args, output):
            calls.append(
                (
                    name,
                    [module.out_channels, module.in_channels, *module.kernel_size, module.stride[0], module.padding[0]],
                )
            )

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.fixture(scope="module")
def reference_json() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def cifar():
    """The CIFAR-10 model (35.7 M parameters), its inputs and its exported program."""
    torch.manual_seed(0)
    model = DDPMUNet().eval()
    inputs = (torch.randn(1, 3, 32, 32), torch.tensor([17]))
    return model, inputs, torch.export.export(model, inputs)


def test_cifar_config_matches_the_reference_convs(cifar, reference_json):
    model, inputs, _ = cifar
    numbered = [(n, s) for n, s in conv_calls(model, *inputs) if not n.endswith(UNNUMBERED)]
    names, shapes = reference_json["conv_names"], reference_json["conv_shapes"]
    expected = [(names[str(i)], shapes[str(i)]) for i in range(1, len(names) + 1)]
    assert numbered == expected
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_unnumbered_convs_are_attention_and_shortcuts(cifar):
    model, inputs, _ = cifar
    others = [n for n, _ in conv_calls(model, *inputs) if n.endswith(UNNUMBERED)]
    # attention at 16×16: 2 blocks down, 1 in the middle, 3 up, 4 convs each;
    # nin shortcuts where channels change: down.1.block.0 and all 12 up blocks (they read a concatenation)
    assert sum(n.endswith(".q") for n in others) == 6
    assert sum(n.endswith(".nin_shortcut") for n in others) == 13
    assert len(others) == 6 * 4 + 13


def test_runs_and_predicts_noise_of_the_input_shape(cifar):
    model, (x, t), program = cifar
    with torch.no_grad():
        eps = model(x, t)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        torch.testing.assert_close(program.module()(x, t), eps)


def test_timestep_changes_the_output():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0, 0])), model(x, torch.tensor([500, 500])))


def test_small_variant_batches_exports_and_checks_its_input_size():
    torch.manual_seed(0)
    model = small_model(in_channels=1)
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
    program = torch.export.export(model, (x, t))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, t), model(x, t))
        with pytest.raises(AssertionError):
            model(torch.randn(1, 1, 32, 32), torch.tensor([0]))
    names = [n for n, _ in conv_calls(model, x, t) if not n.endswith(UNNUMBERED)]
    assert names[:3] == ["conv_in", "down.0.block.0.conv1", "down.0.block.0.conv2"]
    assert names[-2:] == ["up.0.block.1.conv2", "conv_out"]
    assert "down.1.downsample.conv" in names and "down.2.downsample.conv" not in names


def test_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = small_model(dropout=0.5).train()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, t))


# ---------------------------------------------------------------- reference search space
def test_reference_file_is_self_consistent(reference_json):
    data = reference_json
    names = data["conv_names"]
    assert sorted(int(k) for k in names) == list(range(1, 53))
    spans = data["span_list"]
    assert len(spans) == data["spans_total"] == 73
    options = [o for s in spans for o in s["options"]]
    assert len(options) == data["entries_total"] == 98
    assert sum(not o.get("identity", False) for o in options) == data["entries_without_identity"] == 95
    for span in spans:
        assert span["convs"] == [names[str(i)] for i in range(span["start"] + 1, span["end"] + 1)]
        for option in span["options"]:
            if option.get("identity"):
                assert len(span["convs"]) == 1 and span["convs"][0].endswith("upsample.conv")
                assert option["kernel"] == 0
            else:  # stride-1 3×3 convs: the merged kernel grows by 2 per kept conv
                kept = option["keeps"]
                assert option["kernel"] == 1 + sum(n * (int(k[1:].split("_")[0]) - 1) for k, n in kept.items())
    interior = {p for s in spans for p in range(s["start"] + 1, s["end"])}
    assert interior == set(data["removable_positions"]) and len(interior) == 22
    # every table conv keeps its single-conv span; conv_out (#52) is outside the table
    singles = {s["start"] + 1 for s in spans if s["end"] == s["start"] + 1}
    assert singles == set(range(1, 52))


def test_reference_space_loads_and_compares_equal_to_itself():
    reference = load_reference()
    assert len(reference.spans) == 73 and reference.entries == 98 and reference.entries_without_identity == 95
    assert len(reference.removable) == 22
    diff = compare(reference, reference)
    assert diff.ok, diff.summary()


def test_an_analysis_converts_to_the_reference_form(cifar):
    """The helper reads today's span graph: every table conv is a unit with its single-conv span."""
    model, inputs, program = cifar
    reference = load_reference()
    graph = fxmerge.analyze(program.module(), inputs, rules="paper")
    space = space_of_graph(graph, reference)
    singles = {s.first for s in space.spans if len(s.convs) == 1 and not s.extra_units}
    assert singles == {c for s in reference.spans for c in s.convs}
    diff = compare(reference, space)
    assert all(len(s.convs) > 1 for s in diff.missing), diff.summary()
    assert "missing spans" in diff.summary()


@pytest.fixture(scope="module")
def cifar_paper(cifar):
    _, inputs, program = cifar
    return fxmerge.analyze(program.module(), inputs, rules="paper")


def test_paper_rules_reproduce_the_reference_space(cifar_paper):
    """The paper table (every span but the fixed ones of units outside it) is ddpm_space.json, span by span."""
    reference = load_reference()
    table = replace(cifar_paper, spans=paper_table(cifar_paper))
    diff = compare(reference, space_of_graph(table, reference))
    assert diff.ok, "fxmerge's paper-rule span graph differs from ddpm_space.json:\n" + diff.summary()
    assert len(table.spans) == 73 and len(table.entries) == 98
    assert sum(not e.option.identity for e in table.entries) == 95


def test_units_outside_the_table_are_attention_shortcuts_and_the_head(cifar_paper):
    """q/k/v/proj_out, nin shortcuts and conv_out keep one fixed span each and get no table entries."""
    outside = outside_table(cifar_paper)
    kinds = {name.rsplit(".", 1)[-1] for name in outside}
    assert kinds == {"q", "k", "v", "proj_out", "nin_shortcut", "conv_out"}
    assert len(outside) == 6 * 4 + 13 + 1
    assert outside["conv_out"].startswith("the head")
    assert all(why.startswith("projection shortcut") for u, why in outside.items() if u.endswith("nin_shortcut"))
    assert all(why.startswith("attention projection") for u, why in outside.items() if u.endswith((".q", ".v")))
    for unit in outside:
        span = cifar_paper.single_unit_span(unit)
        assert [o.id for o in span.options] == ["keep"]
    assert len(cifar_paper.spans) == 73 + len(outside)
    # the 22 removable positions are the normalised activations (GroupNorm + SiLU) after conv1
    dropped = {p for s in cifar_paper.spans for p in s.dropped_activations}
    assert len(dropped) == 22 and all(p.endswith(".conv1") for p in dropped)
    assert {cifar_paper.unit(p).norm for p in dropped} == {"group_norm"}
    assert {cifar_paper.unit(p).activation for p in dropped} == {"silu"}


def test_only_the_convs_after_an_upsample_have_an_identity_option(cifar_paper):
    identities = [e for e in cifar_paper.entries if e.option.identity]
    assert sorted(e.option.pruned for e in identities) == [(f"up.{k}.upsample.conv",) for k in (1, 2, 3)]
    assert all(cifar_paper.unit(e.option.pruned[0]).droppable for e in identities)


# ---------------------------------------------------------------- exact merges
def merge_error(model, inputs, graph, plan, **linearize_kwargs) -> tuple[float, torch.fx.GraphModule]:
    """The merged model's error against the linearized one (float64 when fp32 is ill-conditioned)."""
    lin = fxmerge.linearize(model, inputs, plan, span_graph=graph, **linearize_kwargs).eval()
    merged = fxmerge.merge(lin)
    with torch.no_grad():
        reference = sample(lin(*inputs))
        error = float((sample(merged(*inputs)) - reference).abs().max() / reference.abs().max())
        if error > 1e-4:
            lin64 = copy.deepcopy(lin).double()
            doubled = tuple(t.double() if t.is_floating_point() else t for t in inputs)
            reference = sample(lin64(*doubled))
            error = float((sample(fxmerge.merge(lin64)(*doubled)) - reference).abs().max() / reference.abs().max())
    return error, merged


def sample(output) -> torch.Tensor:
    """The predicted noise: the tensor itself, or diffusers' ``UNet2DOutput.sample``."""
    return output if isinstance(output, torch.Tensor) else output.sample


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = small_model(in_channels=1)
    randomise_norms(model)
    inputs = (torch.randn(2, 1, 16, 16), torch.tensor([3, 700]))
    return torch.export.export(model, inputs).module(), inputs


def randomise_norms(model: nn.Module) -> None:
    """GroupNorm affine parameters away from (1, 0), so that dropping a norm changes something."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen) - 0.5)


@pytest.mark.parametrize("rules", ["general", "paper"])
def test_random_plans_of_the_small_model_merge_exactly(small, rules):
    model, inputs = small
    graph = fxmerge.analyze(model, inputs, rules=rules)
    assert sum(len(s.units) > 1 for s in graph.spans) == 11  # one span per ResNet block
    for seed in range(4):
        plan = fxmerge.Plan.random(graph, seed=seed)
        error, merged = merge_error(model, inputs, graph, plan)
        assert error <= 1e-4, (rules, seed, error)
        check_promised_convs(merged, graph, plan)  # every merged conv is the one its option promised
        merged_spans = [e for e in plan.chosen(graph) if len(graph.span(e.span).units) > 1]
        postnorms = [n for n, _ in merged.named_modules() if n.startswith("fxmerge_postnorm")]
        assert len(postnorms) == (len(merged_spans) if rules == "paper" else 0)
        # every time-embedding bias folded into its Linear: no 1×1 map left over
        assert not [m for n, m in merged.named_modules() if n.startswith("fxmerge_side") and isinstance(m, nn.Conv2d)]


def test_a_merged_block_keeps_its_post_norm_and_folds_the_time_embedding(small):
    model, inputs = small
    graph = fxmerge.analyze(model, inputs, rules="paper")
    span = graph.span("src:mid.block_1->mid.block_1.conv2")
    chosen = [graph.keep_entry(u.id) for u in graph.units if u.id not in span.units]
    plan = fxmerge.Plan.from_entries(graph, [*chosen, f"{span.id}|keep"])
    error, merged = merge_error(model, inputs, graph, plan)
    assert error <= 1e-4
    norm = merged.get_submodule("fxmerge_postnorm_src_mid_block_1_mid_block_1_conv2")
    assert (norm.num_groups, norm.num_channels) == (32, 64)
    linear = next(m for n, m in merged.named_modules() if n.startswith("fxmerge_side"))
    assert isinstance(linear, nn.Linear) and tuple(linear.weight.shape) == (64, 128)  # A·W: C_out × temb
    assert not any(n.startswith("mid.block_1.temb_proj") for n, _ in merged.named_parameters())
    _, without = merge_error(model, inputs, graph, plan, postnorm=False)
    assert not any(n.startswith("fxmerge_postnorm") for n, _ in without.named_modules())


def test_the_identity_option_drops_the_conv_after_an_upsample(small):
    model, inputs = small
    graph = fxmerge.analyze(model, inputs, rules="paper")
    span = graph.single_unit_span("up.1.upsample.conv")
    identity = next(o for o in span.options if o.identity)
    assert identity.conv.kernel_size == (1, 1) and identity.conv.groups == identity.conv.in_channels
    chosen = [graph.keep_entry(u.id) for u in graph.units if u.id != "up.1.upsample.conv"]
    plan = fxmerge.Plan.from_entries(graph, [*chosen, f"{span.id}|{identity.id}"])
    lin = fxmerge.linearize(model, inputs, plan, span_graph=graph).eval()
    assert not any(n.op == "get_attr" and n.target.startswith("up.1.upsample.conv") for n in lin.graph.nodes)
    error, merged = merge_error(model, inputs, graph, plan)
    assert error <= 1e-4

    def convs_after_upsamples(gm):
        upsample = torch.ops.aten.upsample_nearest2d.vec
        return sum(n.target is torch.ops.aten.conv2d.default and n.args[0].target is upsample for n in gm.graph.nodes)

    assert (convs_after_upsamples(model), convs_after_upsamples(merged)) == (2, 1)


# ---------------------------------------------------------------- diffusers' UNet2DModel
def diffusers_unet():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    randomise_norms(model)
    inputs = (torch.randn(2, 3, 16, 16), torch.tensor([10, 500]))
    return torch.export.export(model, inputs).module(), inputs


def test_diffusers_unet_gets_spans_and_merges_exactly():
    model, inputs = diffusers_unet()
    graph = fxmerge.analyze(model, inputs)
    multi = [s for s in graph.spans if len(s.units) > 1]
    assert len(multi) == 8 and all(s.dropped_activations for s in multi)  # conv1 → conv2 of each ResNet block
    assert {graph.unit(p).norm for s in multi for p in s.dropped_activations} == {"group_norm"}
    assert [u.id for u in graph.units if u.droppable] == ["up_blocks.0.upsamplers.0.conv"]
    for seed in range(3):
        plan = fxmerge.Plan.random(graph, seed=seed)
        error, merged = merge_error(model, inputs, graph, plan)
        assert error <= 1e-4, (seed, error)
        check_promised_convs(merged, graph, plan)
