"""solvers.lbfgs: the compact L-BFGS operator equals the dense BFGS matrix from the same pairs."""

import numpy
import pytest

from solvers.lbfgs import CompactLBFGS
from tests.solvers.common import twin


def to_np(a):
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


def dense_bfgs(pairs, d, gamma):
    """H = gamma I updated by the textbook BFGS inverse formula with each pair in turn (float64)."""
    H = gamma * numpy.eye(d)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        E = numpy.eye(d) - rho * numpy.outer(s, y)
        H = E @ H @ E.T + rho * numpy.outer(s, s)
    return H


def random_pairs(rng, n, d):
    B = rng.standard_normal((d, d))
    B = B @ B.T / d + 0.3 * numpy.eye(d)
    pairs = []
    for _ in range(n):
        s = rng.standard_normal(d)
        pairs.append((s, B @ s + 0.05 * rng.standard_normal(d)))
    return [(s, y) for s, y in pairs if s @ y > 0]


@pytest.mark.parametrize("gamma", [1.0, 0.37])
def test_compact_equals_dense_bfgs_including_dropped_pairs(xp, gamma):
    rng = numpy.random.default_rng(0)
    d, memory = 9, 4
    pairs = random_pairs(rng, 11, d)
    op = CompactLBFGS.empty(d, memory, numpy.float64, xp, gamma=gamma)
    numpy.testing.assert_array_equal(to_np(op.dense()), gamma * numpy.eye(d))  # empty memory: gamma I
    for n, (s, y) in enumerate(pairs, 1):
        op.push(xp.asarray(s), xp.asarray(y))
        kept = pairs[max(0, n - memory):n]  # the oldest pairs are dropped
        assert op.count == len(kept)
        numpy.testing.assert_allclose(to_np(op.dense()), dense_bfgs(kept, d, gamma), rtol=1e-9, atol=1e-11)
    # in age order (the memory is a ring: the oldest pair's slot is ``head``), R^{-1} is the inverse of
    # the upper triangle of S Y^T, D its diagonal, and S, Y hold the last pairs
    age = op.age_order()
    assert age == [(len(pairs) - memory + j) % memory for j in range(memory)]
    S, Y = (numpy.array([p[i] for p in pairs[-memory:]]) for i in (0, 1))
    R = numpy.triu(S @ Y.T)
    numpy.testing.assert_array_equal(to_np(op.S)[age], S)
    numpy.testing.assert_allclose(to_np(op.Rinv)[numpy.ix_(age, age)], numpy.linalg.inv(R), rtol=1e-9, atol=1e-12)
    numpy.testing.assert_allclose(to_np(op.D)[age], numpy.diag(R), rtol=1e-12)
    # applied to a vector and to a d x k matrix (two GEMMs)
    H = dense_bfgs(pairs[-memory:], d, gamma)
    v = rng.standard_normal(d)
    X = rng.standard_normal((d, 5))
    numpy.testing.assert_allclose(to_np(op.apply(xp.asarray(v))), H @ v, rtol=1e-9, atol=1e-11)
    numpy.testing.assert_allclose(to_np(op(xp.asarray(X))), H @ X, rtol=1e-9, atol=1e-11)
    # secant condition for the newest pair
    s, y = pairs[-1]
    numpy.testing.assert_allclose(to_np(op.apply(xp.asarray(y))), s, rtol=1e-9, atol=1e-11)


def test_state_round_trip(xp):
    rng = numpy.random.default_rng(1)
    d = 6
    op = CompactLBFGS.empty(d, 3, numpy.float32, xp)
    for s, y in random_pairs(rng, 4, d):
        op.push(xp.asarray(s, dtype=numpy.float32), xp.asarray(y, dtype=numpy.float32))
    state = {k: (to_np(v).copy() if hasattr(v, "shape") else v) for k, v in op.to_state("layer0/lbfgs/").items()}
    back = CompactLBFGS.from_state({k: (xp.asarray(v) if hasattr(v, "shape") else v) for k, v in state.items()}, "layer0/lbfgs/")
    assert back.count == op.count == 3
    X = xp.asarray(rng.standard_normal((d, 2)).astype(numpy.float32))
    assert numpy.array_equal(to_np(back.apply(X)), to_np(op.apply(X)))


def test_bad_sizes():
    with pytest.raises(ValueError, match="memory >= 1"):
        CompactLBFGS.empty(5, 0, numpy.float64, numpy)


def masked_pushes(xp, dtype):
    """Pushes with a device-side store decision: skipped pairs change nothing, stored ones fill and
    then roll the memory (the path K-BFGS(L) takes, with no host sync on a device)."""
    rng = numpy.random.default_rng(2)
    d, memory = 7, 3
    pairs = random_pairs(rng, 12, d)
    decisions = [True, False, True, True, False, False, True, True, False, True, True, True][:len(pairs)]
    op = CompactLBFGS.empty(d, memory, dtype, xp, gamma=0.7)
    stored, record = [], []
    for (s, y), keep in zip(pairs, decisions):
        op.push(xp.asarray(s.astype(dtype)), xp.asarray(y.astype(dtype)), xp.asarray(keep))
        if keep:
            stored.append((s.astype(dtype).astype(numpy.float64), y.astype(dtype).astype(numpy.float64)))
        kept = stored[-memory:]
        assert int(to_np(op.count)) == len(kept)
        tol = 1e-9 if dtype == numpy.float64 else 2e-4
        numpy.testing.assert_allclose(to_np(op.dense()), dense_bfgs(kept, d, 0.7), rtol=tol, atol=tol)
        # the rows and columns of the empty slots stay zero (the products over them add zeros)
        m = len(kept)
        assert sorted(op.age_order()) == list(range(m)) or m == memory
        for name in ("S", "Y", "D"):
            assert not to_np(getattr(op, name))[m:].any(), name
        for name in ("Rinv", "YY"):
            F = to_np(getattr(op, name))
            assert not F[m:].any() and not F[:, m:].any(), name
        L, Rm = to_np(op.L), to_np(op.Rm)
        assert not L[:, m:memory].any() and not L[:, memory + m:].any()
        assert not Rm[m:memory].any() and not Rm[memory + m:].any()
        record.append({name: value.copy() for name, value in op.to_state("").items()})
    return record


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_push_with_a_device_side_decision(xp, dtype):
    twin(xp, masked_pushes, dtype)


