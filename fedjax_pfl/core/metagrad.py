"""The nu-step meta-gradient of ONE client: exact, first-order or Hessian-free.

For F(w) = f(w^(nu); D') with w^(0) = w and w^(j+1) = w^(j) - alpha grad f(w^(j); D_j),
  grad F(w) = (I - alpha H(w^(0))) ... (I - alpha H(w^(nu-1))) grad f(w^(nu); D'),
with the Hessian factor j evaluated on a batch D''_j (independent of D_j in
Per-FedAvg, or D_j itself, MAML-style). Used by `algorithms.meta_fl`.
"""

from __future__ import annotations

import jax

MODES = ("exact", "fo", "hf")


def meta_gradient(loss, params, inner, outer, hessian=None, *, alpha, mode: str = "exact",
                  delta=1e-3, remat: bool = False):
    """The nu-step meta-gradient of `loss(w^(nu)(params), outer)` for one client.

    Args:
      loss: `loss(params, batch) -> scalar`.
      params: the point w^(0).
      inner: the nu inner batches, leaves [nu, ...].
      outer: the outer batch D'.
      hessian: the nu Hessian batches D''_j (leaves [nu, ...]); None: `inner`.
      alpha: the inner step size.
      mode: "exact" (autodiff through a `lax.scan` of the nu steps), "fo"
        (Hessian factors dropped: grad f(w^(nu); D')) or "hf" (each factor
        applied backward through the stored iterates w^(j) to the
        back-propagated vector v by central differences
        [grad f(w^(j) + delta v) - grad f(w^(j) - delta v)] / (2 delta)).
      delta: the finite-difference step of "hf".
      remat: rematerialize each inner step (`jax.checkpoint`) in "exact" mode.

    Returns:
      (loss at w^(nu) on `outer`, meta-gradient with the structure of params).
    """
    shared = hessian is None
    hessian = inner if shared else hessian
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - alpha * b, p, g)
    grad = jax.grad(loss)

    if mode == "exact":
        def step(p, batches):
            if shared:
                return sgd(p, grad(p, batches)), None
            b, bh = batches
            # Straight-through: the value steps with D, the derivative sees D''
            # (its value is exactly 0), so d step / d p = I - alpha H(p; D'').
            zero = jax.tree.map(lambda g: g - jax.lax.stop_gradient(g), grad(p, bh))
            return sgd(sgd(p, jax.lax.stop_gradient(grad(p, b))), zero), None

        step = jax.checkpoint(step) if remat else step
        xs = inner if shared else (inner, hessian)
        unrolled = lambda p: loss(jax.lax.scan(step, p, xs)[0], outer)
        return jax.value_and_grad(unrolled)(params)

    def forward(p, b):
        return sgd(p, grad(p, b)), p

    adapted, iterates = jax.lax.scan(forward, params, inner)
    value, g = jax.value_and_grad(loss)(adapted, outer)
    if mode == "fo":
        return value, g

    def backward(v, xs):
        w, bh = xs
        shifted = lambda s: grad(jax.tree.map(lambda a, b: a + s * delta * b, w, v), bh)
        hv = jax.tree.map(lambda a, b: (a - b) / (2 * delta), shifted(1.0), shifted(-1.0))
        return sgd(v, hv), None

    return value, jax.lax.scan(backward, g, (iterates, hessian), reverse=True)[0]
