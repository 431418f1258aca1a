"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, AAAI 2021, "ADAHESSIAN: An Adaptive
Second Order Optimizer for Machine Learning"), as docs/muon-adahessian-sophia.md describes it.

Per step t = k + 1 on the minibatch, gradient g_t (of the data loss plus the model's weight decay
0.5 tau ||theta||^2, so tau also enters the Hessian as tau I), one Rademacher probe z:

    D_t     = z * (H_t z)                                  (Hutchinson, one probe: E[D_t] = diag H_t)
    D^(s)_t = D_t averaged over each conv kernel's spatial block (kh x kw), broadcast back
              (the paper's spatial averaging, block size b = kh kw; other parameters: D^(s) = D)
    m_t = beta1 m_{t-1} + (1 - beta1) g_t
    v_t = beta2 v_{t-1} + (1 - beta2) D^(s)_t * D^(s)_t
    theta_{t+1} = theta_t - lr (m_t / (1 - beta1^t)) / ((sqrt(v_t / (1 - beta2^t)))^k + eps)

(k = ``hessian_power``; paper defaults (beta1, beta2) = (0.9, 0.999), eps = 1e-4, k = 1, lr = 0.15; lr
defaults to 0.12 here, the best of a sweep on mnist-mlp, docs/muon-adahessian-sophia.md.)
The spatial average is of the signed D, as the paper's formula writes it; the authors' code
averages |D| instead, which differs only where a kernel block mixes signs (v squares either).

H_t z comes from the curvature-operator interface (DESIGN.md convention 4) built on the minibatch
at theta_t: ``curvature="cs"`` :class:`engine.curvature.HessianCS` (complex step, exact to
rounding), ``"fd-central"`` :class:`engine.curvature.HessianFD` (central differences; its default
step reads ||theta|| on the host once per construction) or ``"rop"``
:class:`engine.curvature.HessianRop` (Pearlmutter's R-operator). The probes are drawn on the host
by a PCG64 generator whose words live in the state (``rng``) and reach the device in one copy of
int8 signs, so a resumed run draws the same probes and continues bit for bit.

State: ``k``, ``m``, ``v`` (flat, on the parameters' module), ``rng`` (6 uint64 words, host).
"""

from __future__ import annotations

import numpy

from engine.backend import array_module
from engine.curvature import HessianCS, HessianFD, HessianRop

from .base import Hyper, Solver, positive, register, rng_from_state_array, rng_state_array, unit_interval

__all__ = ["AdaHessian", "CURVATURES", "hessian_operator", "rademacher_probe", "hutchinson_diagonal_sample", "diagonal_sample",
           "curvature_hyper", "seed_hyper"]

#: the Hessian-vector products AdaHessian and Sophia can take (``curvature`` hyper-parameter)
CURVATURES = ("cs", "fd-central", "rop")


def curvature_hyper() -> Hyper:
    return Hyper("cs", "Hessian-vector products: 'cs' complex step, 'fd-central' central differences, "
                 "'rop' R-operator", lambda v: v in CURVATURES, "'cs', 'fd-central' or 'rop'")


def seed_hyper() -> Hyper:
    return Hyper(0, "seed of the generator that draws the Rademacher probes", lambda v: v >= 0, ">= 0", int)


def hessian_operator(model, params, x, y, curvature: str):
    """The Hessian of the regularised minibatch loss at ``params`` as a curvature operator."""
    if curvature == "cs":
        return HessianCS(model, params, x, y)
    if curvature == "fd-central":
        return HessianFD(model, params, x, y, scheme="central")
    if curvature == "rop":
        return HessianRop(model, params, x, y)
    raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")


def rademacher_probe(rng: numpy.random.Generator, n: int, xp, dtype):
    """n independent +-1 signs from ``rng``, drawn on the host, one host-to-device copy (int8), cast there."""
    signs = rng.integers(0, 2, size=n, dtype=numpy.int8)
    signs *= 2
    signs -= 1
    return xp.asarray(signs).astype(dtype)


def hutchinson_diagonal_sample(op, z):
    """z * (H z): one Hutchinson sample of diag H (Bekas, Kokiopoulou, Saad 2007); unbiased for Rademacher z."""
    return z * op.matvec(z)


def diagonal_sample(model, params, x, y, curvature: str, state: dict):
    """One Hutchinson sample z * (H z) of the Hessian diagonal at ``params`` on the batch, its probe drawn
    from the generator words ``state["rng"]``, which advance (so a resumed run draws the same probes)."""
    xp = array_module(*params)
    rng = rng_from_state_array(state["rng"])
    z = rademacher_probe(rng, model.n_params, xp, params[0].dtype)
    state["rng"] = rng_state_array(rng)
    return hutchinson_diagonal_sample(hessian_operator(model, params, x, y, curvature), z)


def spatial_average(model, d) -> None:
    """In place on the flat vector ``d``: every 4-axis parameter (a conv kernel c_out x c_in x kh x kw)
    replaced by its mean over each kh x kw block (AdaHessian's spatial averaging)."""
    for view, shape in zip(model.unflatten(d), model.shapes):
        if len(shape) == 4:
            view[...] = view.mean(axis=(2, 3), keepdims=True)


@register
class AdaHessian(Solver):
    name = "adahessian"
    summary = "AdaHessian: Adam with the RMS of a Hutchinson Hessian-diagonal estimate (spatially averaged) for v"
    hyperparameters = {
        "lr": positive("learning rate eta (the paper: 0.15; tuned on mnist-mlp)", 0.12),
        "beta1": unit_interval("EMA decay of the gradient (first moment)", 0.9),
        "beta2": unit_interval("EMA decay of the squared Hessian diagonal (second moment)", 0.999),
        "eps": positive("epsilon added to the denominator", 1e-4),
        "hessian_power": Hyper(1.0, "Hessian power k in [0, 1] (v^k; 1 = full curvature, 0 = momentum SGD)",
                               lambda v: 0 <= v <= 1, "in [0, 1]", float),
        "spatial_average": Hyper(True, "average D over each conv kernel's kh x kw block", type=bool),
        "curvature": curvature_hyper(),
        "seed": seed_hyper(),
    }

    def init(self, params):
        xp = array_module(*params)
        zeros = xp.zeros(self.model.n_params, dtype=params[0].dtype)
        return {"k": 0, "m": zeros, "v": zeros.copy(), "rng": rng_state_array(numpy.random.default_rng(self.seed))}

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])
        loss, grads = model.loss_and_grad(params, x, y)
        g = model.flatten(grads)
        d = diagonal_sample(model, params, x, y, self.curvature, state)
        if self.spatial_average:
            spatial_average(model, d)
        m, v = state["m"], state["v"]
        b1, b2 = self.beta1, self.beta2
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (d * d)
        denom = xp.sqrt(v / (1 - b2 ** (k + 1)))
        if self.hessian_power != 1:
            denom **= self.hessian_power
        denom += self.eps
        step = (self.lr / (1 - b1 ** (k + 1))) * m / denom
        for p, s in zip(params, model.unflatten(step)):
            p -= s
        state["k"] = k + 1
        return params, state, {"loss": loss, "grad_norm": xp.sqrt(xp.dot(g, g)), "step_norm": xp.sqrt(xp.dot(step, step))}
