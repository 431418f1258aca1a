"""cstep's array engine: backend, complex-safe ops, layers, losses, model (and, on top, curvature
operators, run files, the precision study and the command line)."""

__version__ = "0.1.0"

from .backend import get_xp, backend_name  # noqa: E402
from .model import Model, Capture  # noqa: E402

__all__ = ["__version__", "get_xp", "backend_name", "Model", "Capture"]
