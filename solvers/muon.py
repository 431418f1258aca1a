"""Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024), with the update scale of
Liu et al. 2025 ("Muon is scalable for LLM training", Moonlight) by default (docs/muon-adahessian-sophia.md).

Matrix parameters (every parameter with two or more axes: a Dense ``W`` of shape (d_out, d_in); a
Conv2d kernel (c_out, c_in, kh, kw) reshaped to (c_out, c_in kh kw)), gradient G_t (of the data
loss plus the model's weight decay 0.5 tau ||theta||^2):

    B_t = mu B_{t-1} + G_t                          (SGD-style momentum buffer, B_0 = 0)
    M_t = G_t + mu B_t  (nesterov)  or  B_t          (Jordan's reference code)
    O_t = NewtonSchulz5(M_t)                         (~ U V^T of M_t = U S V^T)
    W_t = W_{t-1} - lr * scale(A, B) * O_t

NewtonSchulz5 (Jordan et al. 2024): X_0 = M / (||M||_F + 1e-7), transposed so that it is wide
(A <= B: the Gram matrix X X^T is the smaller one), then ``ns_steps`` (5) times

    X <- a X + (b X X^T + c (X X^T)^2) X,   (a, b, c) = (3.4445, -4.7750, 2.0315),

the quintic whose coefficients maximise the slope at 0 while keeping every singular value of
the normalised input within roughly [0.7, 1.2] after five steps (measured band in the tests).
Computed in the parameters' precision (float32 or float64; the reference code's bfloat16 is not
available to NumPy).

``scale`` (A x B the matrix's shape):

* ``"moonlight"`` (default; Liu et al. 2025, Algorithm 1): 0.2 sqrt(max(A, B)). An orthogonal
  update has RMS 1/sqrt(max(A, B)), so this gives every matrix an update of RMS 0.2, the typical
  RMS of an Adam(W) update: one learning rate serves the Muon matrices and the Adam parameters.
* ``"jordan"``: sqrt(max(1, A / B)) (Jordan's reference implementation), RMS 1/sqrt(B); its
  learning rates (0.02 for Muon) are then tuned apart from Adam's.

Parameters with fewer than two axes (biases) take standard Adam (Kingma & Ba 2015, Algorithm 1)
with ``adam_lr``, ``adam_betas`` = (``adam_beta1``, ``adam_beta2``) and ``adam_eps``.

State: ``k``; ``m`` (flat, all parameters: the Muon buffer B on matrix entries, Adam's first
moment on the others); ``v`` (Adam's second moment, the non-matrix entries only, in model order).
"""

from __future__ import annotations

from engine.backend import array_module

from .base import Hyper, Solver, positive, register, unit_interval

__all__ = ["Muon", "newton_schulz5", "NS_COEFFICIENTS", "muon_scale"]

#: the quintic Newton-Schulz coefficients (a, b, c) of Jordan et al. 2024
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_SCALES = ("moonlight", "jordan")


def newton_schulz5(G, steps: int = 5, eps: float = 1e-7):
    """The quintic Newton-Schulz orthogonalisation of a matrix G (A x B), in G's precision.

        X_0 = G / (||G||_F + eps)   (transposed first when A > B)
        X_{j+1} = a X_j + (b X_j X_j^T + c (X_j X_j^T)^2) X_j,   (a, b, c) = NS_COEFFICIENTS

    Returns X_steps (A x B): approximately U V^T of G = U S V^T, singular values in a band
    around 1 rather than exactly 1 (Jordan et al. 2024). No host sync.
    """
    xp = array_module(G)
    a, b, c = (G.dtype.type(t) for t in NS_COEFFICIENTS)
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G
    X = X / (xp.sqrt(xp.sum(X * X)) + G.dtype.type(eps))
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


def muon_scale(shape, convention: str) -> float:
    """The shape-dependent factor of the orthogonalised update of an A x B matrix (see the module)."""
    rows, cols = shape
    if convention == "moonlight":
        return 0.2 * max(rows, cols) ** 0.5
    return max(1.0, rows / cols) ** 0.5


