"""Sophia-H (Liu, Li, Hall, Liang, Ma, 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training"), the Hutchinson variant, as docs/muon-adahessian-sophia.md describes it.

Per step (k = 0, 1, ... the iterations done; the paper's t = k + 1), gradient g (of the data loss
plus the model's weight decay 0.5 tau ||theta||^2):

    m <- beta1 m + (1 - beta1) g
    every ``hessian_every`` steps (k mod hessian_every == 0, i.e. the paper's t mod k = 1):
        h^ = z * (H z)                           (Hutchinson, one probe at theta on the minibatch)
        h  <- beta2 h + (1 - beta2) h^           (h_0 = 0; no bias correction, as the paper)
    theta <- theta - lr clip(m / max(gamma h, eps), 1)

clip(., 1) clips every coordinate to [-1, 1]; where h <= eps / gamma (flat or negative curvature)
the step is lr sign(m) (for any m with |m| >= eps). The paper's defaults: (beta1, beta2) = (0.965,
0.99), gamma = 0.01 (Sophia-H), eps = 1e-12, k = 10; its learning rates are for GPT-2. Here beta1
defaults to 0.7 and lr to 3e-3, from a sweep over (beta1, lr) on mnist-mlp (docs/muon-adahessian-sophia.md
section 5): in a run of 120 iterations the paper's beta1 = 0.965 averages the gradient over ~29 steps,
a quarter of the run, and the lagging momentum cost ~1.5 points of test accuracy; the rest are the paper's. The paper
draws u ~ N(0, I) for its Hutchinson estimator; Rademacher signs, used here, are equally unbiased
for diag H and have lower variance. The paper's decoupled weight decay is the model's tau here.

H z comes from the curvature-operator interface (``curvature`` = "cs", "fd-central", "rop"; see
:mod:`solvers.adahessian`), the probe from the PCG64 generator kept in the state (``rng``), drawn
on the host and copied to the device once per Hessian step.

State: ``k``, ``m``, ``h`` (flat, on the parameters' module), ``rng`` (6 uint64 words, host).
"""

from __future__ import annotations

import numpy

from engine.backend import array_module

from .adahessian import curvature_hyper, diagonal_sample, seed_hyper
from .base import Hyper, Solver, positive, register, rng_state_array, unit_interval

__all__ = ["Sophia"]


@register
class Sophia(Solver):
    name = "sophia"
    summary = "Sophia-H: momentum over an EMA of a Hutchinson Hessian diagonal, clipped per coordinate"
    hyperparameters = {
        "lr": positive("learning rate eta (the largest step per coordinate; tuned on mnist-mlp)", 3e-3),
        "beta1": unit_interval("EMA decay of the gradient (the paper: 0.965; tuned on mnist-mlp)", 0.7),
        "beta2": unit_interval("EMA decay of the Hessian-diagonal estimate", 0.99),
        "gamma": positive("gamma (rho in the authors' code): the update is clip(m / max(gamma h, eps), 1)", 0.01),
        "eps": positive("epsilon floor of gamma h", 1e-12),
        "hessian_every": Hyper(10, "estimate the Hessian diagonal every k steps", lambda v: v >= 1, ">= 1", int),
        "curvature": curvature_hyper(),
        "seed": seed_hyper(),
    }

    def init(self, params):
        xp = array_module(*params)
        zeros = xp.zeros(self.model.n_params, dtype=params[0].dtype)
        return {"k": 0, "m": zeros, "h": zeros.copy(), "rng": rng_state_array(numpy.random.default_rng(self.seed))}

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        dtype = params[0].dtype
        k = int(state["k"])
        loss, grads = model.loss_and_grad(params, x, y)
        g = model.flatten(grads)
        m, h = state["m"], state["h"]
        m *= self.beta1
        m += (1 - self.beta1) * g
        if k % self.hessian_every == 0:
            h_hat = diagonal_sample(model, params, x, y, self.curvature, state)
            h *= self.beta2
            h += (1 - self.beta2) * h_hat
        denom = xp.maximum(dtype.type(self.gamma) * h, dtype.type(self.eps))
        step = xp.clip(m / denom, -1, 1)
        step *= dtype.type(self.lr)
        for p, s in zip(params, model.unflatten(step)):
            p -= s
        state["k"] = k + 1
        return params, state, {"loss": loss, "grad_norm": xp.sqrt(xp.dot(g, g)), "step_norm": xp.sqrt(xp.dot(step, step)),
                               "hessian_refreshed": k % self.hessian_every == 0}
