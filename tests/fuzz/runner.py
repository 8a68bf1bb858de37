"""The long run: check the networks of a range of seeds and record every failure.

``run_seeds(start, count)`` checks ``network_from_seed(seed)`` for each seed in
``[start, start + count)``. Every failure is recorded with its seed, signature
(form / property / error type), message and network source; the first failure of
each signature is also shrunk (:func:`tests.fuzz.shrink.shrink`) within a time
budget, checking only the forms involved. Generator bugs (a network that does not
run in eager mode) are recorded the same way under the signature ``generator``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.fuzz.checks import FuzzFailure, InvalidNetwork, check_network
from tests.fuzz.forms import FORMS
from tests.fuzz.generate import network_from_seed
from tests.fuzz.known import EXCLUDE, KNOWN, Known
from tests.fuzz.shrink import shrink
from tests.fuzz.spec import Net

__all__ = ["RunResult", "run_seeds", "same_failure"]


@dataclass
class RunResult:
    start: int
    count: int
    seconds: float = 0.0
    plans: int = 0
    merged_spans: int = 0
    known: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        kinds = Counter(f["signature"] for f in self.failures)
        lines = [
            f"fuzz: {self.count} networks, seeds {self.start}..{self.start + self.count - 1}, "
            f"{self.seconds:.0f} s, {self.plans} plans merged, {self.merged_spans} merged spans checked, "
            f"{len(self.failures)} failures",
        ]
        lines += [f"  {n} × {signature}" for signature, n in kinds.most_common()]
        lines += [f"  known (suppressed): {n} × {name}" for name, n in sorted(self.known.items())]
        for failure in self.failures:
            lines.append(f"- seed {failure['seed']}: {failure['error'][:300]}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def _forms_of(failure: FuzzFailure) -> tuple[str, ...]:
    if failure.form != "all":
        return (failure.form,)
    other = failure.message.split(" ", 2)[1] if failure.message.startswith("AssertionError: ") else ""
    return ("fx", other) if other in FORMS and other != "fx" else FORMS


def same_failure(failure: FuzzFailure, known: tuple[Known, ...] = KNOWN) -> Callable[[Net], bool]:
    """A predicate: does a network fail the same way (signature), checking only the forms involved?"""
    forms = _forms_of(failure)

    def fails(net: Net) -> bool:
        try:
            check_network(net, forms=forms, onnx_forms=forms if failure.prop == "onnx" else (), known=known)
        except FuzzFailure as other:
            return other.signature == failure.signature
        except InvalidNetwork:
            return False
        return False

    return fails


def _record(seed: int, net: Net, signature: str, error: str) -> dict:
    return {"seed": seed, "signature": signature, "error": error, "source": net.to_source()}


def run_seeds(
    start: int,
    count: int,
    *,
    exclude: frozenset[str] = EXCLUDE,
    known: tuple[Known, ...] = KNOWN,
    shrink_s: float = 120.0,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Check ``count`` seeded networks from ``start``; record (and shrink) every failure."""
    result = RunResult(start, count)
    began = time.monotonic()
    shrunk: set[str] = set()
    for seed in range(start, start + count):
        net, choices = network_from_seed(seed, exclude)
        try:
            report = check_network(net, known=known)
        except InvalidNetwork as exc:
            result.failures.append(_record(seed, net, "generator", str(exc)[:1000]))
            log(f"seed {seed}: generator bug: {str(exc)[:200]}")
            continue
        except FuzzFailure as failure:
            record = _record(seed, net, failure.signature, str(failure)[:1000])
            if failure.signature not in shrunk and shrink_s > 0:
                shrunk.add(failure.signature)
                small, _ = shrink(choices, same_failure(failure, known), exclude, budget_s=shrink_s)
                record["shrunk"] = small.to_source()
            result.failures.append(record)
            log(f"seed {seed}: {failure.signature}: {str(failure)[:200]}")
            continue
        result.plans += report.plans
        result.merged_spans += report.merged_spans
        for name in report.known:
            result.known[name] = result.known.get(name, 0) + 1
    result.seconds = time.monotonic() - began
    return result
