"""K-FAC as the K-BFGS reference code runs it (docs/kbfgs.md section 6; Martens & Grosse, "Optimizing
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

State (:class:`solvers.kronecker_solver.KroneckerSolver`): ``k``, ``warm_started``, ``m``, ``rng``
(PCG64 words of the target-sampling generator, :func:`solvers.base.rng_state_array`) and per
Kronecker layer i ``layer{i}/A``, ``layer{i}/G``, ``layer{i}/A_inv``, ``layer{i}/G_inv`` (keys by
:func:`solvers.kronecker_solver.layer_key`). Info: ``inverses_refreshed``.

The step goes through :class:`engine.curvature.KroneckerBlockOperator` with the cached damped
inverses as inverse factors, in the order (G_inv M^) A_inv (``block_order = "left_first"``);
:meth:`KFAC.curvature_operator` is the damped curvature itself.

Host synchronisation: none in a step between inverse refreshes. The sampled targets are drawn on
the host from the PCG64 generator kept in the state (``rng``: the reference code's stream, the same
draws on NumPy and on a GPU, exactly resumable) and copied to the parameters' device by the loss
(``sample_targets``): one host-to-device copy per step, which does not wait for the device. With
``target_rng="device"`` the generator gives one 63-bit key per step instead and the targets are
drawn on the device (``sample_targets_keyed``: SplitMix64 of (key, entry), the same numbers on
NumPy and CuPy, exactly resumable, one fused kernel and no copy; not the reference stream). A
refresh inverts the damped factors of all layers together with
:func:`engine.curvature.kronecker.factor_inverses`, which checks them on the host in one sync.
"""

from __future__ import annotations

import numpy

from engine.backend import array_module
from engine.curvature.kronecker import KroneckerBlockOperator, ema_, factor_inverses, flush_subnormals_, kron_factors

from .base import Hyper, positive, register, rng_from_state_array, rng_state_array, unit_interval
from .bfgs import symmetrize
from .kronecker_solver import KroneckerSolver, layer_key

__all__ = ["KFAC"]


