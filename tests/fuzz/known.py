"""Known library bugs: kept out of the default runs so that new bugs stand out.

Each entry names its xfail regression test in ``tests/fuzz/test_regressions.py``
and its section in ``tests/fuzz/FINDINGS.md``. Two mechanisms:

* :data:`KNOWN` — a failure of one property, in some forms, whose error text matches
  a pattern: the check records it in its report and carries on with the next plan;
* :data:`EXCLUDE` — generator features (``tests.fuzz.generate.FEATURES``) that
  trigger a bug no error pattern can single out (a span-graph mismatch): the
  default runs do not generate them.

When a bug is fixed its regression test XPASSes (strict), which fails the suite:
then delete the entry here as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["EXCLUDE", "KNOWN", "Known"]


@dataclass(frozen=True)
class Known:
    """A filed bug: failures of ``prop`` in ``forms`` whose text matches ``pattern``."""

    finding: str  # the regression test in tests/fuzz/test_regressions.py
    forms: tuple[str, ...]
    prop: str
    pattern: str

    def matches(self, form: str, prop: str, text: str) -> bool:
        return form in self.forms and prop == self.prop and re.search(self.pattern, text, re.S) is not None


KNOWN: tuple[Known, ...] = ()  # every bug the fuzzer found is fixed (tests/fuzz/FINDINGS.md)

EXCLUDE: frozenset[str] = frozenset()
