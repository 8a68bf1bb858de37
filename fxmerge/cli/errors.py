"""The one exception the command line raises on purpose.

Every check in :mod:`fxmerge.cli` that finds something the user can fix (a bad
model spec, a missing file, a plan made for another model) raises
:class:`CLIError` with a message that says what to do. :mod:`fxmerge.cli.parser`
prints it as ``fxmerge: error: ...`` with exit status 2; anything it does not
recognise as the user's to fix is reported as a bug, with its traceback.
"""

from __future__ import annotations


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit status 2."""
