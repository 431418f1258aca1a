"""engine/parallel.py: the shards, the weighted global means, the sharded generator and KAISA's
greedy assignment. Two ranks are simulated in-process by two threads sharing a summing
communicator; the reference is the single-process computation on the whole batch."""

from __future__ import annotations

import itertools
import threading

import numpy
import pytest

from engine import curvature
from engine.backend import to_host
from engine.communicator import Communicator
from engine.curvature.kronecker import kron_factors
from engine.parallel import DataParallel, ShardedGenerator, assign_layers, shard_rows
from nets.mlp import mlp


class ThreadPair(Communicator):
    """Rank ``rank`` of a 2-rank world of threads: allreduce sums through a shared slot."""

    size = 2

    def __init__(self, rank, shared, barrier):
        super().__init__()
        self.rank, self.shared, self.barrier_ = rank, shared, barrier

    def allreduce(self, a):
        self.shared[self.rank] = a.copy()
        self.barrier_.wait()
        total = self.shared[0] + self.shared[1]
        self.barrier_.wait()
        a[...] = total
        self._count(a.nbytes)
        return a


def on_two_ranks(body):
    """[body(rank, DataParallel) for rank 0, 1], run concurrently."""
    shared, barrier, out = {}, threading.Barrier(2), [None, None]
    errors = []

    def run(rank):
        try:
            out[rank] = body(rank, DataParallel(ThreadPair(rank, shared, barrier)))
        except Exception as exc:  # pragma: no cover (reported below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("n, size", [(10, 2), (15, 2), (7, 3), (8, 8)])
