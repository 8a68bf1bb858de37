"""fxmerge on torch.distributed: the helpers, and two CPU processes with gloo against one.

The fast tests check the helpers without a process group (where they must change
nothing) and the deterministic sharding. The ``slow`` ones spawn two processes
(``torch.multiprocessing``, gloo, a file rendezvous) on a small CNN and a generated
ImageFolder dataset of tiny PNGs:

* the sharded ``paper`` importance table equals the single-process one entry by
  entry, and ``compress`` makes the same plan (a deterministic FLOP-count backend,
  so that only the distribution could make them differ), with rank 1 timing nothing;
* a rank killed halfway loses no finished entry: the rerun evaluates only the rest;
* DistributedDataParallel fine-tuning runs, keeps the ranks' weights equal and
  lowers the loss;
* ``torchrun --nproc-per-node 2 -m fxmerge compress ... --importance paper`` writes
  the ``plan.json`` one process writes, and prints once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxmerge import distributed
from fxmerge.train import rank_batches

ROOT = Path(__file__).resolve().parent.parent
HOLDOUT = {"holdout_train": 12, "holdout_val": 12, "batch_size": 4, "lr": 0.05}


# --------------------------------------------------------------------------- without a group
def test_assign_is_deterministic_and_balanced():
    costs = [5.0, 1.0, 4.0, 1.0, 3.0, 2.0, 2.0]
    owner = distributed.assign(costs, 2)
    assert owner == distributed.assign(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == part) for part in (0, 1)]
    assert sorted(loads) == [9.0, 9.0]
    assert distributed.assign([1.0] * 5, 2) == [0, 1, 0, 1, 0]  # equal costs: round robin
    assert distributed.assign([], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        distributed.assign([1.0], 0)


def test_helpers_are_no_ops_without_a_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    assert distributed.shard([3, 1, 2], [1.0, 2.0, 3.0]) == [3, 1, 2]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.gather_dicts({"a": 1}) == {"a": 1}
    assert distributed.broadcast_object("x") == "x"
    assert distributed.run_on_main(lambda: 42) == 42
    assert distributed.once_per("cpu", lambda: 7) == 7
    with pytest.raises(KeyError):
        distributed.run_on_main(lambda: {}["missing"])
    distributed.barrier()
    with distributed.process_group() as grouped:
        assert not grouped and not distributed.is_distributed()


def test_rank_batches_give_every_rank_the_same_number_of_steps(monkeypatch):
    batches = [(torch.full((2, 1), float(k)), torch.zeros(2, dtype=torch.long)) for k in range(5)]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        share = rank_batches(batches)
        assert len(share) == 3
        seen += [int(b[0][0, 0]) for b in share]
    assert sorted(seen) == [0, 0, 1, 2, 3, 4]  # padded by wrapping around
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    samples = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        share = rank_batches(loader)
        share.set_epoch(0)
        samples += [int(v) for x, _ in share for v in x[:, 0]]
    assert sorted(samples) == list(range(10))  # a DistributedSampler over the loader's dataset


def test_timing_rule(monkeypatch):
    """One rank per device type times, unless every rank has its own GPU of one kind (then they share)."""
    from fxmerge.latency import table as latency_table

    class Backend:
        name, version, device, device_name, threads, dtype = "fake", "1", "cuda", "H200", 1, torch.float32

    assert latency_table.timing_rule(Backend()) == "alone"  # no group
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    kind = latency_table.device_kind(Backend())
    cases = [
        ([(kind, ("node0", 0)), (kind, ("node0", 1))], "shard"),  # two GPUs of one kind
        ([(kind, ("node0", 0)), (kind, ("node1", 0))], "shard"),  # one GPU on each of two nodes
        ([(kind, ("node0", 0)), (kind, ("node0", 0))], "leader"),  # two processes on one GPU
        ([(kind, None), (kind, None)], "leader"),  # CPU timing
        ([(kind, ("node0", 0)), ((*kind[:2], "A100", *kind[3:]), ("node0", 1))], "leader"),  # two kinds
    ]
    for gathered, rule in cases:
        monkeypatch.setattr(distributed, "all_gather_object", lambda _, g=gathered: g)
        assert latency_table.timing_rule(Backend()) == rule, gathered


# --------------------------------------------------------------------------- the model and data
class SmallNet(nn.Module):
    """stem, a residual block, a strided conv, a 3-way head: 16×16 RGB images."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        s = self.stem(x)
        y = torch.relu(self.conv2(self.conv1(s)) + s)
        return self.head(self.down(y).mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


def images(root: Path):
    from fxmerge.data import image_folder

    return image_folder(root / "images", (1, 3, 16, 16), batch_size=4)


class CountingFlops:
    """The FLOP-count backend of test_api, counting its measurements."""

    def __init__(self):
        from tests.test_api import FlopsBackend

        self.inner, self.calls = FlopsBackend(), 0
        for attr in ("name", "version", "device", "device_name", "threads", "dtype"):
            setattr(self, attr, getattr(self.inner, attr))

    def measure(self, module, example_input):
        self.calls += 1
        return self.inner.measure(module, example_input)


def importance(root: Path, cache: str) -> dict:
    from fxmerge.api import analyze_captured
    from fxmerge.capture import capture
    from fxmerge.importance import build_importance_table

    captured = capture(small_net(), torch.randn(1, 3, 16, 16))
    table = build_importance_table(
        captured,
        analyze_captured(captured),
        "paper",
        data=images(root)[0].dataset,
        cache_dir=root / cache,
        progress=False,
        **HOLDOUT,
    )
    return {"entries": dict(table.entries), "info": json.loads(json.dumps(dict(table.info), default=str))}


def plan(root: Path, cache: str) -> dict:
    import fxmerge

    backend = CountingFlops()
    result = fxmerge.compress(
        small_net(),
        torch.randn(1, 3, 16, 16),
        "70%",
        backend=backend,
        importance="paper",
        data=images(root)[0].dataset,
        cache_dir=root / cache,
        progress=False,
        **HOLDOUT,
    )
    return {"plan": list(result.plan.entries), "measured": backend.calls, "notes": list(result.report.notes)}


def ddp_finetune(root: Path) -> dict:
    from fxmerge.importance.keys import fingerprint
    from fxmerge.train import finetune

    train = images(root)[0]
    model = small_net()

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in train) / len(train.dataset)

    before = loss()
    finetune(model, train, epochs=3, lr=0.05, progress=False)
    return {"before": before, "after": loss(), "weights": fingerprint(sorted(model.state_dict().items()))}


