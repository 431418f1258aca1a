"""Generalized Gauss-Newton products J^T H_out J v (Schraudolph 2002; Martens 2010, section 4.2).

J is the Jacobian of the network output with respect to the parameters and H_out the Hessian
of the mean loss with respect to the output (``loss.hessian_vp``). The GGN drops the term of
the Hessian that carries the second derivatives of the network, sum_k (dL/dout_k) grad^2 out_k,
so it is positive semi-definite whenever H_out is (all our losses are convex in the output)
and equals the Hessian when the network is linear in its parameters, or at zero residual.
"""

from __future__ import annotations

from .base import ModelOperator

__all__ = ["GaussNewton"]


class GaussNewton(ModelOperator):
    """G v = J^T H_out J v (+ tau v with weight decay).

    Per product: R-forward J v through the layers' ``jvp`` (Pearlmutter 1994), then
    H_out (J v) by ``loss.hessian_vp``, then an ordinary backward pass with that as the output
    gradient gives J^T (.) (Martens & Sutskever 2012, "Training deep and recurrent networks with
    Hessian-free optimization", section 8). The forward caches are computed once, at
    construction; real arithmetic throughout.
    """

    def __init__(self, model, params, x, y, regularized: bool = True):
        super().__init__(model, params, x, y, regularized)
        self._fwd = model.forward_pass(self.params, self.x, self.y)
        model.loss_fn.check_target(self._fwd.out, self.y)

    def _matvec(self, v):
        model = self.model
        _, jv = model.r_forward(self.params, self._fwd, model.unflatten(v))
        dy = model.loss_fn.hessian_vp(self._fwd.out, self.y, jv)
        grads = model.parallel.mean(model.backward(self.params, self._fwd, dy).grads)  # summed over the ranks' shards
        return self._add_weight_decay(model.flatten(grads), v)
