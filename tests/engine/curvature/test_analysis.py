"""engine.curvature.analysis and engine.curvature.spectral: Lanczos, stochastic Lanczos quadrature,
Hutchinson / Hutch++ trace and diagonal estimators, per-layer blocks and Rayleigh quotients, each
checked against a dense float64 reference on a tiny model (NumPy and CuPy halves; the CuPy half is
also compared with the NumPy run of the same call)."""

import numpy
import pytest
import scipy.sparse.linalg

from engine.backend import to_host
from engine.curvature import (BlockRestriction, CurvatureOperator, EmpiricalFisher, Fisher, GaussNewton, HessianCS,
                              HessianFD, HessianRop, KroneckerBlockOperator, gaussian_density, hutchinson_diagonal,
                              hutchinson_trace, hutchpp_trace, kron_factors, lanczos, lanczos_quadrature, layer_blocks,
                              rayleigh_quotients, restrict, slq_density)
from engine.curvature.analysis import rademacher_rows
from engine.curvature.spectral import _lanczos_steps
from nets import mlp
from tests.device_counts import device_work

from .common import batch, setup

OPERATORS = {"hessian_cs": HessianCS, "gauss_newton": GaussNewton}


class MatrixOperator(CurvatureOperator):
    """A dense symmetric matrix as a curvature operator (for spectra chosen by the test)."""

    def __init__(self, A, xp):
        super().__init__(A.shape[0], A.dtype, xp)
        self.A = xp.asarray(A)

    def _matvec(self, v):
        return self.A @ v


def decaying_matrix(n=200, power=2.0, seed=0):
    """U diag(i^-power) U^T with a random orthogonal U: a spectrum that decays like a Hessian's."""
    U, _ = numpy.linalg.qr(numpy.random.default_rng(seed).standard_normal((n, n)))
    return (U * numpy.arange(1, n + 1) ** -power) @ U.T


def tiny_operator(name, xp):
    """The 31-parameter tanh MLP of tests/engine/curvature/common.py (softmax cross-entropy)."""
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    return model, OPERATORS[name](model, params, x, y)


def mid_model(xp, seed=5):
    """A 6-12-8-4 tanh MLP, 224 parameters: big enough that n_iter < n matters."""
    model = mlp([6, 12, 8, 4], ["tanh", "tanh", "linear"], "softmax_xent", weight_decay=1e-3)
    params = model.init(seed=seed, xp=xp)
    x, y = batch(model, xp, n=16, seed=seed)
    return model, params, x, y


def kfac_operator(model, params, x, y, damping=1e-2):
    _, _, caps = model.loss_and_grad(params, x, y, capture=True)
    return KroneckerBlockOperator.from_kron_factors(model, kron_factors(caps, which=("A", "G")), damping=damping)


# --- Lanczos --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["LA", "SA", "both", "LM"])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_lanczos_matches_dense_eigh(xp, name, which):
    model, op = tiny_operator(name, xp)
    H = to_host(op.dense())
    lam, U = numpy.linalg.eigh(H)
    k, n = 5, model.n_params
    res = lanczos(op, k=k, which=which, n_iter=n, seed=1, return_vectors=True)
    if which == "LA":
        ref = lam[-k:]
    elif which == "SA":
        ref = lam[:k]
    elif which == "both":
        ref = numpy.concatenate([lam[:k], lam[-k:]])
    else:
        ref = numpy.sort(lam[numpy.argsort(numpy.abs(lam))[-k:]])
    assert numpy.abs(res.eigenvalues - ref).max() <= 1e-10 * numpy.abs(ref).min()  # 1e-10 relative, each
    Y = to_host(res.eigenvectors)
    assert Y.shape == (n, ref.size)
    assert numpy.abs(Y.T @ Y - numpy.eye(ref.size)).max() <= 1e-12
    assert numpy.abs(H @ Y - Y * res.eigenvalues).max() <= 1e-10 * numpy.abs(lam).max()
    assert res.residual_norms.max() <= 1e-10 * numpy.abs(lam).max() and res.n_products == n == res.n_iter
    if xp is not numpy:  # the CuPy half computes what the NumPy half does
        twin = lanczos(tiny_operator(name, numpy)[1], k=k, which=which, n_iter=n, seed=1)
        assert numpy.abs(res.eigenvalues - twin.eigenvalues).max() <= 1e-13 * numpy.abs(lam).max()