def test_shards_cover_the_batch_in_order(n, size):
    rows = [shard_rows(n, r, size) for r in range(size)]
    assert rows[0][0] == 0 and rows[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert max(hi - lo for lo, hi in rows) - min(hi - lo for lo, hi in rows) <= 1


def test_a_batch_smaller_than_the_world_is_refused():
    dp = DataParallel(ThreadPair(0, {}, None))
    with pytest.raises(ValueError, match="at least 2"):
        dp.shard(1)


def test_single_process_returns_its_input_untouched(xp):
    dp = DataParallel()
    a = [xp.ones(3), None]
    assert dp.mean(a) is a and dp.mean_tree({"x": a}) == {"x": a}
    rng = numpy.random.default_rng(0)
    assert dp.generator(rng) is rng


@pytest.mark.parametrize("n", [12, 11])
def test_two_shards_give_the_global_loss_gradient_and_factors(xp, n):
    """Loss, gradient (model) and A, G, batch means (kron_factors + mean_fields) of the 2 shards,
    reduced, equal the whole batch's to rounding, for even and uneven shards."""
    model = mlp([5, 4, 3], "tanh", "half_mse", weight_decay=0.1)
    params = model.init(seed=1, dtype=numpy.float64, xp=xp)
    rng = numpy.random.default_rng(3)
    x, y = xp.asarray(rng.standard_normal((n, 5))), xp.asarray(rng.standard_normal((n, 3)))

    def stats(model, x, y):
        loss, grads, caps = model.loss_and_grad(params, x, y, capture=True)
        return loss, grads, kron_factors(caps)

    want = stats(model, x, y)

    def body(rank, dp):
        m = mlp([5, 4, 3], "tanh", "half_mse", weight_decay=0.1)
        m.parallel = dp
        rows = dp.shard(n)
        loss, grads, factors = stats(m, x[rows], y[rows])
        dp.mean_fields(factors, ("A", "G", "a_mean", "z_mean", "g_mean"))
        return loss, grads, factors

    for loss, grads, factors in on_two_ranks(body):
        assert abs(float(to_host(loss)) - float(to_host(want[0]))) < 1e-13 * abs(float(to_host(want[0])))
        for g, w in zip(grads, want[1]):
            numpy.testing.assert_allclose(to_host(g), to_host(w), rtol=1e-12, atol=1e-14)
        for f, w in zip(factors, want[2]):
            for name in ("A", "G", "a_mean", "z_mean", "g_mean"):
                numpy.testing.assert_allclose(to_host(getattr(f, name)), to_host(getattr(w, name)), rtol=1e-12, atol=1e-14,
                                              err_msg=name)


def test_mean_tree_keeps_the_structure():
    def body(rank, dp):
        dp.shard(4)
        return dp.mean_tree((numpy.float64(rank), {"a": (numpy.full(2, rank + 1.0), numpy.ones((1, 1)))}))

    for value, rest in on_two_ranks(body):
        assert float(value) == 0.5
        numpy.testing.assert_array_equal(rest["a"][0], [1.5, 1.5])
        assert rest["a"][1].shape == (1, 1) and float(rest["a"][1][0, 0]) == 1.0


def test_sharded_generator_draws_the_global_batch():
    full = numpy.random.default_rng(7)
    want_u, want_z = full.random((10, 3)), full.standard_normal((10, 2))
    parts = []
    for lo, hi in ((0, 4), (4, 10)):
        rng = numpy.random.default_rng(7)
        g = ShardedGenerator(rng, lo, hi, 10)
        parts.append((g.random((hi - lo, 3)), g.standard_normal((hi - lo, 2)), rng.bit_generator.state))
    numpy.testing.assert_array_equal(numpy.concatenate([p[0] for p in parts]), want_u)
    numpy.testing.assert_array_equal(numpy.concatenate([p[1] for p in parts]), want_z)
    assert parts[0][2] == parts[1][2] == full.bit_generator.state  # every rank's generator advances alike
    with pytest.raises(ValueError, match="per row"):
        ShardedGenerator(numpy.random.default_rng(0), 0, 4, 10).random((5,))


@pytest.mark.parametrize("costs, size", [({0: 5.0, 1: 4.0, 2: 3.0, 3: 3.0, 4: 1.0}, 2), ({0: 1.0, 1: 1.0}, 4),
                                         ({k: float(k * k % 7 + 1) for k in range(7)}, 3)])
def test_greedy_assignment_is_the_longest_processing_time_rule(costs, size):
    owner = assign_layers(costs, size)
    assert set(owner) == set(costs) and set(owner.values()) <= set(range(size))
    # the slow obvious re-implementation: layers by decreasing cost, each to the least-loaded rank
    load = [0.0] * size
    for layer in sorted(costs, key=lambda k: (-costs[k], k)):
        r = int(numpy.argmin(load))
        assert owner[layer] == r
        load[r] += costs[layer]
    # LPT's bound: the makespan is within 4/3 of the best assignment (brute force on these sizes)
    makespan = max(load)
    exhaustive = min(max(sum(c for c, r in zip(costs.values(), a) if r == q) for q in range(size))
                     for a in itertools.product(range(size), repeat=len(costs)))
    assert makespan <= 4 / 3 * exhaustive + 1e-12


@pytest.mark.parametrize("operator", ["HessianCS", "HessianRop", "GaussNewton"])
def test_two_shards_give_the_global_curvature_products(operator):
    """A Newton-Krylov / Hessian-free curvature product on two shards, summed over the ranks where
    it is formed, equals the whole batch's (and so does the operator's gradient)."""
    cls = getattr(curvature, operator)
    n = 9
    model = mlp([4, 5, 2], "tanh", "softmax_xent", weight_decay=0.01)
    params = model.init(seed=2, dtype=numpy.float64, xp=numpy)
    rng = numpy.random.default_rng(1)
    x, y = rng.standard_normal((n, 4)), rng.integers(0, 2, n)
    v = rng.standard_normal(model.n_params)
    full = cls(model, params, x, y)
    want_hv, want_g = full.matvec(v), full.gradient()

    def body(rank, dp):
        m = mlp([4, 5, 2], "tanh", "softmax_xent", weight_decay=0.01)
        m.parallel = dp
        rows = dp.shard(n)
        op = cls(m, params, x[rows], y[rows])
        return op.matvec(v), op.gradient()

    for hv, g in on_two_ranks(body):
        numpy.testing.assert_allclose(hv, want_hv, rtol=1e-10, atol=1e-13)
        numpy.testing.assert_allclose(g, want_g, rtol=1e-12, atol=1e-14)
