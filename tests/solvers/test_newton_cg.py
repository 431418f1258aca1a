"""solvers.newton_cg: the Newton-CG base of Newton-Krylov and Hessian-free.

The rho rule (:func:`adapt_damping`) and the line search (:func:`backtracking`) are pure and are
checked case by case on host floats; the shared prologue and zero-gradient exit run through both
solvers under the ``xp`` fixture (``twinned``, tests/solvers/common.py)."""

import math

import numpy
import pytest

from engine.backend import to_host
from nets import mlp
from solvers import make_solver
from solvers.hessian_free import HessianFree
from solvers.newton_cg import VERDICTS, LineSearch, NewtonCG, RadiusRule, RhoRule, adapt_damping, adapt_radius, backtracking
from solvers.newton_krylov import NewtonKrylov
from tests.solvers.common import twinned

MARTENS = RhoRule()  # 1/4, 3/4, x3/2, x2/3, lambda in [0, inf)
NOISE = 1e-12


# --- the rho rule: Martens' plain ratio (Hessian-free) ------------------------------------------

@pytest.mark.parametrize("actual,rho,verdict,damping", [
    (0.9, 0.9, "grow", 45.0 * (2.0 / 3.0)),   # rho > rho_high: lambda down
    (0.1, 0.1, "shrink", 45.0 * 1.5),         # rho < rho_low: lambda up
    (0.5, 0.5, "keep", 45.0),                 # in between: lambda kept
    (0.25, 0.25, "keep", 45.0),               # the thresholds themselves keep lambda
    (0.75, 0.75, "keep", 45.0),
    (-2.0, -2.0, "shrink", 45.0 * 1.5),       # the loss rose
], ids=["high", "low", "between", "at-low", "at-high", "increase"])
def test_martens_rho_cases(actual, rho, verdict, damping):
    update = adapt_damping(1.0, actual, 45.0, MARTENS)
    assert update.rho == rho and update.effective_rho == rho
    assert update.case == "measured" and update.verdict == verdict
    assert update.damping == damping


def test_martens_zero_predicted_reduction_is_not_measurable():
    """Martens' code divides by g^T p + 1/2 p^T G p; a zero denominator gives NaN, and NaN raises lambda."""
    update = adapt_damping(0.0, 0.3, 2.0, MARTENS)
    assert math.isnan(update.rho) and update.case == "unmeasurable"
    assert update.verdict == "shrink" and update.damping == 3.0


@pytest.mark.parametrize("predicted,actual", [(1.0, math.nan), (math.nan, 0.5), (1e-310, 1e10), (1.0, -math.inf)],
                         ids=["nan-actual", "nan-predicted", "overflow", "inf-actual"])
def test_martens_non_finite_ratio_counts_as_nan(predicted, actual):
    update = adapt_damping(predicted, actual, 2.0, MARTENS)
    assert math.isnan(update.rho) and update.case == "unmeasurable"
    assert update.verdict == "shrink" and update.damping == 3.0


def test_martens_ratio_is_taken_whatever_the_sign_of_the_prediction():
    """A predicted increase that came true is a ratio like any other in Martens' code."""
    update = adapt_damping(-1.0, -0.9, 3.0, MARTENS)
    assert update.rho == 0.9 and update.verdict == "grow" and update.damping == 2.0


@pytest.mark.parametrize("l0,l1,denom", [(1.25, 1.0, -0.3), (1.0, 1.0, -0.3), (1.0, 1.0, 0.3), (0.7, 1.1, -1e-3)])
def test_martens_ratio_is_his_quotient_bit_for_bit(l0, l1, denom):
    """rho from the reductions equals Martens' (L1 - L0) / (g^T p + 1/2 p^T G p), signed zeros included."""
    rho = adapt_damping(-denom, -(l1 - l0), 1.0, MARTENS).rho
    want = (l1 - l0) / denom
    assert rho.hex() == want.hex()


# --- the rho rule: cstep's resolution rule (Newton-Krylov) --------------------------------------

@pytest.mark.parametrize("actual,verdict,damping", [(0.9, "grow", 1.0 * (2.0 / 3.0)), (0.1, "shrink", 1.5),
                                                    (0.5, "keep", 1.0)], ids=["high", "low", "between"])
def test_resolved_rho_cases(actual, verdict, damping):
    update = adapt_damping(1.0, actual, 1.0, MARTENS, NOISE)
    assert update.case == "measured" and update.rho == actual and update.verdict == verdict
    assert update.damping == damping