def test_lanczos_finds_a_repeated_eigenvalue_with_its_multiplicity(xp):
    """The Gauss-Newton matrix of the tiny MLP is rank 8 plus tau I: the eigenvalue tau = 1e-2 has
    multiplicity 23, reached only through breakdowns and restarts."""
    model, op = tiny_operator("gauss_newton", xp)
    lam = numpy.linalg.eigvalsh(to_host(op.dense()))
    res = lanczos(op, k=model.n_params, which="LA", n_iter=model.n_params)
    assert numpy.abs(res.eigenvalues - lam).max() <= 1e-13 * lam.max()
    assert numpy.sum(numpy.abs(res.eigenvalues - model.weight_decay) <= 1e-12) == numpy.sum(numpy.abs(lam - model.weight_decay) <= 1e-12) >= 20
    assert (res.beta == 0).sum() >= 10  # the breakdowns are exact restarts (T splits)


@pytest.mark.parametrize("case", ["identity", "zero", "repeated"])
def test_lanczos_survives_breakdown_at_every_step(xp, case):
    """Exact invariant subspaces: A q = q (w is exactly 0 at every step), A = 0, and eigenvalues of
    multiplicity 10, 10 and 5 among 40: all eigenvalues and orthonormal Ritz vectors."""
    rng = numpy.random.default_rng(0)
    U, _ = numpy.linalg.qr(rng.standard_normal((40, 40)))
    lam = numpy.sort(numpy.concatenate([[1.0] * 10, [2.0] * 10, [-3.0] * 5, rng.standard_normal(15)]))
    A = {"identity": numpy.eye(40), "zero": numpy.zeros((40, 40)), "repeated": (U * lam) @ U.T}[case]
    res = lanczos(MatrixOperator(A, xp), k=40, n_iter=40, return_vectors=True)
    Y = to_host(res.eigenvectors)
    assert numpy.abs(res.eigenvalues - numpy.linalg.eigvalsh(A)).max() <= 1e-13
    assert numpy.abs(Y.T @ Y - numpy.eye(40)).max() <= 1e-13 and numpy.abs(A @ Y - Y * res.eigenvalues).max() <= 1e-13


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lanczos_with_fewer_steps_matches_scipy_eigsh(xp, which):
    model, params, x, y = mid_model(xp)
    op = HessianCS(model, params, x, y)
    hmodel, hparams, hx, hy = mid_model(numpy)
    ref = scipy.sparse.linalg.eigsh(HessianCS(hmodel, hparams, hx, hy).to_scipy(), k=3, which=which, tol=1e-14,
                                    return_eigenvectors=False)
    res = lanczos(op, k=3, which=which, n_iter=80, seed=2)
    assert res.n_products == 80 < model.n_params
    assert numpy.abs(res.eigenvalues - numpy.sort(ref)).max() <= 1e-10 * numpy.abs(ref).min()


def test_lanczos_tolerance_stops_early_and_progress_follows_every_product(xp):
    model, params, x, y = mid_model(xp)
    op = HessianCS(model, params, x, y)
    calls = []
    res = lanczos(op, k=1, which="LA", n_iter=150, tol=1e-10, check_every=5, seed=3,
                  progress=lambda done, total: calls.append((done, total)))
    assert res.converged and res.n_iter < 150 and res.n_iter % 5 == 0
    assert calls == [(i, 150) for i in range(1, res.n_products + 1)]
    full = lanczos(op, k=1, which="LA", n_iter=150, seed=3)
    assert abs(res.eigenvalues[0] - full.eigenvalues[0]) <= 1e-10 * abs(full.eigenvalues[0])
    assert res.residual_norms[0] <= 1e-10 * abs(res.eigenvalues[0])


