"""Importance estimators, the cached-prefix evaluation, and the importance cache.

A small conv-bn-relu CNN with a residual block is trained here, in a few seconds,
on scikit-learn's ``load_digits`` (1×8×8 images, 10 classes), so that the
estimators see a real classifier. Everything runs on one thread: the tests are
small, and one thread is much faster than two on a busy machine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmerge.importance.base as importance_base
from fxmerge.api import analyze_captured
from fxmerge.capture import capture
from fxmerge.importance import (
    ESTIMATORS,
    ImportanceTable,
    Recorder,
    Replay,
    build_importance_table,
    default_cache_dir,
    reusable_nodes,
    single_entry_plan,
)
from fxmerge.importance.data import Batch
from fxmerge.importance.distortion import Distortion
from fxmerge.importance.replay import stack_batches
from fxmerge.ops import SPAN_END, is_marker
from fxmerge.passes.linearize import linearize
from fxmerge.plan import Plan

QUIET = {"progress": False, "cache_dir": False}


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DigitsNet(nn.Module):
    """stem → residual block (conv1 → conv2, + skip, relu) → stride-2 conv → mean → fc."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.conv1 = conv_bn(16, 16)
        self.conv2 = conv_bn(16, 16, relu=False)
        self.relu = nn.ReLU(inplace=True)
        self.down = conv_bn(16, 32, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.conv2(self.conv1(x)) + x)
        x = self.down(x)
        return self.fc(x.mean((2, 3)))


