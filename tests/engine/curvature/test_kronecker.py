"""engine.curvature.kronecker: statistics from per-example quantities, block operator vs np.kron."""

import numpy
import pytest

from engine.backend import to_host
from engine.curvature import KronFactors, KroneckerBlockOperator, factor_inverse, factor_inverses, homogeneous, kron_factors
from engine.curvature.kronecker import (block_product, ema_, ema_homogeneous_second_moment_, flush_subnormals_, row_means,
                                        secant_pair)
from nets import mlp
from tests.device_counts import device_work


def small_model(loss="softmax_xent"):
    return mlp([4, 5, 3], ["tanh", "linear"], loss, weight_decay=1e-3)


def batch(model, xp, n=7, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, model.input_shape[0]))
    d = model.output_shape[0]
    y = rng.integers(0, d, size=n) if model.loss_fn.classification else rng.random((n, d))
    return xp.asarray(x), xp.asarray(y)


def homogeneous_index(model, li):
    """Flat parameter index of each entry of vec([W | b]) (row-major), built from the layout alone."""
    layer = model.layers[li]
    pi = model.layer_param_index[li]
    off_w, off_b = model.offsets[pi], model.offsets[pi + 1]
    return numpy.array([off_w + r * layer.d_in + c if c < layer.d_in else off_b + r
                        for r in range(layer.d_out) for c in range(layer.d_in + 1)])


def dense_kron(model, blocks):
    """The n x n matrix with blocks L (x) R^T on row-major vec([W|b]), identity elsewhere."""
    D = numpy.eye(model.n_params)
    for li, (left, right) in blocks.items():
        idx = homogeneous_index(model, li)
        D[numpy.ix_(idx, idx)] = numpy.kron(to_host(left), to_host(right).T)
    return D


def random_spd(rng, d, shift=0.5):
    q = rng.standard_normal((d, d))
    return q @ q.T / d + shift * numpy.eye(d)


@pytest.mark.parametrize("loss", ["softmax_xent", "half_mse", "sigmoid_xent"])
def test_statistics_match_per_example_definitions(xp, loss):
    model = small_model(loss)
    params = model.init(seed=2, xp=xp)
    x, y = batch(model, xp)
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    factors = kron_factors(caps)
    assert [f.layer for f in factors] == model.kron_layers
    n = x.shape[0]
    for f, c in zip(factors, caps):
        a, z, g = to_host(c.a), to_host(c.z), to_host(c.g)
        at = numpy.concatenate([a, numpy.ones((n, 1))], axis=1)
        A = sum(numpy.outer(at[i], at[i]) for i in range(n)) / n
        G = sum(numpy.outer(g[i], g[i]) for i in range(n)) / n
        numpy.testing.assert_allclose(to_host(f.A), A, rtol=1e-14, atol=1e-15)
        numpy.testing.assert_allclose(to_host(f.G), G, rtol=1e-14, atol=1e-16)
        numpy.testing.assert_allclose(to_host(f.a_mean), at.mean(axis=0), rtol=1e-14, atol=1e-16)
        assert float(to_host(f.a_mean)[-1]) == 1.0
        numpy.testing.assert_allclose(to_host(f.z_mean), z.mean(axis=0), rtol=1e-14, atol=1e-16)
        numpy.testing.assert_allclose(to_host(f.g_mean), g.mean(axis=0), rtol=1e-14, atol=1e-16)
        # g is the per-example gradient: the bias gradient of the one-example loss l_n.
        for i in range(n):
            _, gi = model.loss_and_grad(params, x[i:i + 1], y[i:i + 1], regularized=False)
            numpy.testing.assert_allclose(g[i], to_host(gi[c.param_index + 1]), rtol=1e-13, atol=1e-15)


def test_homogeneous_and_partial_statistics(xp):
    a = xp.asarray(numpy.arange(6.0).reshape(3, 2), dtype=xp.float32)
    h = homogeneous(a)
    assert h.dtype == xp.float32 and type(h) is type(a)
    numpy.testing.assert_array_equal(to_host(h), [[0, 1, 1], [2, 3, 1], [4, 5, 1]])
    model = small_model()
    params = model.init(seed=0, xp=xp)
    x, y = batch(model, xp)
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    only_g = kron_factors(caps, which=("G",))
    assert all(f.A is None and f.a_mean is None and f.z_mean is None and f.G is not None for f in only_g)
    only_means = kron_factors(caps, which="means")
    assert all(f.A is None and f.G is None and f.g_mean is not None for f in only_means)
    with pytest.raises(ValueError, match="unknown statistic"):
        kron_factors(caps, which=("B",))