@pytest.mark.parametrize("kind", ["hessian_rop", "hessian_fd", "fisher", "empirical_fisher", "kfac"])
def test_lanczos_works_on_every_operator(xp, kind):
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    op = {"hessian_rop": lambda: HessianRop(model, params, x, y),
          "hessian_fd": lambda: HessianFD(model, params, x, y),
          "fisher": lambda: Fisher(model, params, x, seed=7),
          "empirical_fisher": lambda: EmpiricalFisher(model, params, x, y),
          "kfac": lambda: kfac_operator(model, params, x, y)}[kind]()
    lam = numpy.linalg.eigvalsh(to_host(op.dense()))
    res = lanczos(op, k=2, which="both", n_iter=model.n_params)
    # central differences are linear in v only to their truncation error (~1e-10 here)
    tol = 1e-7 if kind == "hessian_fd" else 1e-10
    assert numpy.abs(res.eigenvalues - lam[[0, 1, -2, -1]]).max() <= tol * numpy.abs(lam).max()


def test_float32_operators_are_analysed_in_float32(xp):
    model, params, x, y = setup("tanh", "softmax_xent", numpy)
    params = [xp.asarray(p.astype(numpy.float32)) for p in params]
    op = HessianCS(model, params, xp.asarray(x), xp.asarray(y))
    lam = numpy.linalg.eigvalsh(to_host(op.dense()).astype(numpy.float64))
    res = lanczos(op, k=2, which="both", n_iter=model.n_params, return_vectors=True)
    assert res.eigenvectors.dtype == numpy.float32
    assert numpy.abs(res.eigenvalues - lam[[0, 1, -2, -1]]).max() <= 1e-6 * numpy.abs(lam).max()
    assert hutchinson_diagonal(op, n_probes=3).estimate.dtype == numpy.float32


def test_lanczos_makes_one_host_sync_whatever_the_number_of_steps(xp):
    """The steps leave alpha and beta on the device: one transfer at the end, for 6 steps or 12."""
    model, op = tiny_operator("hessian_cs", xp)
    for n_iter in (6, 12):
        with device_work(xp) as work:
            lanczos(op, k=2, n_iter=n_iter, return_vectors=True)
        if work.exact:  # the stand-in counts syncs and names their sites
            assert work.n_syncs == 1 and all(site.startswith("engine/curvature/spectral.py") for site in work.syncs), str(work)
    Q = xp.zeros((5, model.n_params), dtype=op.dtype)
    Q[0] = 1.0 / model.n_params ** 0.5
    with device_work(xp, forbid_syncs=True) as work:  # the steps alone; a real device raises on a sync
        _lanczos_steps(xp, op.matvec, Q, xp.zeros((2, 4), dtype=op.dtype), xp.ones(model.n_params), 0, 4)
    assert work.n_syncs == 0, str(work)


# --- stochastic Lanczos quadrature ------------------------------------------------------------------
def test_lanczos_quadrature_is_exact_for_polynomials_of_degree_below_2m(xp):
    model, op = tiny_operator("hessian_cs", xp)
    H = to_host(op.dense())
    q = numpy.random.default_rng(0).choice([-1.0, 1.0], model.n_params) / numpy.sqrt(model.n_params)
    m = 8
    res = lanczos(op, k=1, n_iter=m, v0=q)
    nodes, weights = lanczos_quadrature(res.alpha, res.beta)
    assert abs(weights.sum() - 1) <= 1e-14
    for p in range(2 * m):
        exact = q @ numpy.linalg.matrix_power(H, p) @ q
        assert abs(weights @ nodes ** p - exact) <= 1e-11 * max(1.0, numpy.abs(H).max()) ** p


