"""Curvature operators on the flat parameter vector, one interface (DESIGN.md convention 4).

* :class:`HessianCS` - Hessian-vector products by the complex step of the gradient (and the
  gradient from the same pass); :class:`HessianFD` - by forward/central differences of the
  gradient; :class:`HessianRop` - exactly, by Pearlmutter's R-operator in real arithmetic.
* :class:`GaussNewton` - generalized Gauss-Newton J^T H_loss J.
* :class:`Fisher` (targets sampled from the model) and :class:`EmpiricalFisher`.
* :func:`kron_factors` / :class:`KronFactors` - per-layer Kronecker statistics, and
  :class:`KroneckerBlockOperator` - the block-diagonal Kronecker operator of K-FAC and K-BFGS.
"""

from .base import CurvatureOperator, ModelOperator, split_norm
from .fisher import EmpiricalFisher, Fisher
from .gauss_newton import GaussNewton
from .hessian import DEFAULT_CS_STEP, HessianCS, HessianFD, HessianRop
from .kronecker import KronFactors, KroneckerBlockOperator, factor_inverse, factor_inverses, homogeneous, kron_factors

__all__ = ["CurvatureOperator", "ModelOperator", "split_norm", "HessianCS", "HessianFD", "HessianRop",
           "DEFAULT_CS_STEP", "GaussNewton", "Fisher", "EmpiricalFisher", "KronFactors", "kron_factors",
           "homogeneous", "KroneckerBlockOperator", "factor_inverse", "factor_inverses"]