def dying_importance(root: Path, cache: str) -> dict:
    """The importance table, but rank 1 dies right after writing its second entry."""
    import fxmerge.importance.table as table_module

    real, written = table_module.write_delta, []

    def write_then_die(cache_, fields, delta, seconds):
        real(cache_, fields, delta, seconds)
        written.append(fields["entry"])
        if distributed.rank() == 1 and len(written) == 2:
            os._exit(3)

    table_module.write_delta = write_then_die
    return importance(root, cache)


JOBS = {
    "pipeline": lambda root: {
        "importance": importance(root, "cache-2"),
        "compress": plan(root, "cache-compress-2"),
        "ddp": ddp_finetune(root),
    },
    "die": lambda root: dying_importance(root, "cache-resume"),
    "resume": lambda root: importance(root, "cache-resume"),
}


def _worker(rank: int, world: int, root: str, job: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{job}", rank=rank, world_size=world)
    try:
        result = JOBS[job](Path(root))
        Path(root, f"{job}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(root: Path, job: str) -> list[dict]:
    torch.multiprocessing.spawn(_worker, args=(2, str(root), job), nprocs=2, join=True)
    return [json.loads((root / f"{job}-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.test_data import make_image_folder

    root = tmp_path_factory.mktemp("distributed")
    make_image_folder(root / "images", train=8, val=2, size=(16, 16))
    return root


# --------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_processes_build_the_same_table_and_plan_and_ddp_trains(workspace):
    single = importance(workspace, "cache-1")
    assert single["info"]["cached"] == 0
    single_plan = plan(workspace, "cache-compress-1")
    ranks = spawn(workspace, "pipeline")
    for result in ranks:
        assert result["importance"]["entries"] == single["entries"]  # entry by entry, every rank
        assert result["compress"]["plan"] == single_plan["plan"]
    evaluated = [r["importance"]["info"]["distributed"]["evaluated_here"] for r in ranks]
    assert sum(evaluated) == single["info"]["evaluated"] and min(evaluated) > 0
    assert ranks[0]["importance"]["info"]["evaluated"] == single["info"]["evaluated"]
    # one process times (the latency table, the calibration, the closed loop); the other receives
    assert ranks[0]["compress"]["measured"] > 0 and ranks[1]["compress"]["measured"] == 0
    assert any("one process per device type" in note for note in ranks[0]["compress"]["notes"])
    # DistributedDataParallel: the ranks end with the same weights, and a lower loss
    ddp = [r["ddp"] for r in ranks]
    assert ddp[0]["weights"] == ddp[1]["weights"]
    assert ddp[0]["after"] < ddp[0]["before"] and ddp[0]["after"] == pytest.approx(ddp[1]["after"])


@pytest.mark.slow
def test_a_killed_rank_loses_no_finished_entry(workspace):
    single = importance(workspace, "cache-1")
    needed = single["info"]["evaluated"] + single["info"]["cached"]  # cache-1 may be warm from the test above
    with pytest.raises((torch.multiprocessing.ProcessExitedException, torch.multiprocessing.ProcessRaisedException)):
        spawn(workspace, "die")
    finished = len(list((workspace / "cache-resume").glob("*.json")))
    assert 2 <= finished < needed
    resumed = spawn(workspace, "resume")
    for result in resumed:
        assert result["info"]["cached"] == finished
        assert result["info"]["evaluated"] == needed - finished
        assert result["entries"] == single["entries"]


# --------------------------------------------------------------------------- the command under torchrun
LAUNCHER = """
import sys
sys.path.insert(0, {root!r})
import fxmerge.cli.common as common
from tests.test_api import FlopsBackend
common.latency_backend = lambda name, **settings: FlopsBackend()
from fxmerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_compress_writes_the_single_process_plan(workspace, tmp_path):
    from tests.test_cli import TINY

    model = tmp_path / "tiny.py"
    model.write_text(TINY)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(prefix: list[str], name: str) -> subprocess.CompletedProcess:
        argv = [
            "compress",
            f"{model}:build",
            "--input-shape",
            "1,3,16,16",
            "--target",
            "80%",
            "--importance",
            "paper",
            "--data",
            str(workspace / "images"),
            "--batch-size",
            "4",
            "--importance-batches",
            "2",
            "--finetune-epochs",
            "1",
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / f"cache-{name}"),
            "--out",
            str(tmp_path / name),
            "--no-progress",
        ]
        return subprocess.run([*prefix, str(launcher), *argv], capture_output=True, text=True, env=env, timeout=600)

    one = run([sys.executable], "one")
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = run(torchrun, "two")
    assert two.returncode == 0, two.stderr
    plans = [json.loads((tmp_path / name / "plan.json").read_text()) for name in ("one", "two")]
    assert plans[0]["entries"] == plans[1]["entries"]
    assert two.stdout.count("measure it: fxmerge bench") == 1  # rank 0 alone prints
    assert two.stderr.count("fxmerge: writing plan.json") == 1
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert any("one process per device type" in note for note in report["notes"])
    assert math.isfinite(report["accuracy"]["fine-tuned"])