def test_slq_with_full_krylov_space_is_the_exact_probe_average(xp):
    """m = n: each probe's quadrature is exact, so SLQ equals sum_l (1/P) q_l^T g(t - A) q_l
    computed from the dense eigendecomposition with the same probes (1e-10)."""
    model, op = tiny_operator("hessian_cs", xp)
    lam, U = numpy.linalg.eigh(to_host(op.dense()))
    P, n = 6, model.n_params
    d = slq_density(op, n_probes=P, n_iter=n, sigma=0.05, seed=4)
    probes = to_host(rademacher_rows(op, P + 1, 4))[:P] / numpy.sqrt(n)
    w = ((probes @ U) ** 2).mean(axis=0)
    ref = gaussian_density(lam, d.grid, 0.05, weights=w)
    assert numpy.abs(d.density - ref).max() <= 1e-10 * ref.max()
    assert d.nodes.shape == d.weights.shape == (P, n) and d.n_products == P * n
    assert numpy.abs(d.weights.sum(axis=1) - 1).max() <= 1e-13
    assert abs(numpy.trapezoid(d.density, d.grid) - 1) <= 1e-6


def test_slq_density_matches_the_smoothed_exact_spectrum(xp):
    """L1 distance to the exact eigenvalue histogram smoothed with the same Gaussian.

    Bound: with exact quadrature the SLQ density is sum_i wbar_i g(t - lambda_i), wbar_i the probe
    average of (u_i^T q)^2, so ||phi_SLQ - phi||_1 <= sum_i |wbar_i - 1/n|, whose expectation is at
    most sum_i sd(wbar_i) <= n sqrt(2 / (P n^2)) = sqrt(2 / P) for normalised Rademacher probes
    (Var (u^T q)^2 = 2 (1 - sum_j u_j^4) / n^2). The smoothing averages neighbouring eigenvalues,
    so the distance is well below that (0.04-0.08 measured over seeds): we require half of it.
    The quadrature error of m = 40 < n = 224 steps (the same probes with m = n as reference) is
    checked separately: ~5e-6 measured, far below the probe error, so 1e-4 is required.
    """
    model, params, x, y = mid_model(xp)
    op = HessianCS(model, params, x, y)
    lam = numpy.linalg.eigvalsh(to_host(op.dense()))
    P, sigma = 10, 0.02 * (lam.max() - lam.min())
    d = slq_density(op, n_probes=P, n_iter=40, sigma=sigma, seed=5)
    ref = gaussian_density(lam, d.grid, sigma)
    l1 = numpy.trapezoid(numpy.abs(d.density - ref), d.grid)
    assert l1 <= 0.5 * numpy.sqrt(2 / P), l1
    assert d.grid[0] <= lam.min() - 4 * sigma and d.grid[-1] >= lam.max() + 4 * sigma
    short, full = (slq_density(op, n_probes=3, n_iter=m, sigma=sigma, grid=d.grid, seed=6) for m in (40, model.n_params))
    assert numpy.trapezoid(numpy.abs(short.density - full.density), d.grid) <= 1e-4
    if xp is not numpy:
        twin = slq_density(HessianCS(*mid_model(numpy)), n_probes=P, n_iter=40, sigma=sigma, seed=5)
        assert numpy.abs(twin.density - d.density).max() <= 1e-10 * d.density.max()


def test_slq_first_moment_is_hutchinsons_trace_with_the_same_probes(xp):
    model, op = tiny_operator("hessian_cs", xp)
    d = slq_density(op, n_probes=7, n_iter=4, seed=9)
    t = hutchinson_trace(op, n_probes=7, seed=9)
    assert abs((d.weights * d.nodes).sum() / 7 * model.n_params - t.estimate) <= 1e-12 * abs(t.estimate)


