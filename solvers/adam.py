"""Adam, in the K-BFGS paper's variant and in the standard form (docs/kbfgs.md section 6, docs/kbfgs.md pitfall 15).

``variant="paper"`` (the reference code's ``RMSprop_update`` used for Adam): the second moment is
taken of the **bias-corrected momentum**, with beta2 = 0.9 and a tuned epsilon (default 1e-4):

    m  <- rho m + (1 - rho) g                     (rho = 0.9; the shared EMA momentum)
    m^ = m / (1 - rho^(k+1))
    v  <- beta2 v + (1 - beta2) m^ * m^,  v^ = v / (1 - beta2^(k+1))
    theta <- theta - alpha m^ / (sqrt(v^) + epsilon)

``variant="standard"`` (Kingma & Ba 2015, Algorithm 1): v of the raw gradient, beta2 = 0.999,
epsilon = 1e-8:

    m <- beta1 m + (1 - beta1) g,  v <- beta2 v + (1 - beta2) g * g,
    theta <- theta - alpha (m / (1 - beta1^(k+1))) / (sqrt(v / (1 - beta2^(k+1))) + epsilon)

beta2 and epsilon default to the variant's values when not given. g = grad(data loss) + tau theta.
"""

from __future__ import annotations

from engine.backend import array_module

from .base import Hyper, Solver, positive, register, unit_interval

__all__ = ["Adam"]

_VARIANT_DEFAULTS = {"paper": {"beta2": 0.9, "epsilon": 1e-4}, "standard": {"beta2": 0.999, "epsilon": 1e-8}}


class _OptionalFloat(Hyper):
    """A float hyper-parameter whose default (None) depends on another one."""

    def validate(self, name, value):
        if value is None:
            return None
        return Hyper(0.0, self.help, self.check, self.requirement, float).validate(name, value)


@register
class Adam(Solver):
    name = "adam"
    summary = "Adam: the K-BFGS paper's variant (v of the bias-corrected momentum, beta2 = 0.9) or the standard one"
    hyperparameters = {
        "lr": positive("learning rate alpha", 1e-3),
        "momentum": unit_interval("momentum rho = beta1 (EMA m = rho m + (1 - rho) g)", 0.9),
        "beta2": _OptionalFloat(None, "EMA decay of the second moment (default: 0.9 paper, 0.999 standard)",
                                lambda v: 0 <= v < 1, "in [0, 1)"),
        "epsilon": _OptionalFloat(None, "epsilon added to sqrt(v^) (default: 1e-4 paper, 1e-8 standard)",
                                  lambda v: v > 0, "> 0"),
        "variant": Hyper("paper", "'paper' (reference code: v of the bias-corrected momentum) or 'standard' (Kingma & Ba)",
                         lambda v: v in _VARIANT_DEFAULTS, "'paper' or 'standard'"),
    }

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        for key, value in _VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
                self.hyper[key] = value

    def init(self, params):
        xp = array_module(*params)
        zeros = xp.zeros(self.model.n_params, dtype=params[0].dtype)
        return {"k": 0, "m": zeros, "v": zeros.copy()}

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])
        loss, grads = model.loss_and_grad(params, x, y)
        g = xp.concatenate([gr.reshape(-1) for gr in grads])
        m, v = state["m"], state["v"]
        rho, beta2 = self.momentum, self.beta2
        m *= rho
        m += (1 - rho) * g
        m_hat = m / (1 - rho ** (k + 1))
        second = m_hat if self.variant == "paper" else g
        v *= beta2
        v += (1 - beta2) * (second * second)
        denom = xp.sqrt(v / (1 - beta2 ** (k + 1)))
        denom += self.epsilon
        step = self.lr * m_hat / denom
        for p, s in zip(params, model.unflatten(step)):
            p -= s
        state["k"] = k + 1
        return params, state, {"loss": loss, "grad_norm": xp.sqrt(xp.dot(g, g)), "step_norm": xp.sqrt(xp.dot(step, step))}
