"""cstep's array engine.

The core: backend, complex-safe ops, layers, losses, the model (the one forward/backward pass
engine) and the curvature operators; it imports nothing of cstep outside ``engine``. On top, the
application layer :mod:`engine.app` (command line, runs, training loop, run files, precision study,
plots), which no core module imports."""

__version__ = "0.1.0"

from .backend import get_xp, backend_name  # noqa: E402
from .model import Model, Capture  # noqa: E402

__all__ = ["__version__", "get_xp", "backend_name", "Model", "Capture"]
