"""``python -m engine`` is the ``cstep`` command."""

import sys

from .app.cli import main

sys.exit(main())