# --- trace and diagonal estimators ------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["hutchinson", "hutchpp"])
def test_trace_estimators_are_unbiased_within_their_standard_error(xp, estimator):
    model, op = tiny_operator("hessian_cs", xp)
    exact = numpy.trace(to_host(op.dense()))
    runs = [hutchinson_trace(op, n_probes=24, seed=s) if estimator == "hutchinson" else hutchpp_trace(op, n_products=24, seed=s)
            for s in range(50)]
    est = numpy.array([r.estimate for r in runs])
    se = numpy.array([r.std_error for r in runs])
    assert all(r.n_products == 24 for r in runs)
    z = (est.mean() - exact) / (numpy.sqrt((se ** 2).sum()) / len(runs))  # z-score of the mean of 50 seeds
    assert abs(z) <= 3.0, z
    # the reported errors are the spread the estimates actually have
    assert 0.6 <= est.std(ddof=1) / numpy.sqrt((se ** 2).mean()) <= 1.6
    if xp is not numpy:
        twin = hutchpp_trace(tiny_operator("hessian_cs", numpy)[1], 24, seed=0) if estimator == "hutchpp" \
            else hutchinson_trace(tiny_operator("hessian_cs", numpy)[1], 24, seed=0)
        assert abs(twin.estimate - runs[0].estimate) <= 1e-12 * abs(exact)


def test_hutchpp_variance_is_far_below_hutchinsons_on_a_decaying_spectrum(xp):
    A = decaying_matrix()
    op = MatrixOperator(A, xp)
    exact = numpy.trace(A)
    h = numpy.array([hutchinson_trace(op, 60, seed=s).estimate for s in range(40)])
    pp = numpy.array([hutchpp_trace(op, 60, seed=s).estimate for s in range(40)])
    assert ((pp - exact) ** 2).mean() <= 0.02 * ((h - exact) ** 2).mean()


def test_hutchpp_is_exact_for_a_rank_below_its_sketch(xp):
    """The unregularised Gauss-Newton matrix of the tiny MLP has rank 8 <= m / 3: tr(Q^T A Q) is the
    whole trace and the residual samples vanish."""
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    op = GaussNewton(model, params, x, y, regularized=False)
    exact = numpy.trace(to_host(op.dense()))
    r = hutchpp_trace(op, n_products=30, seed=1)
    assert abs(r.estimate - exact) <= 1e-12 * exact and abs(r.exact_part - exact) <= 1e-12 * exact
    assert r.std_error <= 1e-12 * exact


def test_hutchinson_diagonal_matches_the_exact_diagonal_within_its_error(xp):
    model, op = tiny_operator("hessian_cs", xp)
    H = to_host(op.dense())
    m = 400
    d = hutchinson_diagonal(op, n_probes=m, seed=2)
    est, se = to_host(d.estimate), to_host(d.std_error)
    z = (est - numpy.diag(H)) / se
    assert numpy.abs(z).max() <= 4.0 and abs(z.mean()) <= 4.0 / numpy.sqrt(z.size)
    # per-entry variance of z_i (A z)_i is sum_{j != i} A_ij^2: the reported errors match it
    var = ((H ** 2).sum(axis=1) - numpy.diag(H) ** 2) / m
    assert numpy.all((se ** 2 / var > 0.6) & (se ** 2 / var < 1.5))
    assert d.n_products == m


# --- per-layer blocks and Rayleigh quotients -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["hessian_cs", "kfac"])
def test_layer_blocks_are_the_diagonal_blocks_of_the_dense_matrix(xp, kind):
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    op = HessianCS(model, params, x, y) if kind == "hessian_cs" else kfac_operator(model, params, x, y)
    D = to_host(op.dense())
    blocks = layer_blocks(op, model)
    assert sorted(blocks) == [0, 2]  # layer 1 is the tanh
    for li, block in blocks.items():
        first = model.layer_param_index[li]
        size = sum(int(numpy.prod(s)) for s in model.layers[li].param_shapes())
        start = model.offsets[first]
        assert (block.start, block.stop) == (start, start + size) and block.shape == (size, size)
        sub = D[start:start + size, start:start + size]
        assert numpy.abs(to_host(block.dense()) - sub).max() <= 1e-15 * numpy.abs(sub).max()
        res = lanczos(block, k=2, which="both", n_iter=size)  # every analysis applies to a block
        lam = numpy.linalg.eigvalsh(sub)
        assert numpy.abs(res.eigenvalues - lam[[0, 1, -2, -1]]).max() <= 1e-10 * numpy.abs(lam).max()
    with pytest.raises(ValueError, match="no parameters"):
        restrict(op, model, 1)
    with pytest.raises(ValueError, match="index"):
        restrict(op, model, 3)


