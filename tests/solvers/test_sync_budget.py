"""Host-sync budgets of the solver steps on the device (DESIGN.md conventions 1 and 5).

A step of SGD, Adam, RMSprop, K-BFGS, K-BFGS(L) and K-FAC (between inverse refreshes) makes **no**
host synchronisation; an iteration of truncated CG (:mod:`solvers.krylov`) at most **one** (its
exit decisions). Counted on the CuPy stand-in (``CSTEP_CUPY=standin``), which counts every
``float()``, ``int()``, ``bool()``, ``.item()``, ``.get()``, ``asnumpy`` and data-dependent shape by
call site, and array launches; on a real GPU the steps run under ``cupyx.allow_synchronize(False)``
instead, so a sync raises. Without CuPy the tests skip.

Models: the 8-6-3-6-8 autoencoder of tests/solvers/test_solvers.py (four Dense layers, ReLU and
linear units, sigmoid cross-entropy, weight decay 1e-5, batches of 32, float64) and the tiny CNN
of tests/solvers/test_conv_solvers.py (two 3x3 convolutions, max-pool, one Dense layer, softmax
cross-entropy, batches of 16). Launches per step are printed there (``pytest -s``).

Launch budgets (issue "Speed II (GPU)"): on the MNIST autoencoder (784-1000-500-250-30 mirrored,
eight Dense layers, float32) the launches of one step are ASSERTED per solver (:data:`LAUNCH_BUDGET`,
the counts measured when the fused kernels went in, with a few launches of slack), so they cannot
creep back. The count does not depend on the batch size, so a small batch is used.

The last tests make sure the checker bites: a step patched to read a device scalar on the host
(``float()``, or K-BFGS(L) deciding "store this pair?" on the host as it used to) must fail it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback

import numpy
import pytest

from solvers import make_solver
from solvers.krylov import truncated_cg
from tests.device_counts import device_work
from tests.solvers import test_conv_solvers as conv
from tests.solvers import test_solvers as mlp_case

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZERO_SYNC = ["sgd", "adam", "rmsprop", "kbfgs", "kbfgs_l", "kfac", "shampoo", "soap"]


# --- the checker --------------------------------------------------------------------------------
@contextlib.contextmanager
def sync_traces(xp):
    """On the stand-in, also keep the call chain (repository frames) of every host sync in the block."""
    chains = []
    standin = getattr(xp, "_standin", False)
    if standin:
        from tests import cupy_standin
        original = cupy_standin._call_site

        def recording():
            site = original()  # skips the stand-in's frames, so this wrapper does not move the site
            frames = [f for f in traceback.extract_stack()[:-1]
                      if f.filename.startswith(ROOT) and not f.filename.endswith("cupy_standin.py")
                      and "_pytest" not in f.filename]
            chains.append(" <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} ({f.name})"
                                      for f in reversed(frames[-5:])))
            return site
        cupy_standin._call_site = recording
    try:
        yield chains
    finally:
        if standin:
            cupy_standin._call_site = original


@contextlib.contextmanager
def measured(xp, forbid_syncs: bool = True):
    """``device_work`` (on a real GPU a sync raises when ``forbid_syncs``) plus the sync call chains
    on the stand-in."""
    with sync_traces(xp) as chains, device_work(xp, forbid_syncs=forbid_syncs) as work:
        work.chains = chains
        yield work


def check_syncs(work, budget: int, what: str) -> None:
    """Fail with the sync sites (and their call chains) when ``work`` made more than ``budget`` syncs."""
    if work.n_syncs > budget:
        sites = "; ".join(f"{site} x{n}" for site, n in work.syncs.most_common())
        chains = "\n    ".join(f"{chain} x{n}" for chain, n in collections.Counter(getattr(work, "chains", [])).most_common())
        raise AssertionError(f"{what}: {work.n_syncs} host syncs (budget {budget}) at {sites}\n    {chains}")


def on_standin(xp) -> bool:
    return bool(getattr(xp, "_standin", False))


def device_synchronized_error():
    import cupyx
    return cupyx.DeviceSynchronized


def report(what: str, counts) -> None:
    print(f"\n[device work] {what}: " + ", ".join(counts))


# --- the budgets --------------------------------------------------------------------------------
def mlp_start(name, xp):
    return mlp_case.start(name, xp=xp)


def run_budgeted(name, start, xp, steps: int, skip: int = 0, forbid_syncs: bool = True):
    """``skip`` steps unmeasured, then ``steps`` steps each counted; returns the per-step work."""
    model, data, solver, params, state = start(name, xp)
    for k in range(skip):
        params, state, _ = solver.step(params, state, *data[k % len(data)])
    works = []
    for k in range(skip, skip + steps):
        with measured(xp, forbid_syncs) as work:
            params, state, info = solver.step(params, state, *data[k % len(data)])
        works.append((work, info))
    return works


@pytest.mark.parametrize("name", ZERO_SYNC)
def test_a_step_makes_no_host_sync_mlp(name, cupy_only):
    # K-FAC refreshes its inverses at k <= inverse_freq (3 here) and every third step: steps 4 and 5
    # are between refreshes. The others are measured from k = 0 (K-BFGS's k = 0 inverts A on the device).
    skip = 4 if name == "kfac" else 0
    works = run_budgeted(name, mlp_start, cupy_only, steps=2 if name == "kfac" else 3, skip=skip)
    for k, (work, info) in enumerate(works, skip):
        if name == "kfac":
            assert not info["inverses_refreshed"], "the measured K-FAC steps must lie between refreshes"
        check_syncs(work, 0, f"{name} step {k} (MLP 8-6-3-6-8)")
        if work.exact:  # nothing comes from the host but K-FAC's sampled-target draws (engine.losses)
            assert work.h2d == (1 if name == "kfac" else 0), f"{name} step {k}: {work}"
    report(f"{name} step, MLP 8-6-3-6-8, batch 32", [f"k={k}: {w}" for k, (w, _) in enumerate(works, skip)])


def cnn_start(name, xp):
    return conv.start(name, xp=xp)


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_a_step_makes_no_host_sync_cnn(name, cupy_only):
    works = run_budgeted(name, cnn_start, cupy_only, steps=3)
    for k, (work, _) in enumerate(works):
        check_syncs(work, 0, f"{name} step {k} (tiny CNN)")
        if work.exact:
            assert work.h2d == 0, f"{name} step {k}: {work}"
    report(f"{name} step, tiny CNN, batch 16", [f"k={k}: {w}" for k, (w, _) in enumerate(works)])


def test_a_kfac_inverse_refresh_makes_one_host_sync(cupy_only):
    """A refresh checks all the damped factors (Cholesky success, symmetry) in one device read
    (engine.curvature.kronecker.factor_inverses), not one per factor."""
    (work, info), = run_budgeted("kfac", mlp_start, cupy_only, steps=1, forbid_syncs=False)
    assert info["inverses_refreshed"]
    if work.exact:
        check_syncs(work, 1, "kfac step with an inverse refresh (MLP 8-6-3-6-8, 8 factors)")
    report("kfac step with the inverse refresh, MLP 8-6-3-6-8", [str(work)])


def spd_system(xp, n=30, seed=0):
    rng = numpy.random.default_rng(seed)
    q, _ = numpy.linalg.qr(rng.standard_normal((n, n)))
    A = xp.asarray((q * numpy.geomspace(1.0, 1e6, n)) @ q.T)
    return A, xp.asarray(rng.standard_normal(n))


def cg_work(xp, iterations: int, matvec=None, **options):
    """Work of a truncated CG that runs exactly ``iterations`` iterations (rtol = 0: only the cap stops it)."""
    A, b = spd_system(xp)
    mv = matvec(A) if matvec is not None else (lambda v: A @ v)
    with measured(xp, forbid_syncs=False) as work:
        res = truncated_cg(mv, b, rtol=0.0, adaptive_rtol=False, max_iter=iterations, **options)
    assert res.exit_reason == "max_iter" and res.iterations == iterations
    return work


def per_iteration(xp, matvec=None, **options):
    """(syncs, launches) per CG iteration: the difference between a 12- and a 4-iteration solve."""
    short, long = cg_work(xp, 4, matvec, **options), cg_work(xp, 12, matvec, **options)
    return (long.n_syncs - short.n_syncs) / 8, (long.launches - short.launches) / 8, short, long


@pytest.mark.parametrize("options", [{}, {"model_decrease_check": True}, {"preconditioner": "jacobi"}],
                         ids=["plain", "progress-rule", "preconditioned"])
def test_a_cg_iteration_makes_at_most_one_sync(options, cupy_only):
    xp = cupy_only
    if options.get("preconditioner") == "jacobi":
        A, _ = spd_system(xp)
        d = 1 / xp.diagonal(A)
        options = {"preconditioner": lambda r: d * r}
    syncs, launches, short, long = per_iteration(xp, **options)
    if long.exact:
        assert syncs <= 1, f"{syncs} host syncs per CG iteration: {long}"
        # before the loop and at exit: ||b||, ||r_0||, phi_0 with the progress rule, and the exit scalars
        check_syncs(short, 4 + 4, "truncated_cg, 4 iterations")
    report("truncated_cg iteration (n = 30)", [f"{syncs:g} syncs and {launches:g} launches per iteration",
                                               f"4 iterations: {short}", f"12 iterations: {long}"])


@pytest.mark.parametrize("name,options", [("newton_krylov", {"cg_max_iter": 10}),
                                          ("hessian_free", {"cg_max_iter": 10, "curvature_fraction": 0.5})])
def test_newton_type_steps_are_reported(name, options, cupy_only):
    """Not a budget (the step and line-search decisions are taken on the host): reported for the record."""
    model, data, _, params, _ = mlp_case.start("sgd", xp=cupy_only)
    solver = make_solver(name, model, **options)
    state = solver.init(params)
    with measured(cupy_only, forbid_syncs=False) as work:
        params, state, info = solver.step(params, state, *data[0])
    report(f"{name} step, MLP 8-6-3-6-8 ({info['cg_iters']} CG iterations, {info['n_hvp']} products)", [str(work)])


# --- launch budgets on the MNIST autoencoder -----------------------------------------------------
#: launches per step (K-FAC: between inverse refreshes); before the fused kernels 2242 (K-BFGS),
#: 2354 (K-BFGS(L)), 547 (K-FAC), 195 (Adam), 186 (SGD); now 392 / 400 / 244 / 92 / 83 (K-BFGS(L)
#: was 616 with the fused kernels before its in-place ring-buffer push and one-reduction damping)
LAUNCH_BUDGET = {"kbfgs": 400, "kbfgs_l": 404, "kfac": 250, "adam": 100, "sgd": 90}


@pytest.mark.parametrize("name", sorted(LAUNCH_BUDGET))
def test_launches_per_step_on_the_mnist_autoencoder(name, cupy_only):
    import nets

    xp = cupy_only
    model = nets.build("mnist-ae")
    x = xp.asarray(numpy.random.default_rng(0).random((16, 784), dtype=numpy.float32))
    params = model.init(seed=1, dtype=numpy.float32, xp=xp)
    solver = make_solver(name, model)
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, [(x, x)])
    # a steady-state iteration: past k = 0 (K-BFGS inverts A there) and K-FAC's refreshes (k <= 20),
    # not a flush iteration; the launches do not depend on the values (every decision is on the device)
    state["k"] = 21 if name == "kfac" else 1
    params, state, _ = solver.step(params, state, x, x)  # first use: compiles kernels, makes the constants
    with measured(xp) as work:
        params, state, info = solver.step(params, state, x, x)
    assert not info.get("inverses_refreshed", False)
    check_syncs(work, 0, f"{name} step (mnist-ae)")
    report(f"{name} step, mnist-ae, float32", [str(work), "top: " + ", ".join(f"{k} {v}" for k, v in work.ops.most_common(6))])
    if work.exact:
        assert work.launches <= LAUNCH_BUDGET[name], f"{name}: {work.launches} launches (budget {LAUNCH_BUDGET[name]}): {work.ops.most_common(12)}"
        assert work.h2d == (1 if name == "kfac" else 0), f"{name}: {work}"


# --- the checker catches regressions --------------------------------------------------------------
def test_checker_flags_a_float_on_a_device_scalar_inside_a_step(cupy_only, monkeypatch):
    """A ``float()`` slipped into the K-BFGS damping fails the budget, naming the line."""
    import solvers.kbfgs as kbfgs
    original = kbfgs.double_damping

    def logging_damping(s, y, H, mu1=0.2, *, mu2):
        float(s @ y)  # the regression: a device scalar read on the host (e.g. for a log line)
        return original(s, y, H, mu1, mu2=mu2)

    monkeypatch.setattr(kbfgs, "double_damping", logging_damping)
    if not on_standin(cupy_only):  # a real GPU: the sync raises inside the step
        with pytest.raises(device_synchronized_error()):
            run_budgeted("kbfgs", mlp_start, cupy_only, steps=1, skip=1)
        return
    (work, _), = run_budgeted("kbfgs", mlp_start, cupy_only, steps=1, skip=1)
    with pytest.raises(AssertionError, match=r"test_sync_budget\.py:\d+ x4") as caught:
        check_syncs(work, 0, "kbfgs step")
    assert "logging_damping" in str(caught.value)  # the call chain names the function


def test_checker_flags_a_host_side_store_decision(cupy_only, monkeypatch):
    """K-BFGS(L) as it was: the "store this pair?" decision read on the host (one sync per layer)."""
    from solvers.lbfgs import CompactLBFGS
    original = CompactLBFGS.push

    def host_decided_push(self, s, y, store=True, **given):
        if bool(store):  # the regression
            original(self, s, y, True, **given)

    monkeypatch.setattr(CompactLBFGS, "push", host_decided_push)
    if not on_standin(cupy_only):
        with pytest.raises(device_synchronized_error()):
            run_budgeted("kbfgs_l", mlp_start, cupy_only, steps=1, skip=1)
        return
    (work, _), = run_budgeted("kbfgs_l", mlp_start, cupy_only, steps=1, skip=1)
    with pytest.raises(AssertionError, match=r"(?s)4 host syncs \(budget 0\).*test_sync_budget\.py:\d+ \(host_decided_push\)"):
        check_syncs(work, 0, "kbfgs_l step")


def test_checker_flags_a_second_sync_per_cg_iteration(cupy_only):
    """A matrix-vector product that reads a norm on the host doubles the syncs per CG iteration."""
    def chatty(A):
        def mv(v):
            float((v * v).sum())  # the regression
            return A @ v
        return mv

    syncs, _, _, long = per_iteration(cupy_only, matvec=chatty)
    if not long.exact:
        pytest.skip("counted on the stand-in")
    assert syncs == 2
    with pytest.raises(AssertionError, match="budget"):
        check_syncs(long, 12 + 4, "truncated_cg, 12 iterations")


def test_shared_pieces_make_no_host_sync(cupy_only):
    """The BFGS update (both forms, skip decided by ``select``/``where``), the dampings, the
    Hessian-action update and an L-BFGS push with a device decision: no sync on the device."""
    from solvers.bfgs import bfgs_inverse_update, select
    from solvers.damping import double_damping
    from solvers.hessian_action import hessian_action_update
    from solvers.kbfgs import powell_lm_damping
    from solvers.lbfgs import CompactLBFGS

    xp = cupy_only
    rng = numpy.random.default_rng(5)
    d = 6
    q = rng.standard_normal((d, d))
    H = xp.asarray(q @ q.T / d + 0.5 * numpy.eye(d))
    s, y, g = (xp.asarray(rng.standard_normal(d)) for _ in range(3))
    op = CompactLBFGS.empty(d, 2, numpy.float64, xp)
    with measured(xp) as work:
        bfgs_inverse_update(H, s, y, g)
        bfgs_inverse_update(H.copy(), s, -y, g, inplace=True)
        select(s @ y > 0, H, 2 * H)
        double_damping(s, y, H, 0.2, mu2=0.5)
        powell_lm_damping(s, y, op, 0.2, mu2=0.5)
        hessian_action_update(H.copy(), H, 0.5, s, inplace=True)
        for sign in (1, -1, 1, 1):
            op.push(s + 0.1 * y, sign * (s + 0.1 * g), s @ (sign * s) > 0)
        op.apply(y)
    check_syncs(work, 0, "BFGS pieces")
    report("BFGS pieces", [str(work)])
