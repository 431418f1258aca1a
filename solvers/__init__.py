"""Solvers against one contract (see :mod:`solvers.base`), one module per solver."""

from .base import SOLVERS, Hyper, Solver, get_solver, make_solver, register, solver_names
from . import sgd  # noqa: F401  (registers)
from . import adam, kbfgs, kfac, rmsprop  # noqa: F401  (register adam, kbfgs, kbfgs_l, kfac, rmsprop)
from . import hessian_free, newton_krylov  # noqa: F401  (register hessian_free, newton_krylov)
from . import shampoo, soap  # noqa: F401  (register shampoo, soap)
from . import adahessian, muon, sophia  # noqa: F401  (register adahessian, muon, sophia)

__all__ = ["SOLVERS", "Hyper", "Solver", "get_solver", "make_solver", "register", "solver_names"]
