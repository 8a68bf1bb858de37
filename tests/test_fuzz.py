"""The random-architecture fuzzer (issue #17): generated CNNs, every property, three graph forms.

* ``test_fuzz_fast`` and ``test_fuzz_fast_seeds`` — part of the default suite: a
  fixed, derandomized hypothesis run of :data:`FAST_EXAMPLES` networks and the
  networks of :data:`FAST_SEEDS` (together under 20 s on one core).
* ``test_fuzz_long`` — ``pytest -m slow tests/test_fuzz.py``: the networks of seeds
  ``FXMERGE_FUZZ_SEED`` .. ``FXMERGE_FUZZ_SEED + FXMERGE_FUZZ_EXAMPLES - 1``
  (defaults 0 and 5000); prints and writes (``FXMERGE_FUZZ_REPORT``, a JSON file) the
  count, the seed range, the run time and every failure, each new kind of failure
  shrunk (``FXMERGE_FUZZ_SHRINK_S`` seconds, default 120).
* ``test_fuzz_hypothesis_long`` — ``-m slow`` as well: the same number of examples
  drawn by hypothesis (random, shrinking every failure it finds).

Known library bugs are suppressed by ``tests/fuzz/known.py`` (each has a strict
xfail test in ``tests/fuzz/test_regressions.py``); ``FXMERGE_FUZZ_ALL=1`` turns the
suppressions off. See ``tests/fuzz/FINDINGS.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings

from tests.fuzz.build import build_net, example_inputs
from tests.fuzz.checks import check_network, rel
from tests.fuzz.generate import network_from_choices, network_from_seed, networks
from tests.fuzz.known import EXCLUDE, KNOWN
from tests.fuzz.runner import run_seeds
from tests.fuzz.spec import *  # noqa: F403 - the names a network's source uses
from tests.fuzz.spec import Conv, Net, Unit, count_convs, to_source

FAST_EXAMPLES = 8
FAST_SEEDS = (19, 61)
ALL = os.environ.get("FXMERGE_FUZZ_ALL") == "1"
RUN_EXCLUDE = frozenset() if ALL else EXCLUDE
RUN_KNOWN = () if ALL else KNOWN
_FAST = settings(
    max_examples=FAST_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


# ------------------------------------------------------------------ the generator itself
def test_generated_networks_are_valid_small_and_reproducible():
    """Every network runs in eager mode, stays within the size bounds, and its source rebuilds it."""
    for seed in range(40):
        net, choices = network_from_seed(seed, RUN_EXCLUDE)
        assert network_from_seed(seed, RUN_EXCLUDE)[0] == net
        assert network_from_choices(choices, RUN_EXCLUDE)[0] == net
        assert eval(to_source(net)) == net
        assert count_convs(net) <= 16 and net.channels <= 16 and max(net.size) <= 16
        with torch.no_grad():
            out = build_net(net)(*example_inputs(net))
        leaves = list(out.values()) if isinstance(out, dict) else [out]
        assert all(t.shape[1] <= 16 and all(s <= 16 for s in t.shape[2:]) for t in leaves)


def test_replay_of_empty_choices_is_the_smallest_network():
    net, _ = network_from_choices([])
    assert net == Net(blocks=(Unit(Conv(1, (1, 1), bias=False), norm=None, act=None),), channels=1, size=(4, 4))


def test_a_network_builds_the_same_weights_every_time():
    net, _ = network_from_seed(3, RUN_EXCLUDE)
    inputs = example_inputs(net)
    with torch.no_grad():
        assert rel(build_net(net)(*inputs), build_net(net)(*inputs)) == 0.0


# ------------------------------------------------------------------ the fast run
@_FAST
@given(net=networks(exclude=RUN_EXCLUDE))
def test_fuzz_fast(net):
    """Random networks keep every property in all three graph forms (fixed examples: deterministic)."""
    note(f"network source:\n{net.to_source()}")
    check_network(net, plans=2, onnx_forms=("fx",), known=RUN_KNOWN)


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_fuzz_fast_seeds(seed):
    """Two larger seeded networks (residual, pre-activation, add and cat regions, Conv1d, GroupNorm, x*sigmoid(x))."""
    net, _ = network_from_seed(seed, RUN_EXCLUDE)
    check_network(net, plans=2, onnx_forms=("fx",), known=RUN_KNOWN)


# ------------------------------------------------------------------ the long runs
def _report_path(tmp_path_factory) -> Path:
    given_path = os.environ.get("FXMERGE_FUZZ_REPORT")
    return Path(given_path) if given_path else tmp_path_factory.mktemp("fuzz") / "fuzz-report.json"


@pytest.mark.slow
def test_fuzz_long(tmp_path_factory):
    count = int(os.environ.get("FXMERGE_FUZZ_EXAMPLES", "5000"))
    start = int(os.environ.get("FXMERGE_FUZZ_SEED", "0"))
    shrink_s = float(os.environ.get("FXMERGE_FUZZ_SHRINK_S", "120"))
    result = run_seeds(start, count, exclude=RUN_EXCLUDE, known=RUN_KNOWN, shrink_s=shrink_s)
    path = result.write(_report_path(tmp_path_factory))
    print(f"\n{result.summary()}\nreport: {path}")
    for failure in result.failures:
        if "shrunk" in failure:
            print(f"\nshrunk ({failure['signature']}, seed {failure['seed']}):\n{failure['shrunk']}")
    assert not result.failures, result.summary()


@pytest.mark.slow
def test_fuzz_hypothesis_long():
    count = int(os.environ.get("FXMERGE_FUZZ_EXAMPLES", "5000"))
    began = time.monotonic()

    @settings(
        max_examples=count, deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck)
    )
    @given(net=networks(exclude=RUN_EXCLUDE))
    def run(net: Net) -> None:
        note(f"network source:\n{net.to_source()}")
        check_network(net, plans=3, known=RUN_KNOWN)

    run()
    print(f"\nfuzz (hypothesis): {count} examples in {time.monotonic() - began:.0f} s, no failure")
