"""`FederatedAlgorithm`: a federated algorithm as a triple of pure functions.

Modelled on `optax.GradientTransformation`: a factory such as
`fedavg(model, clients_per_round=10, ...)` closes over the static
configuration and returns `FederatedAlgorithm(init, round, evaluate)`.
Numeric hyperparameters (learning rates, mu, ...) live in the state's `hparams`
dict as traced scalars, so `jax.vmap` over a grid of them runs a sweep in one
compile.
"""

import math
from typing import Any, NamedTuple, Protocol

import jax

from fedjax_pfl import validation
from fedjax_pfl.core.params import path_name
from fedjax_pfl.data.client_data import ClientData

State = Any
Metrics = dict[str, jax.Array]


class InitFn(Protocol):
    def __call__(self, key: jax.Array, train: ClientData, params=None) -> State:
        """Server state plus every per-client state leaf [M, ...] and `hparams`.

        `params`: start from these model parameters instead of `model.init(key)`
        (checked against the model, see `initial_params`); every model copy of
        the state (server, per-client, K models) starts from them.
        """


class RoundFn(Protocol):
    def __call__(self, state: State, train: ClientData, key: jax.Array,
                 cohort: jax.Array | None = None) -> tuple[State, Metrics]:
        """One communication round. Jittable, compiles once, preserves the state's
        structure, shapes and dtypes (so it runs inside `lax.scan`); `key` is the
        round's key. `cohort`: the round's client ids [S] instead of sampling
        them (see `core.round.start`). Rows of clients outside the cohort are
        left bit-identical. Metrics are per-round arrays; an algorithm made with
        `diagnostics=True` adds a dict `metrics["diagnostics"]` of per-client
        arrays [S, ...] (with the cohort's ids as "clients")."""


class EvaluateFn(Protocol):
    def __call__(self, state: State, train: ClientData, test: ClientData) -> Metrics:
        """The algorithm's personalized evaluation: per-client statistics [M]
        (`num_examples`, `num_correct`, `loss_sum`, ...)."""


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm: `init`, `round` and `evaluate` pure functions."""

    init: InitFn
    round: RoundFn
    evaluate: EvaluateFn


def check_arg(name: str, value, ok: bool, expected: str) -> None:
    """Raises `ValueError("{name}: expected {expected}, got {value!r}.")` unless ok."""
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}.")


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> None:
    """Checks a numeric hyperparameter is a finite real number >= (or >) `minimum`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    check_arg(name, value, ok, f"a finite number {'>' if strict else '>='} {minimum}")


check_seed = validation.check_seed


def check_cohort_size(clients_per_round) -> None:
    check_arg("clients_per_round", clients_per_round,
              clients_per_round is None or (isinstance(clients_per_round, int)
                                            and not isinstance(clients_per_round, bool)
                                            and clients_per_round >= 1),
              "None (all clients) or an int >= 1")


def check_train(train, clients_per_round: int | None, name: str = "train") -> None:
    """Static checks of the training data and the cohort size (trace time; free per round)."""
    validation.check_structure(train, name)
    if clients_per_round is not None and clients_per_round > train.num_clients:
        raise ValueError(f"clients_per_round: expected at most the number of clients "
                         f"({train.num_clients}), got {clients_per_round}.")


def check_data(model, train, clients_per_round: int | None,
               name: str = "train") -> int | None:
    """Every check of the training data for `model`, for an algorithm's `init` (eager).

    Static checks as `check_train`, then (once per `ClientData` object, skipped
    when `train` is traced) `num_examples` in [0, N], finite features after the
    cast to the compute dtype, the fields and example shapes the model reads
    and labels in [0, C), C from the model's output shape (`jax.eval_shape`).

    Returns:
      C, the model's number of classes (None if its output is not [batch, C]).
    """
    check_train(train, clients_per_round, name)
    return validation.check_data(model, train, name)


def check_same_clients(state_clients: int, data: ClientData, name: str) -> None:
    """The data must have the M clients the state was initialised with."""
    if not isinstance(data, ClientData):
        raise TypeError(f"{name}: expected a ClientData, got {type(data).__name__}.")
    if data.num_clients != state_clients:
        raise ValueError(f"{name}: expected {state_clients} clients (as at init), "
                         f"got {data.num_clients}.")


def hparams(**values) -> dict[str, jax.Array]:
    """Numeric hyperparameters as float32 scalars (traced under jit)."""
    return {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in values.items()}




def initial_params(model, key: jax.Array, params=None, *, num_models: int | None = None,
                   independent: bool = False):
    """The initial model(s): `model.init(key)`, or the given `params` checked against it.

    Args:
      model: the model (its `init` gives the expected structure, shapes and dtypes).
      key: the init key (unused for given params).
      params: None, or initial parameters with the model's structure (cast to
        its dtypes). With `num_models`, also a stack of K models (leaves [K, ...]).
      num_models: K for algorithms with K models: the result has leaves [K, ...].
      independent: K independent inits (else K copies of one), when not given.

    Raises:
      ValueError: naming the first leaf that is missing, unexpected, of
        another shape or not finite.
    """
    jnp = jax.numpy
    stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (num_models,) + a.shape),
                                      tree)
    if params is None:
        if num_models is None:
            return model.init(key)
        if independent:
            return jax.vmap(model.init)(jax.random.split(key, num_models))
        return stack(model.init(key))
    paths, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(model.init, key))
    want = {path_name(p): t for p, t in paths}
    got = {path_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(set(want) ^ set(got)):
        raise ValueError(f"params: {'missing' if name in want else 'unexpected'} leaf {name!r}; "
                         f"the model's leaves are {sorted(want)}.")
    is_stack = num_models is not None and all(
        jnp.shape(got[k]) == (num_models,) + t.shape for k, t in want.items())
    leaves = []
    for name, t in want.items():
        value = jnp.asarray(got[name])
        if value.shape != t.shape and not is_stack:
            k = f" or {(num_models,) + t.shape} (K models)" if num_models is not None else ""
            raise ValueError(f"params: leaf {name!r} has shape {value.shape}, the model expects "
                             f"{t.shape}{k}.")
        if not (jnp.issubdtype(value.dtype, jnp.number) and bool(jnp.all(jnp.isfinite(value)))):
            raise ValueError(f"params: leaf {name!r} must hold finite numbers.")
        leaves.append(jnp.array(value, t.dtype))  # a copy: the state is donated
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return params if num_models is None or is_stack else stack(params)
