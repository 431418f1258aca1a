"""K-FAC as the K-BFGS reference code runs it (kbfgs.md section 6; Martens & Grosse, "Optimizing
Neural Networks with Kronecker-factored Approximate Curvature", ICML 2015, arXiv:1503.05671).

Per Kronecker layer (Dense; Conv2d below), with homogeneous weights W~ = [W | b] and the EMA momentum M^ = [m_W | m_b]:

    A <- 0.9 A + 0.1 (1/N) a~^T a~,         G <- 0.9 G + 0.1 (1/N) sum_n g_n g_n^T,
    W~ <- W~ - alpha (G + sqrt(lambda) I)^{-1} M^ (A + sqrt(lambda) I)^{-1}

* Fisher with **sampled** targets: Bernoulli(sigmoid(z)) for the logistic loss, N(z, 1) for
  half-MSE (``loss.sample_targets``); the sampled loss is back-propagated through the forward
  pass of the gradient (one forward, two backward passes), g_n = N dL_sampled/dz_n.
* Warm start: A and G averaged over one pass over the data at the initial weights (sampled
  targets).
* Tikhonov damping split as sqrt(lambda) on each factor; inverses recomputed when
  k % inverse_freq == 0 or k <= inverse_freq (inverse_freq = 20).
* No KL clipping, no adaptive damping, no rescaling (as the reference code).

Conv2d layers: KFC (Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers", ICML 2016, section 3.1, spatially homogeneous and uncorrelated
derivatives) through the same formulas on the layer's Kronecker rows, one per (example n,
location t), N L rows (:meth:`engine.conv.Conv2d.kron_rows`): a~ the homogeneous patch and
g = N sqrt(L) dL_sampled/dz_{n,t} = sqrt(L) Ds_{n,t}, so with the statistics' 1/(N L)

    A = E_{n,t}[a~ a~^T],     G = E_n[sum_t Ds_t Ds_t^T],     A (x) G = KFC's Omega (x) Gamma,

and the step is (G + sqrt(lambda) I)^{-1} [M_W | m_b] (A + sqrt(lambda) I)^{-1} with M_W the
momentum of W reshaped to C_out x (C_in kh kw).

State: ``k``, ``warm_started``, ``m``, ``rng`` (PCG64 words of the target-sampling generator,
:func:`solvers.base.rng_state_array`) and per Kronecker layer i ``layer{i}/A``, ``layer{i}/G``,
``layer{i}/A_inv``, ``layer{i}/G_inv``. Info: ``inverses_refreshed``.

Host synchronisation: none in a step between inverse refreshes. The sampled targets are drawn on
the host from the PCG64 generator kept in the state (``rng``: the reference code's stream, the same
draws on NumPy and on a GPU, exactly resumable) and copied to the parameters' device by the loss
(``sample_targets``): one host-to-device copy per step, which does not wait for the device. A
refresh inverts the damped factors of all layers together with
:func:`engine.curvature.kronecker.factor_inverses`, which checks them on the host in one sync.
"""

from __future__ import annotations

import math

import numpy

from engine.backend import array_module
from engine.curvature.kronecker import KroneckerBlockOperator, factor_inverses, kron_factors

from ._factors import check_real_params, ema_, flush_subnormals_, kron_layers
from .base import Hyper, Solver, positive, register, rng_from_state_array, rng_state_array, unit_interval
from .bfgs import symmetrize

__all__ = ["KFAC"]


