"""SGD with momentum, as the K-BFGS reference code runs it (docs/kbfgs.md section 6).

m <- rho m + (1 - rho) g with g = grad(data loss) + tau theta (an EMA, no bias correction);
theta <- theta - lr m. With ``heavy_ball=True`` the classical m <- rho m + g is used instead.
"""

from __future__ import annotations

from .base import Hyper, Solver, positive, register, unit_interval


@register
class SGD(Solver):
    name = "sgd"
    summary = "SGD with EMA momentum (the K-BFGS paper's SGD-m baseline)"
    hyperparameters = {
        "lr": positive("learning rate alpha", 0.01),
        "momentum": unit_interval("momentum rho (EMA form m = rho m + (1 - rho) g)", 0.9),
        "heavy_ball": Hyper(False, "use heavy-ball momentum m = rho m + g instead of the EMA form"),
    }

    def init(self, params):
        return {"m": self.model.flatten(params) * 0, "k": 0}

    def step(self, params, state, x, y):
        model = self.model
        loss, grads = model.loss_and_grad(params, x, y)
        g = model.flatten(grads)
        m = state["m"]
        m *= self.momentum
        m += g if self.heavy_ball else (1 - self.momentum) * g
        step = self.lr * m
        for p, s in zip(params, model.unflatten(step)):
            p -= s
        state["k"] += 1
        return params, state, {"loss": loss, "grad_norm": (g @ g) ** 0.5, "step_norm": (step @ step) ** 0.5}
