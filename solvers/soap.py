"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., "SOAP: Improving and
Stabilizing Shampoo using Adam", arXiv:2409.11321), as the paper's algorithm and the authors' code
(github.com/nikhilvyas/SOAP, ``soap.py``) run it. docs/preconditioners.md describes it as implemented here.

Every parameter with two or more axes is a matrix G of shape (rows, cols) (a Dense W; a Conv2d
kernel as (C_out, C_in kh kw), the authors' ``merge_dims`` of the trailing axes); 1-D parameters
(biases) take plain Adam with the same betas (the authors' default ``precondition_1d=False``).
g = grad(data loss) + tau theta (the model's weight decay). With beta_s = ``shampoo_beta`` (beta2
when -1, the authors' convention):

    first iteration (k = 0): L = (1 - beta_s) G G^T, R = (1 - beta_s) G^T G, Q_L, Q_R their
        eigenvectors by eigh, in descending eigenvalue order; no step (the authors' code: "the
        first step is skipped so that we never use the current gradients in the projection")
    iteration k >= 1, t = k:
        G' = Q_L^T G Q_R                                        (the gradient in the eigenbasis)
        M <- beta1 M + (1 - beta1) G,   M' = Q_L^T M Q_R        (momentum kept in the original basis)
        V <- beta2 V + (1 - beta2) G' * G'                      (second moment in the eigenbasis)
        N = Q_L (M' / (sqrt(V) + epsilon)) Q_R^T
        theta <- theta - lr sqrt(1 - beta2^t) / (1 - beta1^t) N (without the bias factors when
                                                                  ``correct_bias`` is off)
        L <- beta_s L + (1 - beta_s) G G^T,   R <- beta_s R + (1 - beta_s) G^T G
        every ``precondition_frequency`` iterations (t % f == 0), per factor F in (L, R) with basis Q:
            order = argsort(-diag(Q^T F Q)); Q <- Q[:, order]; V's rows (L) or columns (R) permuted
            the same way; Q <- the Q factor of QR(F Q)      (one step of power iteration, the
                                                           authors' ``get_orthogonal_matrix_QR``)
    1-D parameters: m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g * g, the same step
        size, N = m / (sqrt(v) + epsilon).

The authors' code keeps M rotated (projected back and forth around a basis change); keeping it in
the original basis, as the paper's algorithm writes it, is the same up to rounding. Departures: no
decoupled weight decay (the authors' default 0.01; here the model's tau theta is in g), no
``max_precond_dim`` (every dimension is preconditioned), no ``normalize_grads``, no 1e-30 I added
before the first eigh (below float64's resolution for any nonzero factor), computations in the
parameters' precision.

State (keys by :func:`solvers.shampoo.param_key`): ``k`` (iterations made, the first one
included) and per parameter ``param{j}/m`` (parameter-shaped), ``param{j}/v`` (the matrix's shape
for matrices, in the eigenbasis), per matrix ``param{j}/L``, ``param{j}/R``, ``param{j}/Q_L``,
``param{j}/Q_R``. Info: ``eigenbasis_refreshed``.

Host synchronisation: none in a step; eigh, QR and the argsort run on the parameters' device and
every decision depends on the host counter ``k`` alone.
"""

from __future__ import annotations

from engine.backend import array_module

from .base import Hyper, Solver, positive, register, unit_interval
from .kronecker_solver import check_real_params
from .shampoo import _sq_norm, matrix_parameters, matrix_view, param_key

__all__ = ["SOAP", "descending_eigenvectors", "refresh_eigenbasis"]


def descending_eigenvectors(F):
    """The eigenvectors of a symmetric F by eigh, columns in descending eigenvalue order."""
    xp = array_module(F)
    _, Q = xp.linalg.eigh(F)
    return xp.ascontiguousarray(Q[:, ::-1])


def refresh_eigenbasis(F, Q, V, axis: int):
    """One power-iteration step on the eigenbasis Q of F (the authors' ``get_orthogonal_matrix_QR``).

    The columns of Q are sorted by their Rayleigh quotients diag(Q^T F Q), descending, and V's
    ``axis`` is permuted with them; then Q <- the Q factor of QR(F Q). Returns (Q, V)."""
    xp = array_module(F)
    FQ = F @ Q
    order = xp.argsort(-(Q * FQ).sum(axis=0))
    V = xp.take(V, order, axis=axis)
    Q_new, _ = xp.linalg.qr(xp.take(FQ, order, axis=1))
    return Q_new, V


@register
class SOAP(Solver):
    name = "soap"
    summary = "SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner"
    hyperparameters = {
        "lr": positive("learning rate", 3e-3),
        "beta1": unit_interval("EMA decay of the momentum M (in the original basis)", 0.95),
        "beta2": unit_interval("EMA decay of the second moment V (in the eigenbasis)", 0.95),
        "epsilon": positive("epsilon added to sqrt(V)", 1e-8),
        "shampoo_beta": Hyper(-1.0, "EMA decay of Shampoo's factors L, R; -1: beta2", lambda v: v == -1 or 0 <= v < 1,
                              "-1 or in [0, 1)", float),
        "precondition_frequency": positive("refresh the eigenbases (power iteration + QR) every this many iterations", 10,
                                           type=int),
        "correct_bias": Hyper(True, "Adam's bias correction sqrt(1 - beta2^t) / (1 - beta1^t) of the step size"),
    }

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        self.factor_beta = self.beta2 if self.shampoo_beta == -1 else self.shampoo_beta
        self.matrices = matrix_parameters(model)

    def init(self, params) -> dict:
        check_real_params(self.name, params)
        xp = array_module(*params)
        dtype = params[0].dtype
        state = {"k": 0}
        for j, p in enumerate(params):
            state[param_key(j, "m")] = xp.zeros(p.shape, dtype=dtype)
            if j in self.matrices:
                rows, cols = matrix_view(p).shape
                state[param_key(j, "v")] = xp.zeros((rows, cols), dtype=dtype)
                for name, d in (("L", rows), ("R", cols), ("Q_L", rows), ("Q_R", cols)):
                    state[param_key(j, name)] = xp.zeros((d, d), dtype=dtype)
            else:
                state[param_key(j, "v")] = xp.zeros(p.shape, dtype=dtype)
        return state

    def step(self, params, state, x, y):
        xp = array_module(*params)
        k = int(state["k"])
        loss, grads = self.model.loss_and_grad(params, x, y)
        grad_sq = step_sq = 0
        for g in grads:
            grad_sq = grad_sq + _sq_norm(g)
        refresh = False
        if k == 0:
            self._update_factors(state, grads)
            for j in self.matrices:
                for name in ("L", "R"):
                    state[param_key(j, "Q_" + name)] = descending_eigenvectors(state[param_key(j, name)])
        else:
            lr = self.lr
            if self.correct_bias:
                lr = lr * (1 - self.beta2 ** k) ** 0.5 / (1 - self.beta1 ** k)
            for j, (p, g) in enumerate(zip(params, grads)):
                N = self._adam_direction(state, j, g)
                step_sq = step_sq + _sq_norm(N)
                p -= lr * N
            step_sq = lr * lr * step_sq
            self._update_factors(state, grads)
            refresh = k % self.precondition_frequency == 0
            if refresh:
                self._refresh_eigenbases(state)
        state["k"] = k + 1
        info = {"loss": loss, "grad_norm": xp.sqrt(grad_sq), "step_norm": xp.sqrt(step_sq) if k else xp.zeros((), grads[0].dtype),
                "eigenbasis_refreshed": bool(refresh)}
        return params, state, info

    def _adam_direction(self, state, j, g):
        """N of parameter j: Adam's m / (sqrt(v) + epsilon), in the eigenbasis for a matrix, rotated back."""
        xp = array_module(g)
        b1, b2 = self.beta1, self.beta2
        m, v = state[param_key(j, "m")], state[param_key(j, "v")]
        m *= b1
        m += (1 - b1) * g
        if j not in self.matrices:
            v *= b2
            v += (1 - b2) * (g * g)
            denom = xp.sqrt(v)
            denom += self.epsilon
            return m / denom
        Q_L, Q_R = state[param_key(j, "Q_L")], state[param_key(j, "Q_R")]
        G_rot = Q_L.T @ matrix_view(g) @ Q_R
        v *= b2
        v += (1 - b2) * (G_rot * G_rot)
        denom = xp.sqrt(v)
        denom += self.epsilon
        N = Q_L @ ((Q_L.T @ matrix_view(m) @ Q_R) / denom) @ Q_R.T
        return N.reshape(g.shape)

    def _update_factors(self, state, grads):
        """L <- beta_s L + (1 - beta_s) G G^T and R <- beta_s R + (1 - beta_s) G^T G of every matrix."""
        beta = self.factor_beta
        for j in self.matrices:
            G = matrix_view(grads[j])
            for name, stat in (("L", G @ G.T), ("R", G.T @ G)):
                F = state[param_key(j, name)]
                F *= beta
                stat *= 1 - beta
                F += stat

    def _refresh_eigenbases(self, state):
        """Q_L then Q_R of every matrix by one power-iteration step, V permuted along (rows, then columns)."""
        for j in self.matrices:
            v = state[param_key(j, "v")]
            for axis, name in enumerate(("L", "R")):
                Q, v = refresh_eigenbasis(state[param_key(j, name)], state[param_key(j, "Q_" + name)], v, axis)
                state[param_key(j, "Q_" + name)] = Q
            state[param_key(j, "v")] = v
