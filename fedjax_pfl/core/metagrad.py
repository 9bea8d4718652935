"""The nu-step meta-gradient of ONE client: exact, first-order or Hessian-free.

For F(w) = f(w^(nu); D') with w^(0) = w and w^(j+1) = w^(j) - alpha grad f(w^(j); D_j),
  grad F(w) = (I - alpha H(w^(0))) ... (I - alpha H(w^(nu-1))) grad f(w^(nu); D'),
with the Hessian factor j evaluated on a batch D''_j (independent of D_j in
Per-FedAvg, or D_j itself, MAML-style). Used by `algorithms.meta_fl`, whose
local loop (`meta_train`: tau optimizer steps along the meta-gradient, batches
from `meta_batches`) is `local.scan_plan` with this step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.core import local
from fedjax_pfl.data.client_data import client_capacity, client_rows

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


def meta_batches(key, num_examples, max_examples: int, *, nu: int, batch_size: int,
                 inner_batch_size: int, hessian_batch_size: int, local_steps, local_epochs,
                 shared_hessian: bool):
    """One client's batch indices for a round.

    Returns:
      (outer idx [T, B] and weights [T, B] from `local.batch_plan`, inner idx
      [T, nu, B_in], Hessian idx [T, nu, B_h]); the outer plan uses the same key
      as `local_train`, so nu = 0 draws FedAvg's batches.
    """
    plan_key, step_key = jax.random.split(key)
    idx, weights = local.batch_plan(plan_key, num_examples, max_examples, batch_size=batch_size,
                                    local_steps=local_steps, local_epochs=local_epochs)
    # The k-th non-empty step draws from fold_in(., k): padding rows (which add
    # empty steps in epoch mode) do not change the batches.
    step_ids = jnp.cumsum(jnp.any(weights > 0, axis=1)) - 1
    high = jnp.maximum(num_examples, 1)
    draw = lambda i, b: jax.vmap(lambda t: jax.random.randint(
        jax.random.fold_in(jax.random.fold_in(step_key, i), t), (nu, b), 0, high))(
            step_ids).astype(jnp.int32)
    inner = draw(0, inner_batch_size)
    return idx, weights, inner, inner if shared_hessian else draw(1, hessian_batch_size)


def meta_train(loss_fn, params, data, key, hp, cfg) -> local.LocalResult:
    """ONE client's tau local steps u <- u - beta g along the meta-gradient g.

    Args:
      loss_fn: `loss_fn(params, batch, key) -> [B]` per-example loss.
      params: the received global model.
      data: the client's rows; key: its key for the round.
      hp: traced scalars client_lr (beta), inner_lr (alpha), delta.
      cfg: the static settings (`algorithms.meta_fl.MetaFLConfig`: nu, mode,
        remat, hessian_batches, schedule, client_optimizer and the resolved
        batch sizes `inner_b`, `hessian_b`).
    """
    shared = cfg.hessian_batches == "shared"
    loss = lambda p, b: jnp.sum(b["w"] * loss_fn(p, b["examples"], None))
    idx, weights, inner, hess = meta_batches(
        key, data.num_examples, client_capacity(data), nu=cfg.nu, batch_size=cfg.batch_size,
        inner_batch_size=cfg.inner_b, hessian_batch_size=cfg.hessian_b,
        local_steps=cfg.schedule.local_steps, local_epochs=cfg.schedule.epochs,
        shared_hessian=shared)
    uniform = lambda i: {"examples": client_rows(data, i),
                         "w": jnp.full(i.shape, 1.0 / i.shape[-1], jnp.float32)}

    def value_and_grad(p, batch, w, x):
        in_idx, h_idx = x
        return meta_gradient(loss, p, uniform(in_idx), {"examples": batch, "w": w},
                             None if shared else uniform(h_idx), alpha=hp["inner_lr"],
                             mode=cfg.mode, delta=hp["delta"], remat=cfg.remat)

    optimizer = local.make_optimizer(cfg.client_optimizer, hp["client_lr"])
    step = local.optimizer_step(optimizer, value_and_grad)
    result = local.scan_plan(step, (params, optimizer.init(params)), data, idx, weights,
                             (inner, hess))
    return result._replace(params=result.params[0])
