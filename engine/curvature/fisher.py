"""Fisher information operators: empirical Fisher and the (sampled) true Fisher.

With l_n the loss of example n and grad l_n its gradient with respect to the parameters:

* empirical Fisher (Kunstner, Balles & Hennig 2019, eq. 2): F_emp = (1/N) sum_n grad l_n grad l_n^T
  at the observed targets;
* true Fisher (Martens 2020, "New insights and perspectives on the natural gradient method",
  section 5): F = (1/N) sum_n E_{y~p(y|x_n,w)} [grad l_n(y) grad l_n(y)^T]. :class:`Fisher`
  is its Monte-Carlo estimate with S targets sampled per example from the model's predictive
  distribution (``loss.sample_targets``, seeded), as K-FAC samples its Fisher (Martens & Grosse
  2015, section 5): unbiased, and for our losses (canonical-link exponential families: Bernoulli
  for sigmoid cross-entropy, categorical for softmax, unit-variance Gaussian for half squared
  error) its expectation is exactly the generalized Gauss-Newton matrix
  (:class:`engine.curvature.GaussNewton`, Martens 2020 section 9.2), which is the exact
  expectation form.

Per-example gradients are never formed for Kronecker layers with one row per example (Dense;
``KroneckerLayer.spatial`` false): there grad_W l_n = g_n a_n^T and grad_b l_n = g_n with
g_n = dl_n/dz_n (``Capture.g``) and a_n the layer input, so F v = (1/N) sum_n s_n grad l_n with
s_n = grad l_n . v costs two GEMMs per layer. Models with other parameter layers (convolutions,
whose weight is shared over locations, or layers without a Kronecker view) fall back to one
backward pass per example (stored as an N x n matrix).
"""

from __future__ import annotations

import numpy

from ..layers import KroneckerLayer
from .base import ModelOperator

__all__ = ["EmpiricalFisher", "Fisher"]


def _per_example_rows(layer) -> bool:
    """A Kronecker layer whose captured rows are one per example (its gradient is g_n a~_n^T)."""
    return isinstance(layer, KroneckerLayer) and not layer.spatial


class EmpiricalFisher(ModelOperator):
    """F v = (1/N) sum_n grad l_n (grad l_n . v)  (+ tau v with weight decay), at targets y."""

    def __init__(self, model, params, x, y, regularized: bool = True):
        super().__init__(model, params, x, y, regularized)
        self._build()

    def _build(self):
        model = self.model
        self._factored = all(_per_example_rows(layer) or not layer.param_shapes() for layer in model.layers)
        if self._factored:
            _, _, caps = model.loss_and_grad(self.params, self.x, self.y, regularized=False, capture=True)
            self._rows = [(c.param_index, c.a, c.g) for c in caps]
            self._n = int(self.x.shape[0])
            self._per_example = None
        else:
            self._per_example = self._per_example_loop()
            self._n = self._per_example.shape[0]

    def _per_example_loop(self):
        xp, model = self.xp, self.model
        rows = []
        for i in range(self.x.shape[0]):
            _, g = model.loss_and_grad(self.params, self.x[i:i + 1], self.y[i:i + 1], regularized=False)
            rows.append(model.flatten(g))
        return xp.stack(rows)

    def per_example_gradients(self):
        """The N x n matrix whose rows are grad l_n (for small models and checks)."""
        if self._per_example is not None:
            return self._per_example
        n = self._n
        cols = [None] * len(self.params)
        for pi, a, g in self._rows:
            cols[pi] = (g[:, :, None] * a[:, None, :]).reshape(n, -1)
            cols[pi + 1] = g
        return self.xp.concatenate(cols, axis=1)  # not cached: _matvec keeps the factored product

    def _matvec(self, v):
        xp, model = self.xp, self.model
        if self._per_example is not None:
            P = self._per_example
            out = P.T @ (P @ v)
            out /= self._n
            return self._add_weight_decay(out, v)
        vs = model.unflatten(v)
        s = xp.zeros(self._n, dtype=self.dtype)
        for pi, a, g in self._rows:  # s_n = grad l_n . v = g_n^T V_W a_n + g_n . v_b
            s += ((a @ vs[pi].T) * g).sum(axis=1)
            s += g @ vs[pi + 1]
        s /= self._n
        out = model.zeros_like_params(self.params)
        for pi, a, g in self._rows:  # (1/N) sum_n s_n g_n a_n^T and (1/N) sum_n s_n g_n
            gs = g * s[:, None]
            out[pi][...] = gs.T @ a
            out[pi + 1][...] = gs.sum(axis=0)
        return self._add_weight_decay(model.flatten(out), v)


class Fisher(EmpiricalFisher):
    """Monte-Carlo true Fisher: the empirical Fisher at targets sampled from the model.

    ``seed``: an int or a ``numpy.random.Generator`` (host RNG; the draws are reproducible for a
    given seed). ``n_samples``: targets drawn per example (S); the estimate averages the N S
    outer products. Its expectation over the draws is the GGN (module docstring). The sampled
    targets are kept in ``self.targets`` (N S rows, example-major within each of the S copies).
    ``target_rng``: "host" (default) draws the targets from that generator on the host and copies
    them to the arrays' device; "device" takes one 63-bit key from it and draws them where the
    arrays live (``loss.sample_targets_keyed``, SplitMix64 of (key, entry): the same numbers on
    NumPy and CuPy, nothing copied; as K-FAC's ``target_rng="device"``).
    """

    def __init__(self, model, params, x, seed=0, n_samples: int = 1, regularized: bool = True, target_rng: str = "host"):
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if target_rng not in ("host", "device"):
            raise ValueError(f"target_rng must be 'host' or 'device', got {target_rng!r}")
        self.n_samples = int(n_samples)
        self.rng = seed if isinstance(seed, numpy.random.Generator) else numpy.random.default_rng(seed)
        ModelOperator.__init__(self, model, params, x, None, regularized)
        if self.n_samples > 1:
            self.x = self.xp.concatenate([self.x] * self.n_samples, axis=0)
        out = model.predict(self.params, self.x)
        if target_rng == "device":
            self.y = self.targets = model.loss_fn.sample_targets_keyed(out, int(self.rng.integers(0, 2 ** 63)))
        else:
            self.y = self.targets = model.loss_fn.sample_targets(out, self.rng)
        self._build()
