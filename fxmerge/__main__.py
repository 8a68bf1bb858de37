"""``python -m fxmerge``: the same as the ``fxmerge`` command."""

import sys

from fxmerge.cli import main

sys.exit(main())
