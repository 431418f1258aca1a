"""Shampoo with layerwise Adam grafting (Gupta, Koren, Singer, "Shampoo: Preconditioned Stochastic
Tensor Optimization", ICML 2018, arXiv:1802.09568), in the conventions of the Distributed Shampoo
reference implementation (Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer for Training Neural Networks At-Scale", arXiv:2309.06497;
facebookresearch/optimizers, ``distributed_shampoo``). docs/preconditioners.md describes it as
implemented here.

Every parameter with two or more axes is a matrix G of shape (rows, cols): a Dense layer's W
(d_out x d_in), a Conv2d kernel reshaped to (C_out, C_in kh kw). Parameters with one axis (biases)
take the grafted Adam step alone. W and b are separate parameters here (no homogeneous ``[W | b]``
view), as in the reference, which preconditions each parameter tensor on its own. With t = k + 1
the iteration count and g = grad(data loss) + tau theta (the model's weight decay):

    factor statistics (reference ``update_preconditioners``):
        L <- beta2 L + (1 - beta2) G G^T,   R <- beta2 R + (1 - beta2) G^T G    (beta2 < 1)
        L <- L + G G^T,                    R <- R + G^T G                      (beta2 = 1: Shampoo's sums)
    Adam grafting statistic: v <- grafting_beta2 v + (1 - grafting_beta2) g * g
    roots, when (t % precondition_every == 0 and t > start) or t == start (``compute_root_inverse``):
        L_root = root(L / c2, 4),  R_root = root(R / c2, 4),   c2 = 1 - beta2^t (1 when beta2 = 1)
        root(A, r) = Q diag((lambda - min(lambda_min, 0) + epsilon)^(-1/r)) Q^T,  A = Q diag(lambda) Q^T
        (eigh; the reference's ``_matrix_root_eigen``: shift to PSD, then epsilon added to the
        eigenvalues before the root; r = 2 x order = 4 for a matrix, the exponent -1/4 of the paper)
    filtered gradient: m <- beta1 m + (1 - beta1) g,  m^ = m / (1 - beta1^t)
    directions:
        A = m^ / (sqrt(v / (1 - grafting_beta2^t)) + grafting_epsilon)       (Adam grafting direction)
        S = L_root M^ R_root                                                 (Shampoo direction)
        P = A                                  for t < start and for 1-D parameters
        P = (||A||_F / (||S||_F + 1e-16)) S    otherwise (layerwise grafting; ``grafting="none"``: P = S)
    momentum (``momentum`` mu > 0, the reference's heavy ball without dampening): B <- mu B + P,  P = B
    theta <- theta - lr P

start = ``start_preconditioning_step``, or ``precondition_every`` when it is -1 (the reference's
convention). The paper's Algorithm 1 (the matrix case: sums, L_0 = epsilon I, no grafting, roots every
step) is ``beta1=0, beta2=1, grafting="none", precondition_every=1`` up to where epsilon enters.

Departures from the reference, all deliberate: no blocking (the reference splits dimensions over
``max_preconditioner_dim`` = 1024; every layer here is preconditioned whole), no merging of
dimensions (a Conv2d kernel is the (C_out, C_in kh kw) matrix), biases take the grafted Adam step
(the reference gives 1-D tensors a full-matrix AdaGrad root), no decoupled weight decay (the model's
tau theta is in g), computations in the parameters' precision. ``precondition_every`` defaults to
10 (the reference: 1), so a refresh of mnist-mlp's 784 x 784 root costs little per step.

Default lr = 5e-3 (the reference: 1e-2), from a sweep of ``cstep train --net mnist-mlp --solver
shampoo --epochs 2`` (full MNIST, batch 1000, float32, seed 9999, the other defaults), test accuracy
after two epochs: lr 1e-3 96.57%, 2e-3 97.25%, 3e-3 97.66%, 5e-3 98.06%, 1e-2 97.65%.

State (keys by :func:`param_key`, j the parameter's index in ``model.shapes``): ``k`` and per
parameter ``param{j}/m``, ``param{j}/v`` (parameter-shaped), with ``momentum`` > 0
``param{j}/momentum_buffer``, and per matrix ``param{j}/L``, ``param{j}/R``, ``param{j}/L_root``,
``param{j}/R_root`` (zero until the first refresh). Info: ``roots_refreshed``.

Host synchronisation: none in a step; the eigendecompositions run on the parameters' device
(``xp.linalg.eigh``), every decision depends on the host counter ``k`` alone.
"""