def random_blocks(model, xp, rng, spd=True):
    blocks = {}
    for li in model.kron_layers:
        layer = model.layers[li]
        if spd:
            left, right = random_spd(rng, layer.d_out), random_spd(rng, layer.d_in + 1)
        else:
            left = rng.standard_normal((layer.d_out, layer.d_out)) + 3 * numpy.eye(layer.d_out)
            right = rng.standard_normal((layer.d_in + 1,) * 2) + 3 * numpy.eye(layer.d_in + 1)
        blocks[li] = (xp.asarray(left), xp.asarray(right))
    return blocks


@pytest.mark.parametrize("spd", [True, False], ids=["spd", "general"])
def test_block_operator_matches_dense_kronecker(xp, spd):
    model = small_model()
    rng = numpy.random.default_rng(3)
    blocks = random_blocks(model, xp, rng, spd)
    op = KroneckerBlockOperator(model, blocks)
    D = dense_kron(model, blocks)
    v = rng.standard_normal(model.n_params)
    hv = to_host(op.matvec(xp.asarray(v)))
    numpy.testing.assert_allclose(hv, D @ v, rtol=1e-13, atol=1e-13 * numpy.abs(D @ v).max())
    numpy.testing.assert_allclose(to_host(op.rmatvec(xp.asarray(v))), D.T @ v, rtol=1e-13, atol=1e-13 * numpy.abs(D.T @ v).max())
    numpy.testing.assert_allclose(to_host(op.dense()), D, rtol=1e-13, atol=1e-14)
    V = rng.standard_normal((model.n_params, 3))
    numpy.testing.assert_allclose(to_host(op.matmat(xp.asarray(V))), D @ V, rtol=1e-12, atol=1e-13)
    # the parameter-list form is the same map
    as_list = op.apply_to_params(model.unflatten(xp.asarray(v)))
    numpy.testing.assert_allclose(to_host(model.flatten(as_list)), hv, rtol=0, atol=0)
    # inverse application against numpy.linalg.solve on the dense matrix
    ref = numpy.linalg.solve(D, v)
    sol = to_host(op.solve(xp.asarray(v)))
    assert numpy.linalg.norm(sol - ref) <= 1e-12 * numpy.linalg.norm(ref)
    sol_list = op.solve_params(model.unflatten(xp.asarray(v)))
    numpy.testing.assert_allclose(to_host(model.flatten(sol_list)), sol, rtol=0, atol=0)
    assert op.symmetric == spd
    if xp is numpy:  # the scipy export carries the transpose product of non-symmetric blocks
        lin = op.to_scipy()
        numpy.testing.assert_allclose(lin.rmatvec(v), D.T @ v, rtol=1e-13, atol=1e-13 * numpy.abs(D.T @ v).max())
        numpy.testing.assert_allclose(lin @ v, D @ v, rtol=1e-13, atol=1e-13 * numpy.abs(D @ v).max())


def test_kfac_damping_and_inverse_factor_form(xp):
    """K-FAC: (G + d I) (x) (A + d I); K-BFGS: blocks given by inverse factors (H_g, H_a)."""
    model = small_model()
    params = model.init(seed=4, xp=xp)
    x, y = batch(model, xp, n=9)
    _, _, caps = model.loss_and_grad(params, x, y, regularized=False, capture=True)
    factors = kron_factors(caps, which=("A", "G"))
    d = 0.3
    kfac = KroneckerBlockOperator.from_kron_factors(model, factors, damping=d)
    damped = {f.layer: (to_host(f.G) + d * numpy.eye(f.G.shape[0]), to_host(f.A) + d * numpy.eye(f.A.shape[0])) for f in factors}
    D = dense_kron(model, damped)
    rng = numpy.random.default_rng(5)
    v = rng.standard_normal(model.n_params)
    numpy.testing.assert_allclose(to_host(kfac.matvec(xp.asarray(v))), D @ v, rtol=1e-12, atol=1e-14)
    ref = numpy.linalg.solve(D, v)
    assert numpy.linalg.norm(to_host(kfac.solve(xp.asarray(v))) - ref) <= 1e-12 * numpy.linalg.norm(ref)

    inv_blocks = {li: (numpy.linalg.inv(l), numpy.linalg.inv(r)) for li, (l, r) in damped.items()}
    kbfgs = KroneckerBlockOperator.from_inverse_factors(model, {li: (xp.asarray(l), xp.asarray(r)) for li, (l, r) in inv_blocks.items()})
    Hinv = dense_kron(model, inv_blocks)  # H_g (x) H_a^T: what solve applies
    numpy.testing.assert_allclose(to_host(kbfgs.solve(xp.asarray(v))), Hinv @ v, rtol=1e-12, atol=1e-14)
    hv = to_host(kbfgs.matvec(xp.asarray(v)))
    ref = numpy.linalg.solve(Hinv, v)
    assert numpy.linalg.norm(hv - ref) <= 1e-11 * numpy.linalg.norm(ref)
    assert numpy.linalg.norm(hv - D @ v) <= 1e-11 * numpy.linalg.norm(D @ v)
    with pytest.raises(ValueError, match="damping"):
        KroneckerBlockOperator(model, inv_blocks, damping=0.1, inverse=True)


