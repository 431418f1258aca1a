"""RMSprop as the K-BFGS reference code runs it (docs/kbfgs.md section 6, docs/kbfgs.md pitfall 15).

The second moment is of the EMA **momentum**, warm-started by one pass over the data:

    warm start: v = average over all minibatches of g * g at the initial weights
    m <- rho m + (1 - rho) g,   v <- beta2 v + (1 - beta2) m * m,
    theta <- theta - alpha m / (sqrt(v) + epsilon)

with rho = beta2 = 0.9, no bias correction and a tuned epsilon (default 1e-4);
g = grad(data loss) + tau theta.
"""

from __future__ import annotations

from engine.backend import array_module

from .base import Solver, positive, register, unit_interval

__all__ = ["RMSprop"]


@register
class RMSprop(Solver):
    name = "rmsprop"
    summary = "RMSprop on the EMA momentum with a warm-started second moment (the K-BFGS paper's baseline)"
    needs_warm_start = True
    hyperparameters = {
        "lr": positive("learning rate alpha", 1e-3),
        "momentum": unit_interval("momentum rho (EMA m = rho m + (1 - rho) g)", 0.9),
        "beta2": unit_interval("EMA decay of the second moment v", 0.9),
        "epsilon": positive("epsilon added to sqrt(v)", 1e-4),
    }

    def init(self, params):
        xp = array_module(*params)
        zeros = xp.zeros(self.model.n_params, dtype=params[0].dtype)
        return {"k": 0, "warm_started": False, "m": zeros, "v": zeros.copy()}

    def _gradient(self, params, x, y):
        xp = array_module(*params)
        loss, grads = self.model.loss_and_grad(params, x, y)
        return loss, xp.concatenate([g.reshape(-1) for g in grads])

    def warm_start(self, params, state, batches):
        """v = average over the batches of the squared regularised gradient at the initial weights."""
        v, count = state["v"], 0
        v[...] = 0
        for x, y in batches:
            _, g = self._gradient(params, x, y)
            v += g * g
            count += 1
        if count == 0:
            raise ValueError("rmsprop.warm_start got no batches; pass one epoch of (x, y) minibatches")
        v /= count
        state["warm_started"] = True
        return state

    def step(self, params, state, x, y):
        xp = array_module(*params)
        loss, g = self._gradient(params, x, y)
        m, v = state["m"], state["v"]
        m *= self.momentum
        m += (1 - self.momentum) * g
        v *= self.beta2
        v += (1 - self.beta2) * (m * m)
        denom = xp.sqrt(v)
        denom += self.epsilon
        step = self.lr * m / denom
        for p, s in zip(params, self.model.unflatten(step)):
            p -= s
        state["k"] = int(state["k"]) + 1
        return params, state, {"loss": loss, "grad_norm": xp.sqrt(xp.dot(g, g)), "step_norm": xp.sqrt(xp.dot(step, step))}