@pytest.mark.parametrize("predicted", [0.0, -1.0, math.nan], ids=["zero", "increase", "nan"])
def test_no_predicted_reduction_is_not_measurable(predicted):
    """Delta_pred <= 0: the model predicts no decrease; rho = -inf, lambda up."""
    update = adapt_damping(predicted, 0.5, 1.0, MARTENS, NOISE)
    assert update.rho == -math.inf and update.effective_rho == -math.inf
    assert update.case == "unmeasurable" and update.verdict == "shrink" and update.damping == 1.5


def test_unresolved_prediction_counts_as_rho_one_unless_the_loss_rose():
    """0 < Delta_pred <= noise: the losses cannot resolve the prediction (docs/newton-krylov.md section 4.2)."""
    quiet = adapt_damping(1e-14, -1e-13, 1.0, MARTENS, NOISE)  # rose by less than the noise
    assert quiet.case == "unresolved" and quiet.rho == -1e-13 / 1e-14
    assert quiet.effective_rho == 1.0 and quiet.verdict == "grow" and quiet.damping == 2.0 / 3.0
    loud = adapt_damping(1e-14, -1e-11, 1.0, MARTENS, NOISE)  # rose beyond it
    assert loud.case == "unresolved" and loud.effective_rho == loud.rho == -1e-11 / 1e-14
    assert loud.verdict == "shrink" and loud.damping == 1.5


@pytest.mark.parametrize("predicted", [1.0, 1e-14], ids=["resolved", "unresolved"])
def test_nan_actual_reduction_raises_the_damping(predicted):
    update = adapt_damping(predicted, math.nan, 1.0, MARTENS, NOISE)
    assert math.isnan(update.effective_rho) and update.verdict == "shrink" and update.damping == 1.5


def test_non_finite_trial_loss_raises_the_damping():
    """Newton-Krylov maps a non-finite trial loss to Delta_act = -inf."""
    update = adapt_damping(1.0, -math.inf, 1.0, MARTENS, NOISE)
    assert update.rho == -math.inf and update.verdict == "shrink"


def test_damping_is_clipped_to_its_bounds():
    rule = RhoRule(damping_min=1.0, damping_max=10.0)
    assert adapt_damping(1.0, 0.0, 9.0, rule).damping == 10.0
    assert adapt_damping(1.0, 1.0, 1.2, rule).damping == 1.0


def test_the_rule_is_pure():
    """Same inputs, same output; every verdict is one of VERDICTS; the rule is a frozen record."""
    cases = [(p, a, n) for p in (1.0, 1e-14, 0.0, -1.0) for a in (0.9, 0.5, 0.1, -1e-13, math.nan) for n in (None, NOISE)]
    first = [repr(adapt_damping(p, a, 4.0, MARTENS, n)) for p, a, n in cases]
    again = [repr(adapt_damping(p, a, 4.0, MARTENS, n)) for p, a, n in cases]
    assert first == again
    assert {adapt_damping(p, a, 4.0, MARTENS, n).verdict for p, a, n in cases} == set(VERDICTS)
    with pytest.raises(AttributeError):
        MARTENS.increase = 2.0


# --- the trust radius from the Taylor ratio ---------------------------------------------------

NW = RadiusRule()  # Nocedal & Wright Alg. 4.1: 1/4, 3/4, x1/4, x2, Delta_max 1e3


@pytest.mark.parametrize("rho,step,boundary,radius,verdict", [
    (0.9, 2.0, True, 4.0, "grow"),          # good ratio at the boundary: Delta doubles
    (0.9, 0.5, False, 2.0, "keep"),         # good ratio inside: no reason to grow
    (0.5, 2.0, True, 2.0, "keep"),          # between the thresholds
    (0.25, 2.0, True, 2.0, "keep"),         # the thresholds themselves keep Delta
    (0.75, 2.0, True, 2.0, "keep"),
    (0.1, 2.0, True, 0.5, "shrink"),        # poor ratio: a quarter of the step tried
    (0.1, 0.4, False, 0.1, "shrink"),       # after an interior step: a quarter of that step, not of Delta
    (-3.0, 2.0, True, 0.5, "shrink"),       # the loss rose
    (-math.inf, 0.0, False, 0.5, "shrink"), # nothing tried (no descent direction): a quarter of Delta
    (math.nan, 2.0, True, 0.5, "shrink"),   # an unmeasurable ratio counts as poor
], ids=["grow", "inside", "between", "at-low", "at-high", "shrink", "shrink-interior", "rose", "no-step", "nan"])
def test_radius_cases(rho, step, boundary, radius, verdict):
    assert adapt_radius(rho, 2.0, step, boundary, NW) == (radius, verdict)


