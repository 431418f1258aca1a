"""Curvature operators on the flat parameter vector, one interface (DESIGN.md convention 4).

* :class:`HessianCS` - Hessian-vector products by the complex step of the gradient (and the
  gradient from the same pass); :class:`HessianFD` - by forward/central differences of the
  gradient; :class:`HessianRop` - exactly, by Pearlmutter's R-operator in real arithmetic.
* :class:`GaussNewton` - generalized Gauss-Newton J^T H_loss J.
* :class:`Fisher` (targets sampled from the model) and :class:`EmpiricalFisher`.
* :func:`kron_factors` / :class:`KronFactors` - per-layer Kronecker statistics, and
  :class:`KroneckerBlockOperator` - the block-diagonal Kronecker operator of K-FAC and K-BFGS.
* Analyses of any of them: :func:`lanczos` (extreme eigenpairs), :func:`slq_density` (spectral
  density by stochastic Lanczos quadrature), :func:`hutchinson_trace`, :func:`hutchpp_trace`,
  :func:`hutchinson_diagonal`, per-layer blocks (:func:`restrict`, :func:`layer_blocks`) and
  :func:`rayleigh_quotients` (``spectral`` and ``analysis`` modules).
"""

from .base import CurvatureOperator, ModelOperator, split_norm
from .fisher import EmpiricalFisher, Fisher
from .gauss_newton import GaussNewton
from .hessian import DEFAULT_CS_STEP, HessianCS, HessianFD, HessianRop
from .kronecker import KronFactors, KroneckerBlockOperator, factor_inverse, factor_inverses, homogeneous, kron_factors
from .analysis import (BlockRestriction, DiagonalEstimate, TraceEstimate, hutchinson_diagonal, hutchinson_trace,
                       hutchpp_trace, layer_blocks, rayleigh_quotients, restrict)
from .spectral import LanczosResult, SpectralDensity, gaussian_density, lanczos, lanczos_quadrature, slq_density

__all__ = ["CurvatureOperator", "ModelOperator", "split_norm", "HessianCS", "HessianFD", "HessianRop",
           "DEFAULT_CS_STEP", "GaussNewton", "Fisher", "EmpiricalFisher", "KronFactors", "kron_factors",
           "homogeneous", "KroneckerBlockOperator", "factor_inverse", "factor_inverses"]
__all__ += ["lanczos", "LanczosResult", "slq_density", "SpectralDensity", "gaussian_density", "lanczos_quadrature",
            "hutchinson_trace", "hutchpp_trace", "hutchinson_diagonal", "TraceEstimate", "DiagonalEstimate",
            "BlockRestriction", "restrict", "layer_blocks", "rayleigh_quotients"]