@register
class KFAC(Solver):
    name = "kfac"
    summary = "K-FAC with sampled-target Fisher, as in the K-BFGS paper's baseline"
    needs_warm_start = True
    reference_draws_per_batch = 1
    hyperparameters = {
        "lr": positive("learning rate alpha", 1.0),
        "damping": positive("damping lambda: sqrt(lambda) is added to A and to G", 3.0),
        "momentum": unit_interval("gradient momentum rho (EMA form m = rho m + (1 - rho) g, no bias correction)", 0.9),
        "A_decay": unit_interval("EMA decay of A", 0.9),
        "G_decay": unit_interval("EMA decay of G", 0.9),
        "inverse_freq": positive("recompute the damped factor inverses every this many iterations (and at k <= it)", 20, type=int),
        "seed": Hyper(9999, "seed of the generator that samples the Fisher targets", lambda v: v >= 0, ">= 0", int),
        "flush_subnormals": Hyper(True, "flush subnormal entries of the EMA'd factors to zero (pitfall 19)"),
    }

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        self.kron = kron_layers(self.name, model)
        self.sqrt_damping = math.sqrt(self.damping)
        kron_params = {model.layer_param_index[i] + j for i in self.kron for j in range(2)}
        self.other_params = [k for k in range(len(model.shapes)) if k not in kron_params]

    def init(self, params) -> dict:
        check_real_params(self.name, params)
        xp = array_module(*params)
        dtype = params[0].dtype
        state = {"k": 0, "warm_started": False, "m": xp.zeros(self.model.n_params, dtype=dtype),
                 "rng": rng_state_array(numpy.random.default_rng(self.seed))}
        for i in self.kron:
            layer = self.model.layers[i]
            d_a, d_g = layer.d_in + 1, layer.d_out
            state[f"layer{i}/A"] = xp.zeros((d_a, d_a), dtype=dtype)
            state[f"layer{i}/G"] = xp.zeros((d_g, d_g), dtype=dtype)
            state[f"layer{i}/A_inv"] = xp.zeros((d_a, d_a), dtype=dtype)
            state[f"layer{i}/G_inv"] = xp.zeros((d_g, d_g), dtype=dtype)
        return state

    def _sampled_captures(self, params, fwd, rng):
        """Captures of the backward pass of the loss with targets sampled from the model."""
        targets = self.model.loss_fn.sample_targets(fwd.out, rng)
        _, dout = self.model.loss_fn.value_and_grad(fwd.out, targets)
        return self.model.backward(params, fwd, dout, param_grads=False, capture=True).captures

    def warm_start(self, params, state, batches) -> dict:
        """A and G averaged over one pass over the data at the initial weights (sampled targets)."""
        rng = rng_from_state_array(state["rng"])
        sums, count = None, 0
        for x, _ in batches:
            fwd = self.model.forward_pass(params, x, kron_outputs=True)
            caps = self._sampled_captures(params, fwd, rng)
            factors = kron_factors(caps, which=("A", "G"))
            if sums is None:
                sums = [(f.A, f.G) for f in factors]
            else:
                for (A, G), f in zip(sums, factors):
                    A += f.A
                    G += f.G
            count += 1
        if count == 0:
            raise ValueError("kfac.warm_start got no batches; pass one epoch of (x, y) minibatches")
        for i, (A, G) in zip(self.kron, sums):
            for name, F in (("A", A), ("G", G)):
                F /= count
                if self.flush_subnormals:
                    flush_subnormals_(F)
                state[f"layer{i}/{name}"] = F
        state["rng"] = rng_state_array(rng)
        state["warm_started"] = True
        return state

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])

        # one forward; backward of the true loss (gradient, with tau theta) and of the sampled loss
        fwd = model.forward_pass(params, x, y, kron_outputs=True)
        loss, grads, caps = model.loss_and_grad(params, x, y, regularized=True, capture=True, forward=fwd)
        m = state["m"]
        m_views = model.unflatten(m)
        grad_sq = 0
        for mv, g in zip(m_views, grads):
            gf = g.reshape(-1)
            grad_sq = grad_sq + xp.dot(gf, gf)
            ema_(mv, g, self.momentum)

        rng = rng_from_state_array(state["rng"])
        caps_sampled = self._sampled_captures(params, fwd, rng)
        state["rng"] = rng_state_array(rng)
        # A from the data pass (identical rows), G from the sampled pass
        a_factors = kron_factors(caps, which="A")
        g_factors = kron_factors(caps_sampled, which="G")

        refresh = k % self.inverse_freq == 0 or k <= self.inverse_freq
        factors = []
        for fa, fg in zip(a_factors, g_factors):
            i = fa.layer
            A = ema_(state[f"layer{i}/A"], fa.A, self.A_decay)
            G = ema_(state[f"layer{i}/G"], fg.G, self.G_decay)
            if self.flush_subnormals:
                flush_subnormals_(A)
                flush_subnormals_(G)
            factors.append((i, A, G))
        if refresh:
            self._refresh_inverses(state, factors)
        step_sq = 0
        for i, _, _ in factors:
            layer = model.layers[i]
            M = layer.to_matrix(model.layer_params(m_views, i))
            P = state[f"layer{i}/G_inv"] @ M @ state[f"layer{i}/A_inv"]
            Pf = P.reshape(-1)
            step_sq = step_sq + xp.dot(Pf, Pf)
            dW, db = layer.from_matrix(P)
            W, b = model.layer_params(params, i)
            W -= self.lr * dW
            b -= self.lr * db
        for j in self.other_params:
            params[j] -= self.lr * m_views[j]
            step_sq = step_sq + (m_views[j] * m_views[j]).sum()

        state["k"] = k + 1
        info = {"loss": loss, "grad_norm": xp.sqrt(grad_sq), "step_norm": self.lr * xp.sqrt(step_sq),
                "inverses_refreshed": bool(refresh)}
        return params, state, info

    def _refresh_inverses(self, state, factors):
        """(F + sqrt(lambda) I)^{-1} of every layer's A and G, exactly symmetric.

        All factors go through :func:`engine.curvature.kronecker.factor_inverses` together: one
        host sync per refresh for the checks of all of them, not one per factor.
        """
        damped, names = [], []
        for i, A, G in factors:
            xp = array_module(A)
            for name, F in (("A", A), ("G", G)):
                damped.append(F + self.sqrt_damping * xp.eye(F.shape[0], dtype=F.dtype))
                names.append(f"{name} of layer {i}")
        inverses = factor_inverses(damped, names)
        for (i, _, _), A_inv, G_inv in zip(factors, inverses[0::2], inverses[1::2]):
            state[f"layer{i}/A_inv"] = symmetrize(A_inv)
            state[f"layer{i}/G_inv"] = symmetrize(G_inv)

    def curvature_operator(self, state):
        """The damped block Fisher (G + sqrt(lambda) I) (x) (A + sqrt(lambda) I) of the current state."""
        blocks = {i: (state[f"layer{i}/G"], state[f"layer{i}/A"]) for i in self.kron}
        return KroneckerBlockOperator(self.model, blocks, damping=self.sqrt_damping, missing="identity")