from __future__ import annotations

from engine.backend import array_module

from .base import Hyper, Solver, positive, register, unit_interval
from .kronecker_solver import check_real_params

__all__ = ["Shampoo", "param_key", "matrix_view", "matrix_parameters", "inverse_root"]

#: added to the Shampoo direction's norm before grafting (the reference's ``_precondition_and_grafting``)
GRAFTING_NORM_FLOOR = 1e-16


def param_key(j: int, name: str) -> str:
    """The state key of a per-parameter entry, ``param{j}/{name}``: the one place such keys are built
    (j: the parameter's index in ``model.shapes``)."""
    return f"param{j}/{name}"


def matrix_view(a):
    """A parameter-shaped array as its (rows, cols) matrix: (shape[0], product of the other axes)."""
    return a.reshape(a.shape[0], -1)


def matrix_parameters(model) -> list[int]:
    """Indices of the parameters with two or more axes (Dense W, Conv2d kernels): the preconditioned ones."""
    return [j for j, shape in enumerate(model.shapes) if len(shape) >= 2]


def inverse_root(A, root: int, epsilon: float):
    """A^(-1/root) of a symmetric positive semi-definite A by eigendecomposition, as the reference's
    ``_matrix_root_eigen``: A = Q diag(lambda) Q^T, lambda <- lambda - min(lambda_min, 0) + epsilon,
    A^(-1/root) = Q diag(lambda^(-1/root)) Q^T. On A's device, no host sync."""
    xp = array_module(A)
    lam, Q = xp.linalg.eigh(A)
    lam = lam - xp.minimum(lam.min(), 0)
    lam += epsilon
    return (Q * lam ** (-1.0 / root)) @ Q.T


def _sq_norm(a):
    """sum(a * a) over all entries, as a 0-d array (no host sync)."""
    f = a.reshape(-1)
    return f @ f