def test_count_from_an_older_state_is_accepted(xp):
    """Run files written before the count moved to the device hold it as a Python int."""
    rng = numpy.random.default_rng(3)
    op = CompactLBFGS.empty(5, 2, numpy.float64, xp)
    for s, y in random_pairs(rng, 3, 5):
        op.push(xp.asarray(s), xp.asarray(y))
    state = op.to_state("p/")
    state["p/count"] = int(to_np(state["p/count"]))
    back = CompactLBFGS.from_state(state, "p/")
    assert type(back.count) is type(op.count) and int(to_np(back.count)) == 2
    assert numpy.array_equal(to_np(back.dense()), to_np(op.dense()))


def test_a_state_from_before_the_ring_is_rebuilt(xp):
    """Run files written before the ring hold no ``head`` and L, Rm packed to their leading 2 count
    columns/rows (the oldest pair in row 0): loading makes the ring with head 0 and rebuilds L and Rm."""
    rng = numpy.random.default_rng(4)
    d, memory = 6, 4
    pairs = random_pairs(rng, 3, d)
    op = CompactLBFGS.empty(d, memory, numpy.float64, xp)
    for s, y in pairs:
        op.push(xp.asarray(s), xp.asarray(y))
    state = op.to_state("p/")
    del state["p/head"]
    m = len(pairs)
    L, Rm = to_np(op.L), to_np(op.Rm)  # repack as the old layout did: [P^T (m), gamma Y^T (m), zeros]
    state["p/L"] = xp.asarray(numpy.concatenate([L[:, :m], L[:, memory:memory + m], numpy.zeros((d, 2 * memory - 2 * m))], axis=1))
    state["p/Rm"] = xp.asarray(numpy.concatenate([Rm[:m], Rm[memory:memory + m], numpy.zeros((2 * memory - 2 * m, d))]))
    back = CompactLBFGS.from_state(state, "p/")
    assert int(to_np(back.head)) == 0 and back.age_order() == list(range(m))
    numpy.testing.assert_allclose(to_np(back.L), L, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(to_np(back.Rm), Rm, rtol=1e-12, atol=1e-14)
    s, y = random_pairs(rng, 1, d)[0]
    back.push(xp.asarray(s), xp.asarray(y))
    numpy.testing.assert_allclose(to_np(back.dense()), dense_bfgs(pairs + [(s, y)], d, 1.0), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype,tol", [(numpy.float64, 1e-12), (numpy.float32, 1e-5)])
def test_the_rank_one_updates_of_P_do_not_drift(dtype, tol):
    """P = R^{-1} S is updated by a rank-one term per push, never recomputed: after hundreds of pushes
    through a small memory it still equals R^{-1} S, and H the dense BFGS matrix of the last pairs."""
    rng = numpy.random.default_rng(7)
    d, memory = 12, 5
    pairs = [(s.astype(dtype), y.astype(dtype)) for s, y in random_pairs(rng, 600, d)]
    op = CompactLBFGS.empty(d, memory, dtype, numpy)
    for s, y in pairs:
        op.push(s, y)
    P = op.Rinv.astype(float) @ op.S.astype(float)
    assert numpy.abs(op.L[:, :memory].T - P).max() <= tol * numpy.abs(P).max()
    H = dense_bfgs([(s.astype(float), y.astype(float)) for s, y in pairs[-memory:]], d, 1.0)
    assert numpy.abs(op.dense() - H).max() <= tol * numpy.abs(H).max()


@pytest.mark.parametrize("pushes", [0, 3, 8, 11])
def test_apply_over_the_filled_slots_equals_the_full_width_product(pushes):
    """On NumPy a memory that is not full applies only its filled slots (inner dimension 2 count):
    the same operator as gamma X + L (Rm X) over all slots (the empty ones add zeros), to rounding;
    empty (gamma X exactly), partly filled, full, and wrapped around."""
    rng = numpy.random.default_rng(3)
    d, memory, gamma = 12, 8, 0.7
    op = CompactLBFGS.empty(d, memory, numpy.float64, numpy, gamma=gamma)
    for s, y in random_pairs(rng, 40, d)[:pushes]:
        op.push(s, y)
    assert int(op.count) == min(pushes, memory)
    X = rng.standard_normal((d, 6))
    full = gamma * X + op.L @ (op.Rm @ X)
    numpy.testing.assert_allclose(op.apply(X), full, rtol=1e-12, atol=1e-14)
    if pushes == 0:
        numpy.testing.assert_array_equal(op.apply(X), gamma * X)