def test_rayleigh_quotients_under_another_operator(xp):
    """How well K-FAC and the Gauss-Newton matrix match the Hessian along its top eigenvectors:
    rho_i = v_i^T B v_i / v_i^T v_i, against the dense matrices."""
    model, params, x, y = setup("tanh", "softmax_xent", xp)
    H = HessianCS(model, params, x, y)
    top = lanczos(H, k=3, which="LA", n_iter=model.n_params, return_vectors=True)
    V = to_host(top.eigenvectors)
    assert numpy.allclose(rayleigh_quotients(H, top.eigenvectors), top.eigenvalues, rtol=1e-12, atol=0)
    for B in (GaussNewton(model, params, x, y), kfac_operator(model, params, x, y)):
        Bd = to_host(B.dense())
        ref = numpy.einsum("ik,ij,jk->k", V, Bd, V) / (V * V).sum(axis=0)
        calls = []
        rho = rayleigh_quotients(B, 2.0 * top.eigenvectors, progress=lambda d, t: calls.append((d, t)))
        assert numpy.abs(rho - ref).max() <= 1e-13 * numpy.abs(ref).max() and calls == [(1, 3), (2, 3), (3, 3)]
    # per layer: the block eigenvector under the block of another operator
    blocks_h, blocks_g = layer_blocks(H, model), layer_blocks(GaussNewton(model, params, x, y), model)
    res = lanczos(blocks_h[2], k=1, n_iter=blocks_h[2].shape[0], return_vectors=True)
    v = to_host(res.eigenvectors)[:, 0]
    G2 = to_host(blocks_g[2].dense())
    assert abs(rayleigh_quotients(blocks_g[2], res.eigenvectors)[0] - v @ G2 @ v) <= 1e-13 * numpy.abs(G2).max()


# --- arguments and bookkeeping ----------------------------------------------------------------------
def test_every_function_reports_each_product_and_the_products_it_used(xp):
    model, op = tiny_operator("gauss_newton", xp)
    for fn, kwargs, total in [(hutchinson_trace, {"n_probes": 5}, 5), (hutchpp_trace, {"n_products": 10}, 10),
                              (hutchinson_diagonal, {"n_probes": 4}, 4), (slq_density, {"n_probes": 3, "n_iter": 6}, 18),
                              (lanczos, {"k": 2, "n_iter": 9}, 9)]:
        calls = []
        out = fn(op, progress=lambda d, t: calls.append((d, t)), **kwargs)
        assert calls == [(i, total) for i in range(1, total + 1)] and out.n_products == total, fn.__name__


def test_bad_arguments_are_refused_with_a_clear_message(xp):
    model, op = tiny_operator("hessian_cs", xp)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, which="BE")
    with pytest.raises(ValueError, match="exceeds"):
        lanczos(op, k=model.n_params + 1)
    with pytest.raises(ValueError, match="are wanted"):
        lanczos(op, k=5, n_iter=3)
    with pytest.raises(ValueError, match="n_probes"):
        hutchinson_trace(op, n_probes=1)
    with pytest.raises(ValueError, match="n_products"):
        hutchpp_trace(op, n_products=3)
    with pytest.raises(TypeError, match="curvature operator"):
        hutchinson_trace(numpy.eye(3))
    with pytest.raises(ValueError, match="shape"):
        rayleigh_quotients(op, xp.ones((model.n_params + 1, 2)))
    with pytest.raises(ValueError, match="start < stop"):
        BlockRestriction(op, 5, 5)
    with pytest.raises(TypeError, match="progress"):
        hutchinson_trace(op, progress=3)