def test_missing_blocks_and_bad_shapes(xp):
    model = small_model()
    rng = numpy.random.default_rng(6)
    blocks = random_blocks(model, xp, rng)
    first = model.kron_layers[-1]  # Dense(5, 3): factors 3 x 3 and 6 x 6
    partial = [(first, *blocks[first])]
    with pytest.raises(ValueError, match="no block"):
        KroneckerBlockOperator(model, partial)
    op = KroneckerBlockOperator(model, partial, missing="identity")
    D = dense_kron(model, {first: blocks[first]})
    v = rng.standard_normal(model.n_params)
    numpy.testing.assert_allclose(to_host(op.matvec(xp.asarray(v))), D @ v, rtol=1e-13, atol=1e-14)
    numpy.testing.assert_allclose(to_host(op.solve(xp.asarray(v))), numpy.linalg.solve(D, v), rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="shapes"):
        KroneckerBlockOperator(model, {first: (blocks[first][1], blocks[first][0])}, missing="identity")
    with pytest.raises(ValueError, match="no Kronecker view"):
        KroneckerBlockOperator(model, {1: blocks[first]}, missing="identity")
    with pytest.raises(ValueError, match="shape"):
        op.matvec(xp.zeros(model.n_params + 1))
    assert isinstance(KronFactors(0, 0), KronFactors)


def test_singular_factor_is_reported(xp):
    model = small_model()
    rng = numpy.random.default_rng(7)
    blocks = random_blocks(model, xp, rng)
    li = model.kron_layers[0]
    left = numpy.zeros((model.layers[li].d_out,) * 2)
    left[0, 0] = 1.0
    blocks[li] = (xp.asarray(left), blocks[li][1])
    op = KroneckerBlockOperator(model, blocks)
    with pytest.raises(numpy.linalg.LinAlgError, match="singular; add damping"):
        op.solve(xp.zeros(model.n_params))


