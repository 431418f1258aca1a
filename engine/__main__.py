"""``python -m engine`` is the ``cstep`` command."""

import sys

from .cli import main

sys.exit(main())