@register
class Muon(Solver):
    name = "muon"
    summary = "Muon: Nesterov momentum orthogonalised by quintic Newton-Schulz on weight matrices, Adam on biases"
    hyperparameters = {
        "lr": positive("learning rate eta of the Muon matrices (tuned on mnist-mlp, docs/muon-adahessian-sophia.md)", 0.01),
        "momentum": unit_interval("momentum mu (B = mu B + G)", 0.95),
        "nesterov": Hyper(True, "Nesterov momentum: orthogonalise G + mu B instead of B", type=bool),
        "ns_steps": Hyper(5, "Newton-Schulz iterations", lambda v: v >= 1, ">= 1", int),
        "scale": Hyper("moonlight", "update scale: 'moonlight' 0.2 sqrt(max(A, B)) (Liu et al. 2025) or "
                       "'jordan' sqrt(max(1, A/B)) (Jordan et al. 2024)", lambda v: v in _SCALES,
                       "'moonlight' or 'jordan'"),
        "adam_lr": positive("Adam learning rate for the non-matrix parameters (biases); the Moonlight scale lets it equal lr", 0.01),
        "adam_beta1": unit_interval("Adam beta1 for the non-matrix parameters", 0.9),
        "adam_beta2": unit_interval("Adam beta2 for the non-matrix parameters", 0.999),
        "adam_eps": positive("Adam epsilon for the non-matrix parameters", 1e-8),
    }

    def _matrix(self) -> list[bool]:
        return [len(s) >= 2 for s in self.model.shapes]

    def init(self, params):
        xp = array_module(*params)
        n_other = sum(size for size, mat in zip(self.model.sizes, self._matrix()) if not mat)
        return {"k": 0, "m": xp.zeros(self.model.n_params, dtype=params[0].dtype),
                "v": xp.zeros(n_other, dtype=params[0].dtype)}

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])
        loss, grads = model.loss_and_grad(params, x, y)
        matrix = self._matrix()
        bufs = model.unflatten(state["m"])
        dt = params[0].dtype.type
        mu = dt(self.momentum)
        steps = []
        for p, g, buf, mat in zip(params, grads, bufs, matrix):
            if not mat:
                continue
            buf *= mu
            buf += g
            update = g + mu * buf if self.nesterov else buf
            G = update.reshape(p.shape[0], -1)
            O = newton_schulz5(G, self.ns_steps)
            s = dt(self.lr * muon_scale(G.shape, self.scale)) * O.reshape(p.shape)
            p -= s
            steps.append(s.reshape(-1))
        other = [i for i, mat in enumerate(matrix) if not mat]
        if other:
            steps.append(self._adam(params, grads, bufs, state["v"], other, k))
        g = xp.concatenate([gr.reshape(-1) for gr in grads])
        step = xp.concatenate(steps)
        state["k"] = k + 1
        return params, state, {"loss": loss, "grad_norm": xp.sqrt(xp.dot(g, g)), "step_norm": xp.sqrt(xp.dot(step, step))}

    def _adam(self, params, grads, bufs, v, other, k):
        """Standard Adam on the parameters ``other`` (indices), vectorised over their concatenation."""
        xp = array_module(v)
        b1, b2 = self.adam_beta1, self.adam_beta2
        g = xp.concatenate([grads[i].reshape(-1) for i in other])
        m = xp.concatenate([bufs[i].reshape(-1) for i in other])
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = xp.sqrt(v / (1 - b2 ** (k + 1)))
        denom += self.adam_eps
        step = (self.adam_lr / (1 - b1 ** (k + 1))) * m / denom
        start = 0
        for i in other:
            size = params[i].size
            bufs[i][...] = m[start:start + size].reshape(params[i].shape)
            params[i] -= step[start:start + size].reshape(params[i].shape)
            start += size
        return step
