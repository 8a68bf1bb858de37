"""The ``paper`` importance estimator (LayerMerge's reference) and its holdout splits.

A small conv-bn-relu CNN with a residual block (``tests.test_importance.DigitsNet``)
is trained here in a few seconds on scikit-learn's digits, so that the estimator sees
a real classifier. Everything runs on one thread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge.importance.paper as paper_module
from fxmerge.api import analyze_captured
from fxmerge.capture import capture, capture_backend_graph
from fxmerge.fxutil import fetch_attr
from fxmerge.importance import build_importance_table, single_entry_plan
from fxmerge.importance.holdout import holdout_order, make_holdout
from fxmerge.importance.tuning import conv_parameters, entry_seed, reset_unit
from fxmerge.nodes import affine_site
from fxmerge.passes.linearize import linearize
from tests.test_importance import DigitsNet

QUIET = {"progress": False, "cache_dir": False}
SINGLE = "conv1.0->conv2.0|keep"  # one conv, nothing pruned: the original network, re-initialised under paper
MERGED = "stem.0->add|prune:conv1.0"  # the residual block merged, conv1 pruned


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Labelled(torch.utils.data.TensorDataset):
    """A TensorDataset that lists its labels, like ImageFolder's ``targets``."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y.tolist()


@pytest.fixture(scope="module")
def digits(one_thread):
    datasets = pytest.importorskip("sklearn.datasets")
    raw = datasets.load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target)
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for i in range(0, 1400, 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    captured = capture(model, x[:1])
    return {"model": model, "x": x, "y": y, "captured": captured, "sg": analyze_captured(captured)}


# --------------------------------------------------------------------------- holdout splits
def test_holdout_splits_are_disjoint_balanced_and_deterministic(digits):
    x, y = digits["x"], digits["y"]
    index = torch.arange(len(x), dtype=torch.float32)
    dataset = Labelled(index, y)  # the "input" of each sample is its index
    holdout = make_holdout(
        dataset,
        None,
        torch.device("cpu"),
        holdout_train=200,
        holdout_val=100,
        batch_size=30,
        max_batches=None,
        seed=0,
    )
    train = torch.cat([b[0] for b in holdout.train]).long()
    val = torch.cat([b[0] for b in holdout.val]).long()
    assert len(train) == 200 and len(val) == 100
    assert not set(train.tolist()) & set(val.tolist())
    assert len(set(train.tolist())) == 200 and len(set(val.tolist())) == 100
    for split, n in ((val, 100), (train, 200)):  # ten classes, interleaved: every class n/10 times
        counts = torch.bincount(y[split], minlength=10)
        assert int(counts.min()) == int(counts.max()) == n // 10
    again = make_holdout(
        dataset,
        None,
        torch.device("cpu"),
        holdout_train=200,
        holdout_val=100,
        batch_size=30,
        max_batches=None,
        seed=0,
    )
    assert again.fingerprint == holdout.fingerprint
    assert holdout_order(len(x), 1, y.tolist()) != holdout_order(len(x), 0, y.tolist())
    # fractions, the rest by default, and a list of batches split per batch
    half = make_holdout(
        dataset,
        None,
        torch.device("cpu"),
        holdout_train=None,
        holdout_val=0.25,
        batch_size=100,
        max_batches=None,
        seed=0,
    )
    assert sum(len(b[0]) for b in half.val) == round(len(x) * 0.25)
    assert sum(len(b[0]) for b in half.train) == len(x) - round(len(x) * 0.25)
    batches = [(index[i : i + 10], y[i : i + 10]) for i in range(0, 100, 10)]
    listed = make_holdout(
        batches, None, torch.device("cpu"), holdout_train=None, holdout_val=3, batch_size=10, max_batches=None, seed=0
    )
    assert len(listed.val) == 3 and len(listed.train) == 7
    val_ids = {int(v) for b in listed.val for v in b[0]}
    train_ids = {int(v) for b in listed.train for v in b[0]}
    assert not val_ids & train_ids and len(val_ids | train_ids) == 100
    with pytest.raises(ValueError, match="holds 10 batches"):
        make_holdout(
            batches, None, torch.device("cpu"), holdout_train=8, holdout_val=3, batch_size=10, max_batches=None, seed=0
        )


# --------------------------------------------------------------------------- re-initialisation
def _expected_conv(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """What nn.Conv2d.reset_parameters draws for this weight's shape under ``seed``."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    torch.manual_seed(seed)
    conv.reset_parameters()
    return conv.weight.detach()


def _captured(model, x, form):
    if form == "symbolic_trace":
        return capture(model, x)
    if form == "export":
        return capture(torch.export.export(model, (x,)), x)
    from tests.test_capture import _dynamo_graph

    return capture_backend_graph(*_dynamo_graph(model, x), name=type(model).__name__)


@pytest.mark.parametrize("form", ["symbolic_trace", "dynamo", "export"])
def test_reset_unit_matches_reset_parameters_in_every_graph_form(digits, form):
    captured = _captured(digits["model"], digits["x"][:1], form)
    sg = analyze_captured(captured)
    unit = sg.unit("conv1.0")
    gm = linearize(captured, sg, single_entry_plan(sg, SINGLE))
    weight_path, _ = conv_parameters(captured.gm, unit.conv_node)
    before = fetch_attr(gm, weight_path).detach().clone()
    assert reset_unit(gm, captured.gm, unit, torch.Generator().manual_seed(7))
    weight = fetch_attr(gm, weight_path).detach()
    assert not torch.equal(weight, before)
    torch.testing.assert_close(weight, _expected_conv(weight, 7), rtol=0, atol=0)
    # the unit's BatchNorm is back to its initial state: scale 1/sqrt(1 + eps), shift 0
    bn = next(n for n in gm.graph.nodes if n.name == unit.affine_nodes[0])
    site = affine_site(bn, gm)
    torch.testing.assert_close(site.scale.float(), torch.full((16,), 1 / math.sqrt(1 + 1e-5)))
    torch.testing.assert_close(site.shift.float(), torch.zeros(16))


def test_single_conv_spans_are_reinitialised_and_evaluated(digits, monkeypatch):
    captured, sg = digits["captured"], digits["sg"]
    data = Labelled(digits["x"], digits["y"])
    reset = []
    real = paper_module.reset_unit

    def spy(gm, base, unit, generator):
        reset.append(unit.id)
        return real(gm, base, unit, generator)

    monkeypatch.setattr(paper_module, "reset_unit", spy)
    options = {"data": data, "holdout_train": 100, "holdout_val": 200, "batch_size": 50, **QUIET}
    table = build_importance_table(captured, sg, "paper", entries=[SINGLE, MERGED], **options)
    assert reset == ["conv2.0"]  # the single conv of SINGLE's span, not MERGED's kept conv
    assert table.info["evaluated"] == 2 and table.info["identity"] == 0 and table.info["reinitialised"] == 1
    assert 0 < table[SINGLE] < 1  # a conv learnt from scratch in a short epoch costs accuracy
    assert "class-balanced per-sample split" in table.info["data"]
    # without re-initialisation the single-conv entry is the original network, fine-tuned
    plain = build_importance_table(captured, sg, "paper", entries=[SINGLE], reinit_single=False, **options)
    assert plain.info["reinitialised"] == 0 and plain[SINGLE] > table[SINGLE]
    # under the paper rules the stem lies outside the reference's table: free, not evaluated
    paper_sg = analyze_captured(captured, rules="paper")
    stem = paper_sg.keep_entry("stem.0")
    free = build_importance_table(captured, paper_sg, "paper", entries=[stem], **options)
    assert free[stem] == 1.0 and free.info["evaluated"] == 0


# --------------------------------------------------------------------------- Δ by hand
def _accuracy(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


@pytest.mark.parametrize("entry", [MERGED, SINGLE])
def test_delta_matches_a_hand_computation(digits, entry):
    captured, sg, x, y = digits["captured"], digits["sg"], digits["x"], digits["y"]
    train = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 160, 40)]
    val = [(x[i : i + 100], y[i : i + 100]) for i in range(1400, 1700, 100)]
    lr = 0.02
    table = build_importance_table(captured, sg, "paper", data=train, eval_data=val, entries=[entry], lr=lr, **QUIET)
    # by hand: the entry's network, its conv re-initialised when its span has one conv,
    # one epoch of Nesterov SGD (momentum 0.9, weight decay 1e-5) with a per-step cosine
    gm = linearize(captured, sg, single_entry_plan(sg, entry))
    seed = entry_seed(0, entry)
    torch.manual_seed(seed)
    if entry == SINGLE:
        weight = dict(gm.named_parameters())["conv2.0.weight"]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        gm.get_submodule("conv2.1").reset_parameters()
    params = list(gm.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-5, nesterov=True)
    gm.train()
    for step, (inputs, labels) in enumerate(train):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * step / len(train))) / 2
        loss = F.cross_entropy(gm(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = _accuracy(gm, val) - _accuracy(digits["model"], val)
    assert table.delta(entry) == pytest.approx(expected, abs=1e-9)
    assert table.info["reference"] == pytest.approx(_accuracy(digits["model"], val))


# --------------------------------------------------------------------------- loss_fn(model, batch)
class Denoiser(nn.Module):
    """conv-relu ×2 then a conv back to the image: no BatchNorm, so lr=0 changes nothing."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def denoise(model, batch):
    noise = torch.randn_like(batch)  # drawn per call, from the global RNG fxmerge seeds
    return F.mse_loss(model(batch + 0.3 * noise), batch)


def test_loss_fn_gives_the_relative_loss_change_on_common_noise(digits):
    torch.manual_seed(0)
    model = Denoiser().eval()
    images = [digits["x"][i : i + 50] for i in range(0, 400, 50)]
    captured = capture(model, images[0][:1])
    sg = analyze_captured(captured)
    dropped = next(e.id for e in sg.entries if len(sg.span(e.span).units) == 2 and not e.option.pruned)
    identity = sg.keep_entry("b")
    options = {"data": images, "loss_fn": denoise, "lr": 0.0, "reinit_single": False, **QUIET}
    table = build_importance_table(captured, sg, "paper", entries=[identity, dropped], **options)
    assert table.info["options"]["metric"] == "auto" and table.info["evaluated"] == 2
    assert table[identity] == 1.0  # lr 0, the same network, and the same noise in both evaluations
    holdout = make_holdout(
        images, None, torch.device("cpu"), holdout_train=None, holdout_val=0.5, batch_size=64, max_batches=None, seed=0
    )

    def holdout_loss(net):
        torch.manual_seed(0)
        with torch.no_grad():
            return sum(float(denoise(net.eval(), b)) * len(b) for b in holdout.val) / sum(len(b) for b in holdout.val)

    original = holdout_loss(captured.gm)
    entry_net = linearize(captured, sg, single_entry_plan(sg, dropped))
    expected = -(holdout_loss(entry_net) - original) / original
    assert table.delta(dropped) == pytest.approx(expected, rel=1e-6)
    assert table.info["reference"] == pytest.approx(original, rel=1e-6)


def test_one_loss_fn_serves_the_loss_and_finetune_estimators_too(digits):
    """``loss_fn(model, batch)`` on unlabelled batches: the same meaning as under ``paper``."""
    torch.manual_seed(0)
    model = Denoiser().eval()
    images = [digits["x"][i : i + 50] for i in range(0, 400, 50)]
    captured = capture(model, images[0][:1])
    sg = analyze_captured(captured)
    dropped = next(e.id for e in sg.entries if len(sg.span(e.span).units) == 2 and not e.option.pruned)
    entry_net = linearize(captured, sg, single_entry_plan(sg, dropped))

    def mean_loss(net, batches, seed=0):
        torch.manual_seed(seed)
        with torch.no_grad():
            return sum(float(denoise(net.eval(), b)) * len(b) for b in batches) / sum(len(b) for b in batches)

    table = build_importance_table(captured, sg, "loss", data=images, loss_fn=denoise, entries=[dropped], **QUIET)
    original = mean_loss(captured.gm, images)
    assert table.delta(dropped) == pytest.approx(-(mean_loss(entry_net, images) - original) / original, rel=1e-6)
    assert table.info["reference"] == pytest.approx(original, rel=1e-6)

    tuned = build_importance_table(
        captured,
        sg,
        "finetune",
        data=images[:4],
        eval_data=images[4:],
        loss_fn=denoise,
        lr=0.0,
        steps=2,
        reinit_single=False,
        entries=[dropped],
        **QUIET,
    )
    held_out = mean_loss(captured.gm, images[4:])
    expected = -(mean_loss(entry_net, images[4:]) - held_out) / held_out  # lr 0: training changes nothing
    assert tuned.delta(dropped) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="needs labelled data.*loss_fn"):
        build_importance_table(captured, sg, "loss", data=images, entries=[dropped], **QUIET)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        build_importance_table(captured, sg, "finetune", data=images, loss_fn="mse", entries=[dropped], **QUIET)


# --------------------------------------------------------------------------- errors
def test_paper_errors(digits):
    captured, sg = digits["captured"], digits["sg"]
    labelled = Labelled(digits["x"][:200], digits["y"][:200])
    with pytest.raises(ValueError, match="'paper' needs labelled data, got no data"):
        build_importance_table(captured, sg, "paper", **QUIET)
    with pytest.raises(ValueError, match="needs labelled data.*loss_fn"):
        build_importance_table(captured, sg, "paper", data=[digits["x"][:50], digits["x"][50:100]], **QUIET)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        build_importance_table(captured, sg, "paper", data=labelled, epochs=0, **QUIET)
    with pytest.raises(ValueError, match="schedule must be"):
        build_importance_table(captured, sg, "paper", data=labelled, schedule="step", **QUIET)
    with pytest.raises(ValueError, match="holdout_val must be a count"):
        build_importance_table(captured, sg, "paper", data=labelled, holdout_val=1.5, **QUIET)
    with pytest.raises(ValueError, match="holds 200 samples"):
        build_importance_table(captured, sg, "paper", data=labelled, holdout_train=150, holdout_val=100, **QUIET)
    with pytest.raises(TypeError, match="unknown option.*'steps'"):
        build_importance_table(captured, sg, "paper", data=labelled, steps=3, **QUIET)
