"""solvers.hessian_action: the H_a update is exact on its direction (docs/kbfgs.md section 4.5).

Each body runs under the ``xp`` fixture and returns what it computed; on the CuPy half that must
agree with the NumPy run (``twinned``, tests/solvers/common.py)."""

import numpy
import pytest

from solvers.hessian_action import hessian_action_update, hessian_action_vector
from tests.solvers.common import twinned


def to_np(a):
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


@twinned
def test_exact_on_its_direction_and_converges_to_inverse(xp):
    rng = numpy.random.default_rng(0)
    N, d = 50, 6
    a = rng.random((N, d))
    at = numpy.hstack([a, numpy.ones((N, 1))])
    A = at.T @ at / N
    lam = 0.3
    shift = numpy.sqrt(lam)
    A_lm = A + shift * numpy.eye(d + 1)
    H = numpy.eye(d + 1)
    for it in range(200):
        a_bar = numpy.concatenate([rng.random(d), [1.0]])
        s_a = H @ a_bar
        H_new, skipped = hessian_action_update(xp.asarray(H), xp.asarray(A), shift, xp.asarray(a_bar))
        H_new = to_np(H_new)
        assert not bool(skipped)
        # secant condition: H+ (A + sqrt(lambda) I) s_a = s_a
        numpy.testing.assert_allclose(H_new @ (A_lm @ s_a), s_a, rtol=1e-9, atol=1e-12)
        H = H_new
    assert numpy.array_equal(H, H.T)
    # repeated updates along varied directions drive H_a towards (A + sqrt(lambda) I)^{-1}
    numpy.testing.assert_allclose(H, numpy.linalg.inv(A_lm), rtol=1e-3, atol=1e-3)
    return {"H": H}


@twinned
def test_variants_of_a_bar(xp):
    m = xp.asarray(numpy.array([0.2, 0.4, 0.9]))
    numpy.testing.assert_allclose(to_np(hessian_action_vector(m, "V2")), [0.2, 0.4, 0.9, 1.0])
    numpy.testing.assert_allclose(to_np(hessian_action_vector(m, "V1")), [0.2, 0.4, 0.9, 0.5])
    with pytest.raises(ValueError, match="Hessian-action variant"):
        hessian_action_vector(m, "V3")
    return {"V1": hessian_action_vector(m, "V1")}
