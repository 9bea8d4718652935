"""ADMM consensus with partial personalization: FedAPM's client step, dual and server.

Per client i (state rows [M]): the personal block v_i, the last local shared
copy u_i and the dual π_i (shared shapes only). ONE client's round is
`client_update` (personal phase on α_i (f_i + wd/2 ‖v‖²) + σ/2 ‖v − v_i‖²,
then shared phase on α_i (f_i + wd/2 ‖u_i‖²) + ⟨π_i, u_i − u⟩ + ρ/2 ‖u_i − u‖²,
both through `core.partial.ClientTrainer`); the round then applies the dual
ascent π_i ← π_i + ρ (u_i − u) (`dual_ascent`) and the server sets u to the
weighted mean of u_i + π_i / ρ (`consensus`).

Cost (same results, to float rounding, as the direct transcription): the
server average is two weighted sums over the stored rows (no [M, |u|]
temporary u_i + π_i/ρ); the dual ascent is a scatter-add of ρ (u_i − u) into
the state (the old rows are not gathered for it); under "vmap" / "chunked"
each client reads its π_i row inside the client map (`read_in_map`); the
shared penalty is applied through its gradient (α wd + ρ) u_i + (π_i − ρ u)
(`shared_penalty`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.core.partial import ClientTrainer, drift_norm, sq_norm


def dual_over_rho(dual, rho):
    """π / ρ, or 0 when ρ = 0 (the dual never moves then)."""
    safe = jnp.where(rho > 0, rho, 1.0)
    return jax.tree.map(lambda p: jnp.where(rho > 0, p / safe, 0.0), dual)


def personal_penalty(v_old, alpha, weight_decay, sigma):
    """The personal phase's penalty α wd/2 ‖v‖² + σ/2 ‖v − v_i‖², as a function of v."""
    return lambda v: (alpha * weight_decay / 2 * sq_norm(v)
                      + sigma / 2 * sq_norm(optax.tree.sub(v, v_old)))


def shared_penalty(dual, u, alpha, weight_decay, rho):
    """The shared phase's penalty of one client, as a function of u_i.

    alpha wd/2 |u_i|^2 + <pi_i, u_i - u> + rho/2 |u_i - u|^2 up to a constant in
    u_i: only its gradient (alpha wd + rho) u_i + (pi_i - rho u) is used (the
    reported loss is the data loss), and the vector pi_i - rho u is formed once
    per client instead of reading pi_i and u again at every step.
    """
    tilt = jax.tree.map(lambda p, b: p - rho * b, dual, u)
    return lambda u_i: ((alpha * weight_decay + rho) / 2 * sq_norm(u_i)
                        + optax.tree.vdot(tilt, u_i))


def dual_increment(u_i, u, rho):
    """ρ (u_i − u), the cohort's dual ascent step (u_i: leaves [S, ...]; u: one copy)."""
    return jax.tree.map(lambda a, b: rho * (a - b[None]), u_i, u)


def client_update(trainer: ClientTrainer, read_in_map: bool):
    """ONE client's FedAPM round, for `ex.map_reduce`.

    broadcast: (u, hparams, α, every client's duals [M] when `read_in_map`,
    else ()); x: (v_i, the client's id when `read_in_map` else its dual row,
    data, key). Returns ((v_i', u_i, shared-phase loss, ‖u_i − u‖), ()): the
    dual step is the round's (`dual_ascent`), in place in the state, one
    [S, |u|] output fewer from the client map. Under "vmap" / "chunked" each
    client reads its dual row from the state inside the client map (no [S, |u|]
    gathered copy); "sharded" gathers the cohort's rows first, so that the
    state is never replicated to every device (`read_in_map` False).
    """
    def update(broadcast, x):
        u, hp, alpha, client_dual = broadcast
        v_old, dual, data, key = x
        if read_in_map:  # `dual` is the client's id
            dual = jax.tree.map(lambda a: a[dual], client_dual)
        lr, rho, wd = hp["client_lr"], hp["rho"], hp["weight_decay"]
        v, _ = trainer.personal(v_old, u, data, key, lr,
                                personal_penalty(v_old, alpha, wd, hp["sigma"]), alpha)
        u_i, loss = trainer.shared(v, u, data, key, lr, shared_penalty(dual, u, alpha, wd, rho),
                                   alpha)
        return (v, u_i, loss, drift_norm(u_i, u)), ()
    return update


def dual_inputs(client_dual, cohort, read_in_map: bool):
    """`client_update`'s dual inputs: (broadcast, per-client x) (see `client_update`)."""
    if read_in_map:
        return client_dual, cohort.ids
    return (), cohort.take(client_dual)


def client_weight(train, kind: str) -> jax.Array:
    """α_i: 1 / M_eff ("uniform", M_eff = clients holding data) or 1 ("unit")."""
    if kind != "uniform":
        return jnp.float32(1.0)
    return 1.0 / jnp.maximum(jnp.sum((train.num_examples > 0).astype(jnp.float32)), 1.0)


def dual_ascent(client_dual, cohort, u_i, u, rho):
    """π_i += ρ (u_i − u) on the cohort's rows, in place (the ids are distinct): the
    old rows are never gathered."""
    step = dual_increment(u_i, u, rho)
    if cohort.full:
        return jax.tree.map(jnp.add, client_dual, step)
    return jax.tree.map(lambda a, d: a.at[cohort.ids].add(d), client_dual, step)


def consensus(shared_rows, dual_rows, weights, rho, old):
    """The weighted mean of u_i + π_i / ρ over rows [K, ...] (`old` if no weight).

    Two weighted sums over the stored rows, combined at the shared block's size:
    no [K, |u|] temporary for u_i + π_i / ρ. `weights` [K] (bool or float).
    """
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    wsum = lambda tree: jax.tree.map(lambda a: jnp.tensordot(weights, a, axes=1), tree)
    z = jax.tree.map(jnp.add, wsum(shared_rows), dual_over_rho(wsum(dual_rows), rho))
    mean = jax.tree.map(lambda a: a / jnp.maximum(total, 1.0), z)
    return jax.tree.map(lambda new, prev: jnp.where(total > 0, new, prev), mean, old)


def server_step(average: str, u, u_i, client_shared, client_dual, cohort, train, n, rho):
    """After the cohort's client map: u_i [S] into the state's rows, the dual
    ascent, and the consensus over every client holding data (`average` "all",
    with the stale rows of clients outside the cohort) or the cohort's ("cohort").

    Returns (u', client_shared', client_dual', the cohort's new duals [S]).
    """
    client_shared = cohort.put(client_shared, u_i)
    client_dual = dual_ascent(client_dual, cohort, u_i, u, rho)
    dual = cohort.take(client_dual)  # the cohort's new rows (only read where needed)
    rows = ((client_shared, client_dual, train.num_examples > 0) if average == "all"
            else (u_i, dual, n > 0))
    return consensus(*rows, rho, u), client_shared, client_dual, dual


def evaluate(trainer: ClientTrainer, state, test, evaluation: str, execution: ex.Execution):
    """Per-client test statistics [M] of (v_i, u) (`evaluation` "global") or of
    each client's own (v_i, u_i) ("local"); `state`: a FedAPM state."""
    if evaluation == "global":
        return trainer.evaluate(state.shared, test, state.client_personal, execution)
    return ex.map_clients(
        lambda _, x: local.evaluate_client(trainer.model, trainer.part.merge(x[0], x[1]), x[2]),
        (), (state.client_personal, state.client_shared, test), execution)
