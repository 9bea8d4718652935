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
from fedjax_pfl.data.client_data import ClientData

State = Any
Metrics = dict[str, jax.Array]


class InitFn(Protocol):
    def __call__(self, key: jax.Array, train: ClientData) -> State:
        """Server state plus every per-client state leaf [M, ...] and `hparams`."""


class RoundFn(Protocol):
    def __call__(self, state: State, train: ClientData, key: jax.Array) -> tuple[State, Metrics]:
        """One communication round. Jittable, compiles once, preserves the state's
        structure, shapes and dtypes (so it runs inside `lax.scan`); `key` is the
        round's key. Rows of clients outside the cohort are left bit-identical."""


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