# --- factor inverses: failures recognised on both backends, one host sync ------------------------
def _rotated(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T, exactly symmetric, for a random orthogonal Q."""
    q, _ = numpy.linalg.qr(numpy.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    F = (q * numpy.asarray(eigenvalues, dtype=float)) @ q.T
    return (F + F.T) / 2


#: symmetric factors that are not positive definite but invertible: LU must invert them. The
#: last one fails Cholesky only at its last pivot (the partial factor is right but for one row).
INDEFINITE = {
    "indefinite": _rotated([3.0, -1.0, 2.0, 0.5]),
    "swap": numpy.array([[0.0, 1.0], [1.0, 0.0]]),
    "last_pivot": numpy.array([[4.0, 2.0, 2.0], [2.0, 5.0, 3.0], [2.0, 3.0, 1.0]]),
}
#: singular factors (exactly: every elimination hits an exact zero pivot)
SINGULAR = {
    "psd_rank_2": numpy.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]),
    "indefinite_rank_2": numpy.diag([1.0, -1.0, 0.0]),
    "psd_rank_1": numpy.diag([1.0, 0.0, 0.0, 0.0, 0.0]),
}


def _inverse_on(m, F):
    return to_host(factor_inverse(m.asarray(F), "left factor of layer 0"))


@pytest.mark.parametrize("name", sorted(INDEFINITE))
def test_indefinite_factor_is_inverted_by_lu(xp, name):
    """CuPy's cholesky does not raise on these: its partial factor must not be taken for the
    factor (it gave a finite, wrong inverse); the LU inverse is the inverse, as on NumPy."""
    F = INDEFINITE[name]
    inv = _inverse_on(xp, F)
    ref = numpy.linalg.inv(F)
    assert numpy.linalg.norm(inv - ref) <= 1e-14 * numpy.linalg.norm(ref)
    numpy.testing.assert_allclose(inv, _inverse_on(numpy, F), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SINGULAR))
def test_singular_factor_raises_on_both_backends(xp, name):
    with pytest.raises(numpy.linalg.LinAlgError, match="left factor of layer 0 is singular; add damping"):
        _inverse_on(xp, SINGULAR[name])


def test_bad_factors_raise_clear_errors(xp):
    with pytest.raises(numpy.linalg.LinAlgError, match="is zero and has no inverse; add damping"):
        factor_inverse(xp.zeros((3, 3)), "G")
    bad = numpy.eye(3)
    bad[1, 2] = numpy.nan
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        factor_inverse(xp.asarray(bad), "G")
    bad[1, 2] = numpy.inf
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        factor_inverse(xp.asarray(bad), "G")
    with pytest.raises(ValueError, match="square"):
        factor_inverse(xp.zeros((2, 3)), "G")


@pytest.mark.parametrize("name", ["indefinite", "last_pivot"])
def test_a_plausible_wrong_cholesky_factor_is_rejected(xp, monkeypatch, name):
    """Whatever a failed potrf leaves (here: the untouched lower triangle, finite with a positive
    diagonal, as no library raising would signal), the residual check rejects it and LU inverts."""
    F = INDEFINITE[name]
    monkeypatch.setattr(xp.linalg, "cholesky", lambda a: xp.tril(a))
    inv = _inverse_on(xp, F)
    ref = numpy.linalg.inv(F)
    assert numpy.linalg.norm(inv - ref) <= 1e-14 * numpy.linalg.norm(ref)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_spd_factor_inverse_is_symmetric_and_matches_numpy(xp, dtype):
    rng = numpy.random.default_rng(8)
    F = random_spd(rng, 6, shift=1e-3).astype(dtype)  # condition number ~1e3
    inv = _inverse_on(xp, F)
    assert inv.dtype == dtype
    numpy.testing.assert_array_equal(inv, inv.T)
    ref = numpy.linalg.inv(F.astype(numpy.float64))
    eps = numpy.finfo(dtype).eps
    assert numpy.linalg.norm(inv - ref) <= 1e4 * eps * numpy.linalg.norm(ref)
    # NumPy inverts by LAPACK potrf + potri, the device by inv(L)^T inv(L): both backward stable,
    # so they agree to the conditioning (~1e3) times eps, norm-wise, not entry by entry
    assert numpy.linalg.norm(inv - _inverse_on(numpy, F)) <= 1e4 * eps * numpy.linalg.norm(ref)


def test_factor_inverse_syncs_once(xp):
    """One host sync for a symmetric positive definite factor (all checks read as one device
    integer; it was three), two for LU, and one for all the factors of an operator."""
    rng = numpy.random.default_rng(9)
    spd = xp.asarray(random_spd(rng, 5))
    with device_work(xp) as work:
        factor_inverse(spd)
    assert work.n_syncs == 1, str(work)
    with device_work(xp) as work:
        factor_inverse(xp.asarray(INDEFINITE["indefinite"]))
    assert work.n_syncs == 2, str(work)
    with device_work(xp) as work:
        invs = factor_inverses([spd, 2 * spd, 3 * spd])
    assert work.n_syncs == 1 and len(invs) == 3, str(work)
    model = small_model()
    op = KroneckerBlockOperator(model, random_blocks(model, xp, rng))
    v = xp.asarray(rng.standard_normal(model.n_params))
    with device_work(xp) as work:
        op.solve(v)  # inverts the four factors of the two layers
    assert work.n_syncs == 1, str(work)
    with device_work(xp) as work:
        op.solve(v), op.matvec(v)
        assert op.symmetric
    assert work.n_syncs == 1, str(work)  # the symmetry flag of all the factors, read once


class _LeftOperator:
    """A linear operator standing in for a left inverse factor (as K-BFGS(L)'s L-BFGS H_g)."""

    def __init__(self, H):
        self.H = H
        self.shape, self.dtype = H.shape, H.dtype
        self.applied = 0

    def apply(self, X):
        self.applied += 1
        return self.H @ X

    def dense(self):
        return self.H.copy()


def test_block_orders_operator_factors_and_solve_blocks(xp):
    """``order`` fixes the floating-point order of every block product, a left inverse factor may
    be an operator, and ``solve_blocks`` yields exactly the matrices ``solve_params`` splits."""
    model = small_model()
    rng = numpy.random.default_rng(11)
    blocks = random_blocks(model, xp, rng, spd=True)
    m = model.unflatten(xp.asarray(rng.standard_normal(model.n_params)))
    for order in ("left_first", "right_first"):
        op = KroneckerBlockOperator.from_inverse_factors(model, blocks, order=order)
        got = dict(op.solve_blocks(m))
        assert list(got) == list(blocks)
        for li, (left, right) in blocks.items():
            M = model.layers[li].to_matrix(model.layer_params(m, li))
            want = (left @ M) @ right if order == "left_first" else left @ (M @ right)
            assert numpy.array_equal(to_host(got[li]), to_host(want))
            assert numpy.array_equal(to_host(block_product(left, M, right, order)), to_host(want))
        flat = to_host(model.flatten(op.solve_params(m)))
        assert numpy.array_equal(flat, to_host(op.solve(model.flatten(m))))
        # an operator on the left: the same products, and the dense factor where an inverse is needed
        lops = {li: (_LeftOperator(left), right) for li, (left, right) in blocks.items()}
        op2 = KroneckerBlockOperator.from_inverse_factors(model, lops, order=order)
        assert numpy.array_equal(to_host(op2.solve(model.flatten(m))), flat)
        assert all(lo.applied == 1 for lo, _ in lops.values())
        v = xp.asarray(rng.standard_normal(model.n_params))
        numpy.testing.assert_allclose(to_host(op2.matvec(v)), to_host(op.matvec(v)), rtol=1e-13, atol=1e-15)
        numpy.testing.assert_allclose(to_host(op2.rmatvec(v)), to_host(op.rmatvec(v)), rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="order must be one of"):
        KroneckerBlockOperator.from_inverse_factors(model, blocks, order="middle")
    with pytest.raises(TypeError, match="linear-operator factor is an inverse factor"):
        KroneckerBlockOperator(model, {li: (_LeftOperator(l), r) for li, (l, r) in blocks.items()})


def test_factor_emas_and_the_secant_pair(xp):
    """The fused EMA of A equals the EMA of kron_factors' A; row_means of unscaled rows equal the
    per-example means; the secant pair is old minus new (Dense: no scaling)."""
    model = small_model("half_mse")
    params = model.init(seed=6, xp=xp)
    x, y = batch(model, xp, n=9)
    _, _, caps = model.loss_and_grad(params, x, y, regularized=False, capture=True)
    f = kron_factors(caps)[0]
    A0 = xp.asarray(random_spd(numpy.random.default_rng(1), f.A.shape[0]))
    A = ema_homogeneous_second_moment_(A0.copy(), caps[0].a, 0.9)
    numpy.testing.assert_allclose(to_host(A), to_host(ema_(A0.copy(), f.A, 0.9)), rtol=1e-14, atol=1e-15)
    assert numpy.array_equal(to_host(A), to_host(A).T)
    fwd = model.forward_pass(params, x, kron_outputs=True)
    _, dout = model.loss_fn.value_and_grad(fwd.out, y)
    raw = model.backward(params, fwd, dout, param_grads=False, capture=True, per_example=False).captures
    for c, ref in zip(raw, kron_factors(caps, which="means")):
        z_mean, g_mean = row_means(c, 9)
        numpy.testing.assert_allclose(to_host(z_mean), to_host(ref.z_mean), rtol=1e-14, atol=1e-16)
        numpy.testing.assert_allclose(to_host(g_mean), to_host(ref.g_mean), rtol=1e-13, atol=1e-16)
        s, yv, g_ref = secant_pair(model.layers[c.layer], ref, 0 * z_mean, 0 * g_mean, 9, 9)
        assert numpy.array_equal(to_host(s), to_host(ref.z_mean)) and numpy.array_equal(to_host(yv), to_host(ref.g_mean))
        assert g_ref is ref.g_mean
    tiny = numpy.finfo(numpy.float64).tiny
    assert to_host(flush_subnormals_(xp.asarray([tiny / 4, tiny, -tiny / 2, 1.0]))).tolist() == [0.0, tiny, 0.0, 1.0]