@register
class Shampoo(Solver):
    name = "shampoo"
    summary = "Shampoo (Gupta et al. 2018) with Adam grafting, as the Distributed Shampoo reference implementation"
    hyperparameters = {
        "lr": positive("learning rate (the step has the grafted Adam step's norm per parameter)", 5e-3),
        "beta1": unit_interval("EMA decay of the filtered gradient m (bias-corrected; 0: the raw gradient)", 0.9),
        "beta2": Hyper(1.0, "EMA decay of the factors L, R; 1: Shampoo's running sums L += G G^T, R += G^T G",
                       lambda v: 0 < v <= 1, "in (0, 1]", float),
        "epsilon": positive("added to the eigenvalues of L and R before the -1/4 root", 1e-12),
        "precondition_every": positive("recompute the roots L^-1/4, R^-1/4 every this many iterations", 10, type=int),
        "start_preconditioning_step": Hyper(-1, "first iteration (1-based) with the Shampoo direction, before it the "
                                            "grafted Adam step; -1: precondition_every", lambda v: v == -1 or v >= 1,
                                            "-1 or >= 1", int),
        "grafting": Hyper("adam", "'adam' (layerwise Adam grafting of the step's norm) or 'none'",
                          lambda v: v in ("adam", "none"), "'adam' or 'none'"),
        "grafting_beta2": unit_interval("EMA decay of the Adam grafting second moment v", 0.999),
        "grafting_epsilon": positive("epsilon added to sqrt(v^) in the Adam grafting direction", 1e-8),
        "momentum": unit_interval("heavy-ball momentum mu on the grafted direction (0: none)", 0.0),
    }

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        self.start = self.precondition_every if self.start_preconditioning_step == -1 else self.start_preconditioning_step
        self.matrices = matrix_parameters(model)

    def init(self, params) -> dict:
        check_real_params(self.name, params)
        xp = array_module(*params)
        dtype = params[0].dtype
        state = {"k": 0}
        for j, p in enumerate(params):
            state[param_key(j, "m")] = xp.zeros(p.shape, dtype=dtype)
            state[param_key(j, "v")] = xp.zeros(p.shape, dtype=dtype)
            if self.momentum > 0:
                state[param_key(j, "momentum_buffer")] = xp.zeros(p.shape, dtype=dtype)
            if j in self.matrices:
                rows, cols = matrix_view(p).shape
                for name, d in (("L", rows), ("R", cols), ("L_root", rows), ("R_root", cols)):
                    state[param_key(j, name)] = xp.zeros((d, d), dtype=dtype)
        return state

    def refreshes(self, t: int) -> bool:
        """Whether iteration t (1-based) recomputes the roots (the reference's ``compute_root_inverse``)."""
        return (t % self.precondition_every == 0 and t > self.start) or t == self.start

    def step(self, params, state, x, y):
        xp = array_module(*params)
        t = int(state["k"]) + 1
        loss, grads = self.model.loss_and_grad(params, x, y)
        self._update_statistics(state, grads)
        refresh = self.refreshes(t)
        if refresh:
            self.refresh_roots(state, t)
        grad_sq = step_sq = 0
        for j, (p, g) in enumerate(zip(params, grads)):
            grad_sq = grad_sq + _sq_norm(g)
            P = self._direction(state, j, g, t)
            if self.momentum > 0:
                B = state[param_key(j, "momentum_buffer")]
                B *= self.momentum
                B += P
                P = B
            step_sq = step_sq + _sq_norm(P)
            p -= self.lr * P
        state["k"] = t
        info = {"loss": loss, "grad_norm": xp.sqrt(grad_sq), "step_norm": self.lr * xp.sqrt(step_sq),
                "roots_refreshed": bool(refresh)}
        return params, state, info

    def _update_statistics(self, state, grads):
        """L, R of every matrix (EMA, or sums when beta2 = 1) and the Adam grafting v of every parameter."""
        b2, gb2 = self.beta2, self.grafting_beta2
        for j, g in enumerate(grads):
            v = state[param_key(j, "v")]
            v *= gb2
            v += (1 - gb2) * (g * g)
            if j not in self.matrices:
                continue
            G = matrix_view(g)
            for name, stat in (("L", G @ G.T), ("R", G.T @ G)):
                F = state[param_key(j, name)]
                if b2 < 1:
                    F *= b2
                    stat *= 1 - b2
                F += stat

    def refresh_roots(self, state, t: int):
        """L_root = (L / c2 + ...)^(-1/4) and R_root likewise for every matrix (c2 = 1 - beta2^t, or 1)."""
        c2 = 1 - self.beta2 ** t if self.beta2 < 1 else 1.0
        for j in self.matrices:
            for name in ("L", "R"):
                F = state[param_key(j, name)]
                state[param_key(j, name + "_root")] = inverse_root(F / c2 if c2 != 1 else F, 4, self.epsilon)

    def _direction(self, state, j, g, t):
        """P of parameter j: the grafted Shampoo direction, or the Adam grafting direction."""
        xp = array_module(g)
        m = state[param_key(j, "m")]
        m *= self.beta1
        m += (1 - self.beta1) * g
        m_hat = m / (1 - self.beta1 ** t)
        denom = xp.sqrt(state[param_key(j, "v")] / (1 - self.grafting_beta2 ** t))
        denom += self.grafting_epsilon
        adam = m_hat / denom
        if j not in self.matrices or t < self.start:
            return adam
        S = state[param_key(j, "L_root")] @ matrix_view(m_hat) @ state[param_key(j, "R_root")]
        if self.grafting == "adam":
            S *= xp.sqrt(_sq_norm(adam)) / (xp.sqrt(_sq_norm(S)) + GRAFTING_NORM_FLOOR)
        return S.reshape(g.shape)
