"""Solvers against one contract (see :mod:`solvers.base`), one module per solver."""

from .base import SOLVERS, Hyper, Solver, get_solver, make_solver, register, solver_names
from . import sgd  # noqa: F401  (registers)

__all__ = ["SOLVERS", "Hyper", "Solver", "get_solver", "make_solver", "register", "solver_names"]