@register
class KFAC(KroneckerSolver):
    name = "kfac"
    summary = "K-FAC with sampled-target Fisher, as in the K-BFGS paper's baseline"
    block_order = "left_first"  # (G_inv M^) A_inv
    hyperparameters = {
        "lr": positive("learning rate alpha", 1.0),
        "damping": positive("damping lambda: sqrt(lambda) is added to A and to G", 3.0),
        "momentum": unit_interval("gradient momentum rho (EMA form m = rho m + (1 - rho) g, no bias correction)", 0.9),
        "A_decay": unit_interval("EMA decay of A", 0.9),
        "G_decay": unit_interval("EMA decay of G", 0.9),
        "inverse_freq": positive("recompute the damped factor inverses every this many iterations (and at k <= it)", 20, type=int),
        "seed": Hyper(9999, "seed of the generator that samples the Fisher targets", lambda v: v >= 0, ">= 0", int),
        "target_rng": Hyper("host", "where the Fisher targets are drawn: 'host' (the PCG64 stream of the reference code, "
                            "copied to the device every step) or 'device' (one key per step from that generator, the "
                            "targets drawn on the device by a counter-based generator: no copy)",
                            lambda v: v in ("host", "device"), "'host' or 'device'"),
        "flush_subnormals": Hyper(True, "flush subnormal entries of the EMA'd factors and of the momentum to zero (docs/kbfgs.md pitfall 19)"),
    }

    # --- KroneckerSolver hooks ----------------------------------------------------------------
    def global_state(self) -> dict:
        return {"rng": rng_state_array(numpy.random.default_rng(self.seed))}

    def init_layer(self, layer, xp, dtype) -> dict:
        d_a, d_g = layer.d_in + 1, layer.d_out
        return {"A": xp.zeros((d_a, d_a), dtype=dtype), "G": xp.zeros((d_g, d_g), dtype=dtype),
                "A_inv": xp.zeros((d_a, d_a), dtype=dtype), "G_inv": xp.zeros((d_g, d_g), dtype=dtype)}

    def step_factors(self, state, i) -> tuple:
        return state[layer_key(i, "G_inv")], state[layer_key(i, "A_inv")]

    def step_keys(self, state, i) -> list:
        return [layer_key(i, "A_inv"), layer_key(i, "G_inv")]

    def factor_cost(self, i) -> float:
        layer = self.model.layers[i]
        return float((layer.d_in + 1) ** 3 + layer.d_out ** 3)  # the inversions

    def _sampled_captures(self, params, fwd, rng):
        """Captures of the backward pass of the loss with targets sampled from the model."""
        parallel = self.model.parallel  # data parallel: every rank draws the single-process targets of its rows
        if self.target_rng == "device":
            # one 63-bit key per draw from the state's generator (so a resumed run draws the same keys)
            targets = self.model.loss_fn.sample_targets_keyed(fwd.out, int(rng.integers(0, 2 ** 63)), first_row=parallel.rows[0])
        else:
            targets = self.model.loss_fn.sample_targets(fwd.out, parallel.generator(rng))
        _, dout = self.model.loss_fn.value_and_grad(fwd.out, targets)
        return self.model.backward(params, fwd, dout, param_grads=False, capture=True).captures

    def warm_start(self, params, state, batches) -> dict:
        """A and G averaged over one pass over the data at the initial weights (sampled targets)."""
        rng = rng_from_state_array(state["rng"])

        def statistics(params, x):
            caps = self._sampled_captures(params, self.model.forward_pass(params, x, kron_outputs=True), rng)
            return [{"A": f.A, "G": f.G} for f in kron_factors(caps, which=("A", "G"))]

        state = self.average_statistics(params, state, batches, statistics)
        state["rng"] = rng_state_array(rng)
        return state

    # --- the iteration ------------------------------------------------------------------------
    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])

        # one forward; backward of the true loss (gradient, with tau theta) and of the sampled loss
        fwd = model.forward_pass(params, x, y, kron_outputs=True)
        loss, grads, caps = model.loss_and_grad(params, x, y, regularized=True, capture=True, forward=fwd)
        m_views, grad_sq = self.momentum_(state, grads)
        rng = rng_from_state_array(state["rng"])
        caps_sampled = self._sampled_captures(params, fwd, rng)
        state["rng"] = rng_state_array(rng)

        # A from the data pass (identical rows), G from the sampled pass; EMAs, then the inverses
        if model.parallel.active:  # the global batch's, all layers in one packed reduction
            stats = kron_factors(caps, which="A") + kron_factors(caps_sampled, which="G")
            model.parallel.mean_fields(stats, ("A", "G"))
            pairs = zip(stats[:len(caps)], stats[len(caps):])
        else:  # one layer's batch statistics at a time (peak memory)
            pairs = ((kron_factors([ca], which="A")[0], kron_factors([cg], which="G")[0]) for ca, cg in zip(caps, caps_sampled))
        for fa, fg in pairs:
            for name, new, decay in (("A", fa.A, self.A_decay), ("G", fg.G, self.G_decay)):
                F = ema_(state[layer_key(fa.layer, name)], new, decay)
                if self.flush_subnormals:
                    flush_subnormals_(F)
        del fwd, caps, caps_sampled, pairs  # the pass's rows and caches: not held through the refresh
        refresh = k % self.inverse_freq == 0 or k <= self.inverse_freq
        if refresh:
            self._refresh_inverses(state)
        step_norm = self.apply_step_(params, m_views, self.step_operator(state))

        state["k"] = k + 1
        info = {"loss": loss, "grad_norm": xp.sqrt(grad_sq), "step_norm": step_norm, "inverses_refreshed": bool(refresh)}
        return params, state, info

    def _refresh_inverses(self, state):
        """(F + sqrt(lambda) I)^{-1} of every layer's A and G, exactly symmetric.

        On a device all factors go through :func:`engine.curvature.kronecker.factor_inverses`
        together: one host sync per refresh for the checks of all of them, not one per factor. On
        NumPy they go one at a time (the same inverses), which keeps the peak memory down.
        """
        plan = self.factor_plan()  # KAISA: each rank inverts its own layers' factors and shares them
        keys = [(layer_key(i, name), layer_key(i, name + "_inv"), f"{name} of layer {i}")
                for i in self.kron if plan is None or plan.owns(i) for name in ("A", "G")]
        if keys and array_module(state[keys[0][0]]) is numpy:
            # on the host a status costs nothing to read: one factor at a time, each inverse replacing
            # the old one at once, so the damped copies and new inverses of all the layers are never
            # held together (about 50 MB of the MNIST autoencoder's peak memory)
            for key, inv_key, name in keys:
                state[inv_key] = symmetrize(factor_inverses([self._damped(state[key])], [name])[0])
        elif keys:  # a device: every factor's status in one host sync
            inverses = factor_inverses([self._damped(state[key]) for key, _, _ in keys], [name for _, _, name in keys])
            for (_, inv_key, _), inv in zip(keys, inverses):
                state[inv_key] = symmetrize(inv)
        if plan is not None:
            plan.share_factors(state, lambda i: self.step_keys(state, i))

    def _damped(self, F):
        """F + sqrt(lambda) I, a new array."""
        xp = array_module(F)
        return F + self.sqrt_damping * xp.eye(F.shape[0], dtype=F.dtype)

    def curvature_operator(self, state):
        """The damped block Fisher (G + sqrt(lambda) I) (x) (A + sqrt(lambda) I) of the current state."""
        blocks = {i: (state[layer_key(i, "G")], state[layer_key(i, "A")]) for i in self.kron}
        return KroneckerBlockOperator(self.model, blocks, damping=self.sqrt_damping, missing="identity")