def test_radius_is_capped_and_the_rule_is_pure():
    assert adapt_radius(0.9, 800.0, 800.0, True, NW) == (1e3, "grow")
    assert adapt_radius(0.9, 1.0, 1.0, True, RadiusRule(grow=3.0, radius_max=10.0)) == (3.0, "grow")
    cases = [(r, s, b) for r in (0.9, 0.5, 0.1, math.nan) for s in (0.0, 0.5, 2.0) for b in (True, False)]
    assert [adapt_radius(r, 2.0, s, b, NW) for r, s, b in cases] == [adapt_radius(r, 2.0, s, b, NW) for r, s, b in cases]
    with pytest.raises(AttributeError):
        NW.grow = 4.0


# --- backtracking ------------------------------------------------------------------------------

def test_backtracking_accepts_the_first_good_length():
    tried = []

    def trial(alpha, j):
        tried.append((alpha, j))
        return j == 3, f"trial {j}"

    search = backtracking(trial, 1.0, 0.8, 60)
    assert search == LineSearch(True, 1.0 * 0.8 * 0.8 * 0.8, 3, "trial 3")
    assert [j for _, j in tried] == [0, 1, 2, 3]
    assert tried[0][0] == 1.0


def test_backtracking_gives_up_after_max_backtracks():
    search = backtracking(lambda a, j: (False, a), 0.5, 0.5, 2)
    assert search == LineSearch(False, 0.125, 2, 0.125)
    once = backtracking(lambda a, j: (False, j), 1.0, 0.8, 0)
    assert once == LineSearch(False, 1.0, 0, 0)


# --- the shared prologue and zero-gradient exit ------------------------------------------------

def test_both_newton_type_solvers_build_on_the_base():
    assert issubclass(NewtonKrylov, NewtonCG) and issubclass(HessianFree, NewtonCG)
    model = mlp([2, 3, 1], "tanh", "half_mse")
    for name in ("newton_krylov", "hessian_free"):
        with pytest.raises(ValueError, match="rho_low"):
            make_solver(name, model, rho_low=0.8, rho_high=0.5)


@pytest.mark.parametrize("name", ["newton_krylov", "hessian_free"])
@twinned
def test_a_zero_gradient_ends_the_step(xp, name):
    """All parameters 0 and targets 0: prediction 0, gradient exactly 0 (weight decay included)."""
    model = mlp([2, 3, 1], "tanh", "half_mse", weight_decay=1e-3)
    rng = numpy.random.default_rng(0)
    x, y = xp.asarray(rng.standard_normal((8, 2))), xp.zeros((8, 1))
    solver = make_solver(name, model)
    params = [p * 0 for p in model.init(seed=1, xp=xp)]
    state = solver.init(params)
    params, state, info = solver.step(params, state, x, y)
    assert info["grad_norm"] == 0.0 and info["cg_exit"] == -1 and info["n_hvp"] == 0 and info["cg_iters"] == 0
    assert info["accepted"] == 0 and info["alpha"] == 0.0 and math.isnan(info["rho"])
    assert info["n_grad_passes"] == 1.0 and state["k"] == 1
    assert not numpy.asarray(to_host(model.flatten(params))).any()
    # the same info entries as a step that runs CG
    params = model.init(seed=1, xp=xp)
    _, _, full = solver.step(params, solver.init(params), x, y + 1)
    assert list(info) == list(full)
    return {"info": info, "full": full}


@pytest.mark.parametrize("name,advice", [("newton_krylov", "lower alpha"), ("hessian_free", "initial damping")])
def test_a_non_finite_loss_is_refused_with_advice(name, advice):
    model = mlp([2, 3, 1], "tanh", "half_mse")
    params = model.init(seed=1, xp=numpy)
    params[0][0, 0] = numpy.nan
    solver = make_solver(name, model)
    x, y = numpy.ones((4, 2)), numpy.zeros((4, 1))
    with pytest.raises(FloatingPointError, match=f"at iteration 0; .*{advice}"):
        solver.step(params, solver.init(params), x, y)