class Pointwise(nn.Module):
    """A 3×3 stem, then three 1×1 conv-bn-relu units; ``a``'s ReLU sees only positive values."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a = conv_bn(8, 8, kernel=1)
        self.b = conv_bn(8, 8, kernel=1)
        self.c = conv_bn(8, 8, kernel=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.c(self.b(self.a(self.stem(x)))).mean((2, 3)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(one_thread):
    """A trained DigitsNet, its captured graph and span graph, and train / test tensors."""
    datasets = pytest.importorskip("sklearn.datasets")
    raw = datasets.load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for i in range(0, len(train_x), 64):
            loss = F.cross_entropy(model(train_x[i : i + 64]), train_y[i : i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    assert accuracy > 0.85, accuracy
    example = test_x[:1]
    captured = capture(model, example)
    return {
        "model": model,
        "x": example,
        "captured": captured,
        "sg": analyze_captured(captured),
        "accuracy": accuracy,
        "labelled": [(test_x[i : i + 100], test_y[i : i + 100]) for i in range(0, 300, 100)],
        "inputs": [test_x[i : i + 100] for i in range(0, 200, 100)],
        "train": (train_x, train_y),
    }


def identity_entries(sg) -> list[str]:
    out = []
    for e in sg.entries:
        span = sg.span(e.span)
        if len(span.units) == 1 and not span.joins and not e.option.pruned:
            out.append(e.id)
    return out


def evaluated_entries(sg) -> list[str]:
    keep = set(identity_entries(sg))
    return [e.id for e in sg.entries if e.id not in keep]


# ------------------------------------------------------------------ plans
def test_single_entry_plan_applies_only_that_entry(digits):
    sg = digits["sg"]
    keep_all = set(Plan.keep_all(sg).entries)
    for entry in sg.entries:
        plan = single_entry_plan(sg, entry.id)
        plan.validate(sg)
        assert entry.id in plan.entries
        others = set(plan.entries) - {entry.id}
        assert others <= keep_all
        covered = {u for e in plan.chosen(sg) for u in sg.span(e.span).units}
        assert covered == {u.id for u in sg.units}
    with pytest.raises(ValueError, match="not in the span graph"):
        single_entry_plan(sg, "nope|keep")


# ------------------------------------------------------------------ distortion
def test_distortion_identity_entries_are_exactly_one(digits):
    sg = digits["sg"]
    table = build_importance_table(digits["captured"], sg, "distortion", data=digits["inputs"], **QUIET)
    assert table.estimator == "distortion"
    assert set(table.entries) == {e.id for e in sg.entries}
    for entry_id in identity_entries(sg):
        assert table[entry_id] == 1.0
    assert table.info["identity"] == len(identity_entries(sg))
    assert table.info["evaluated"] == len(evaluated_entries(sg))
    for entry_id in evaluated_entries(sg):
        assert 0.0 <= table[entry_id] <= 1.0  # a divergence is never negative
    # pruning both convs of the block and merging everything into one conv hurts more than one kept block
    assert table["src:x->down.0|prune:conv1.0+conv2.0"] < table["stem.0->add|keep"] < 1.0
    assert table.info["reused_nodes"] > 0


def test_distortion_without_data_uses_random_batches(digits):
    sg = digits["sg"]
    some = evaluated_entries(sg)[:2]
    table = build_importance_table(digits["captured"], sg, entries=some, random_batches=2, **QUIET)
    assert table.estimator == "distortion"  # auto without labels
    assert "random" in table.info["data"]
    assert set(table.entries) == set(some)
    assert all(0 < v <= 1 for v in table.entries.values())


def test_removing_an_activation_that_matters_scores_lower():
    torch.manual_seed(0)
    model = Pointwise()
    with torch.no_grad():
        model.a[1].bias.fill_(50.0)  # a's ReLU only ever sees positive values
        model.fc.weight.mul_(10.0)
    for module in model.modules():  # BatchNorm statistics from real activations
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, 8, 8))
    model.eval()
    x = torch.randn(1, 3, 8, 8)
    captured = capture(model, x)
    sg = analyze_captured(captured)
    drop_a, drop_b = "stem.0->b.0|keep", "a.0->c.0|keep"
    assert sg.span("stem.0->b.0").dropped_activations == ("a.0",)
    assert sg.span("a.0->c.0").dropped_activations == ("b.0",)
    data = [torch.randn(64, 3, 8, 8) for _ in range(2)]
    table = build_importance_table(captured, sg, "distortion", data=data, entries=[drop_a, drop_b], **QUIET)
    assert table[drop_a] == pytest.approx(1.0, abs=1e-9)
    assert table[drop_b] < 0.99
    assert table[drop_b] < table[drop_a]


def test_cached_prefix_equals_full_forward(digits):
    """Replaying with the recorded prefix gives what a plain forward of the linearized model gives."""
    model, captured, sg = digits["model"], digits["captured"], digits["sg"]
    batch = digits["inputs"][0]
    base = captured.gm
    base_tensors = {id(t) for t in (*base.parameters(), *base.buffers())}
    recorder = Recorder(base)
    with torch.no_grad():
        reference = recorder.run(batch)
    record = {k: v.clone() for k, v in recorder.values.items()}
    partly_reused = 0
    for entry_id in evaluated_entries(sg):
        plan = single_entry_plan(sg, entry_id)
        plain = linearize(captured, sg, plan).eval()  # its own copy of every parameter
        shared = linearize(captured, sg, plan, share_parameters=True)
        # the shared network reads the captured tensors themselves, the plain one copies
        assert {id(t) for t in (*shared.parameters(), *shared.buffers())} <= base_tensors
        assert not {id(t) for t in (*plain.parameters(), *plain.buffers())} & base_tensors
        reusable = reusable_nodes(shared, base)
        assert reusable == reusable_nodes(plain, base)
        computed = [n for n in shared.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
        partly_reused += 0 < len(reusable) < len(computed)
        with torch.no_grad():
            expected = plain(batch)
            replayed = Replay(shared, recorder.values, reusable).run(batch)
        torch.testing.assert_close(replayed, expected, rtol=1e-6, atol=1e-6)
    assert partly_reused >= 3
    # no replay (and no in-place ReLU in a recomputed suffix) changed the record
    for name, value in record.items():
        assert torch.equal(recorder.values[name], value), name
    with torch.no_grad():
        assert torch.equal(reference, model(batch))


def test_reusable_nodes_stop_at_the_span(digits):
    captured, sg = digits["captured"], digits["sg"]
    base = capture(digits["model"], digits["x"]).gm  # a capture of its own: node names are stable
    gm = linearize(captured, sg, single_entry_plan(sg, "add->down.0|keep"))  # the original network
    computed = {n.name for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")}
    assert reusable_nodes(gm, base) == computed
    gm = linearize(captured, sg, single_entry_plan(sg, "conv1.0->conv2.0|keep"))
    assert reusable_nodes(gm, base) >= {"stem_0", "stem_1", "stem_2", "conv1_0", "conv1_1", "conv1_2"}
    gm = linearize(captured, sg, single_entry_plan(sg, "stem.0->add|keep"))
    names = reusable_nodes(gm, base)
    assert {"stem_0", "stem_1", "stem_2"} <= names
    assert not names & {"conv1_0", "conv1_1", "conv2_0", "add", "down_0", "fc"}


def test_stacked_calibration_batches_give_the_table_of_separate_batches(digits, monkeypatch):
    captured, sg = digits["captured"], digits["sg"]
    some = evaluated_entries(sg)[:6]
    data = [digits["inputs"][0][i : i + 4] for i in range(0, 12, 4)]
    stacked = build_importance_table(captured, sg, "distortion", data=data, entries=some, **QUIET)
    assert stacked.info["stacked_batches"] is True
    monkeypatch.setattr(Distortion, "stacks_batches", False)
    apart = build_importance_table(captured, sg, "distortion", data=data, entries=some, **QUIET)
    assert apart.info["stacked_batches"] is False
    for entry_id in some:
        assert stacked.delta(entry_id) == pytest.approx(apart.delta(entry_id), rel=1e-4, abs=1e-9)
    assert any(stacked.delta(e) < -1e-6 for e in some)  # the comparison is not between zeros


class MixesSamples(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class BakedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1).sum(1)


@pytest.mark.parametrize("module", [MixesSamples(), BakedBatch()], ids=["mixes-samples", "baked-batch"])
def test_batches_stay_apart_when_stacking_would_change_the_outputs(module):
    gm = torch.fx.symbolic_trace(module)
    batches = [Batch((torch.randn(2, 3),), None) for _ in range(3)]
    assert stack_batches(gm, batches) is batches
    independent = torch.fx.symbolic_trace(nn.ReLU())
    (one,) = stack_batches(independent, batches)
    assert one.inputs[0].shape == (6, 3)
    labelled = [Batch((torch.randn(2, 3),), torch.zeros(2)) for _ in range(3)]
    assert stack_batches(independent, labelled) is labelled


# ------------------------------------------------------------------ loss, accuracy, callable
def test_loss_and_accuracy(digits):
    model, captured, sg = digits["model"], digits["captured"], digits["sg"]
    data = digits["labelled"]
    loss = build_importance_table(captured, sg, data=data, **QUIET)  # auto: labelled -> loss
    assert loss.estimator == "loss"
    samples = torch.cat([b for b, _ in data]), torch.cat([t for _, t in data])
    with torch.no_grad():
        assert loss.info["reference"] == pytest.approx(float(F.cross_entropy(model(samples[0]), samples[1])), rel=1e-5)
    for entry_id in identity_entries(sg):
        assert loss[entry_id] == 1.0
    assert all(math.isfinite(v) and v >= 0 for v in loss.entries.values())

    accuracy = build_importance_table(captured, sg, "loss", data=data, metric="accuracy", **QUIET)
    assert accuracy.info["reference"] > 0.85
    entry_id = "src:x->down.0|prune:conv1.0+conv2.0"
    gm = linearize(captured, sg, single_entry_plan(sg, entry_id)).eval()
    with torch.no_grad():
        acc = float((gm(samples[0]).argmax(1) == samples[1]).float().mean())
    assert accuracy.delta(entry_id) == pytest.approx(acc - accuracy.info["reference"], abs=1e-6)
    assert math.exp(-1) <= min(accuracy.entries.values()) <= max(accuracy.entries.values()) <= math.e


def test_user_callable_matches_accuracy_estimator(digits):
    captured, sg = digits["captured"], digits["sg"]
    data = digits["labelled"]
    samples = torch.cat([b for b, _ in data]), torch.cat([t for _, t in data])
    calls = []

    def score(net: nn.Module) -> float:
        calls.append(net)
        assert not net.training
        with torch.no_grad():
            return float((net(samples[0]).argmax(1) == samples[1]).float().mean())

    some = evaluated_entries(sg)[:4] + identity_entries(sg)[:1]
    table = build_importance_table(captured, sg, score, entries=some, **QUIET)
    assert table.estimator.endswith("score")
    assert len(calls) == 1 + 4  # the original once, then each evaluated entry
    reference = build_importance_table(captured, sg, "loss", data=data, entries=some, metric="accuracy", **QUIET)
    for entry_id in some:
        assert table[entry_id] == pytest.approx(reference[entry_id], rel=1e-6)  # float32 mean vs exact count


# ------------------------------------------------------------------ finetune
def test_finetune_runs_on_a_few_entries(digits):
    model, captured, sg = digits["model"], digits["captured"], digits["sg"]
    train_x, train_y = digits["train"]
    data = [(train_x[i : i + 50], train_y[i : i + 50]) for i in range(0, 200, 50)]
    chosen = ["stem.0->conv2.0|prune:conv1.0", "stem.0->add|keep", "conv1.0->conv2.0|keep"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = build_importance_table(captured, sg, "finetune", data=data, entries=chosen, steps=2, **QUIET)
    assert table.estimator == "finetune"
    assert set(table.entries) == set(chosen)
    assert table["conv1.0->conv2.0|keep"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in table.entries.values())
    assert table.info["reinitialised"] == 1  # the span pruned to one conv
    assert "2 batches" in table.info["data"]
    assert table.info["options"]["steps"] == 2 and table.info["options"]["lr"] == 0.01
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    for k, v in captured.gm.state_dict().items():  # and so is the captured one: each entry trains a copy
        assert torch.equal(v, before[k]), k
    # a separate evaluation split, Adam, the loss metric
    eval_data = digits["labelled"][:1]
    table = build_importance_table(
        captured,
        sg,
        "finetune",
        data=data[:1],
        eval_data=eval_data,
        entries=chosen[:1],
        steps=1,
        optimizer="adam",
        lr=1e-3,
        metric="loss",
        reinit_single=False,
        **QUIET,
    )
    assert math.isfinite(table[chosen[0]]) and table.info["reinitialised"] == 0


# ------------------------------------------------------------------ cache
def test_second_build_evaluates_nothing(digits, tmp_path, monkeypatch):
    model, captured, sg = digits["model"], digits["captured"], digits["sg"]
    calls = []
    real = importance_base.linearize  # every estimator gets an entry's network from linearize

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(importance_base, "linearize", counting)
    some = evaluated_entries(sg)[:4]
    options = {"data": digits["inputs"], "entries": some, "cache_dir": tmp_path, "progress": False}
    first = build_importance_table(captured, sg, "distortion", **options)
    assert first.info["evaluated"] == 4 and len(calls) == 4
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert not list(tmp_path.glob("*.tmp"))
    calls.clear()
    second = build_importance_table(captured, sg, "distortion", **options)
    assert calls == [] and second.info["evaluated"] == 0 and second.info["cached"] == 4
    assert dict(second.entries) == dict(first.entries)
    # other data, other options or other weights are other keys
    third = build_importance_table(captured, sg, "distortion", **{**options, "data": digits["inputs"][:1]})
    assert third.info["evaluated"] == 4
    changed = DigitsNet()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.fc.bias.add_(0.1)
    changed.eval()
    assert build_importance_table(capture(changed, digits["x"]), sg, "distortion", **options).info["evaluated"] == 4


def test_interrupted_build_resumes_with_the_missing_entries(digits, tmp_path):
    captured, sg = digits["captured"], digits["sg"]
    todo = evaluated_entries(sg)
    seen: list[str] = []

    class Interrupt(Exception):
        pass

    def score(net, fail_after=None):
        spans = [n.args[1] for n in net.graph.nodes if is_marker(n, SPAN_END)]
        if spans:  # an entry's network (the keep-all reference has no merged span)
            if fail_after is not None and len(seen) == fail_after:
                raise Interrupt
            seen.append(spans[0])
        return float(len(net.graph.nodes))

    options = {"cache_dir": tmp_path, "progress": False, "cache_key": "node-count"}
    with pytest.raises(Interrupt):
        build_importance_table(captured, sg, lambda net: score(net, fail_after=3), **options)
    assert len(seen) == 3
    seen.clear()
    table = build_importance_table(captured, sg, lambda net: score(net), **options)
    assert len(seen) == len(todo) - 3  # only the missing entries
    assert table.info["cached"] == 3 and table.info["evaluated"] == len(todo) - 3
    seen.clear()
    build_importance_table(captured, sg, lambda net: score(net), **options)
    assert seen == []
    # a user callable without cache_key is never cached
    build_importance_table(captured, sg, lambda net: score(net), progress=False, cache_dir=tmp_path)
    assert len(seen) == len(todo)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FXMERGE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "importance"
    monkeypatch.delenv("FXMERGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fxmerge" / "importance"


# ------------------------------------------------------------------ table, data, errors
def test_table_json_round_trip(tmp_path):
    table = ImportanceTable("distortion", {"a|keep": 1.0, "b|keep": 0.5}, {"evaluated": 1})
    with pytest.raises(TypeError):
        table.entries["a|keep"] = 2.0  # read-only
    path = table.save(tmp_path / "t.json")
    assert json.loads(path.read_text())["format"] == "fxmerge.importance_table/1"
    loaded = ImportanceTable.load(path)
    assert dict(loaded.entries) == dict(table.entries) and loaded.info["evaluated"] == 1
    assert loaded.delta("b|keep") == pytest.approx(math.log(0.5))
    with pytest.raises(ValueError, match="not an importance table"):
        ImportanceTable.from_dict({"format": "other"})


def test_datasets_and_loaders_are_accepted(digits):
    captured, sg = digits["captured"], digits["sg"]
    test_x, test_y = digits["labelled"][0]
    dataset = torch.utils.data.TensorDataset(test_x, test_y)
    some = evaluated_entries(sg)[:2]
    from_dataset = build_importance_table(captured, sg, data=dataset, batch_size=50, entries=some, **QUIET)
    loader = torch.utils.data.DataLoader(dataset, batch_size=50)
    from_loader = build_importance_table(captured, sg, data=loader, entries=some, **QUIET)
    assert from_dataset.estimator == from_loader.estimator == "loss"
    assert dict(from_dataset.entries) == dict(from_loader.entries)
    assert "2 labelled batches, 100 samples" in from_loader.info["data"]
    dicts = [{"image": test_x, "label": test_y}]
    assert build_importance_table(captured, sg, data=dicts, entries=some, **QUIET).estimator == "loss"


def test_error_messages(digits):
    captured, sg = digits["captured"], digits["sg"]
    with pytest.raises(ValueError, match="unknown importance estimator 'magic'.*distortion, loss, finetune"):
        build_importance_table(captured, sg, "magic", **QUIET)
    for name in ("loss", "finetune"):
        with pytest.raises(ValueError, match=rf"'{name}' needs labelled data, got no data.*\(input, label\)"):
            build_importance_table(captured, sg, name, **QUIET)
        with pytest.raises(ValueError, match="needs labelled data, got unlabelled batches"):
            build_importance_table(captured, sg, name, data=digits["inputs"], **QUIET)
    with pytest.raises(TypeError, match="unknown option.*'stepz'.*valid options"):
        build_importance_table(captured, sg, "finetune", data=digits["labelled"], stepz=3, **QUIET)
    with pytest.raises(TypeError, match="'metric'.* for importance estimator 'distortion' \\(estimator='auto' chose"):
        build_importance_table(captured, sg, data=digits["inputs"], metric="accuracy", **QUIET)
    with pytest.raises(ValueError, match="metric must be one of"):
        build_importance_table(captured, sg, "loss", data=digits["labelled"], metric="f1", **QUIET)
    with pytest.raises(ValueError, match="cannot read a batch.*a tensor batch x, or a pair"):
        build_importance_table(captured, sg, data=[("a", "b", "c")], **QUIET)
    with pytest.raises(ValueError, match="at least 2 batches"):
        build_importance_table(captured, sg, "finetune", data=digits["labelled"][:1], **QUIET)
    with pytest.raises(KeyError, match="not in the span graph"):
        build_importance_table(captured, sg, entries=["nope|keep"], **QUIET)
    with pytest.raises(TypeError, match="takes the captured model"):
        build_importance_table(digits["model"], sg, **QUIET)
    with pytest.raises(ValueError, match="made for model 'DigitsNet', not 'Pointwise'"):
        build_importance_table(capture(Pointwise().eval(), torch.randn(1, 3, 8, 8)), sg, **QUIET)
    assert ESTIMATORS == ("auto", "distortion", "loss", "finetune", "paper")
