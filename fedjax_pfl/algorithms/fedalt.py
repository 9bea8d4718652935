"""FedAlt: stateful partial personalization with alternating block updates.

Reference:
  Pillutla, Malik, Mohamed, Rabbat, Sanjabi, Xiao, "Federated Learning with
  Partial Model Personalization", ICML 2022 (arXiv:2204.03809), Algorithm 1
  (FedAlt). FedRep (Collins et al., ICML 2021) is the case "personal = head".

Each cohort client i receives the shared block u, first updates its personal
block v_i with u frozen (τ_v steps), then updates a local copy u_i of the
shared block, starting from u, with v_i frozen (τ_u steps). The server sets u
to the cohort's weighted mean of u_i; v_i stays on the client (state [M]).

Paper symbol -> argument: V (personal block) -> `personal` (labels, see
`core.params`), u -> `state.shared`, τ_v -> `personal_steps` /
`personal_epochs` (default: the same schedule as the shared phase), τ_u ->
`local_steps` / `local_epochs`, γ_v = γ_u -> `client_lr`, S -> `clients_per_round`,
aggregation weights -> `weighting` ("num_examples" or "uniform").
Evaluation: every client's (v_i, u). Round metrics: `train_loss` (shared
phase) and `drift`, the cohort mean of Σ_tensors ‖u_i − u‖_F.
"""

from __future__ import annotations

from fedjax_pfl.algorithms.partial import PartialState, partial_pfl
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

__all__ = ["PartialState", "fedalt"]


def fedalt(
    model: Model,
    *,
    personal=("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    personal_steps: int | None = None,
    personal_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedAlt (alternating personal-then-shared updates).

    Args:
      model: the model.
      personal: which params are personal: top-level module names, a regex on
        "/"-joined leaf paths, or a predicate (see `core.params.partition`).
      clients_per_round: S, sampled without replacement (None: all clients).
      batch_size, local_steps, local_epochs: the shared phase's schedule
        (default one epoch).
      personal_steps, personal_epochs: the personal phase's schedule (default:
        the shared phase's).
      client_optimizer, client_lr: the local optimizer; lr traced (sweepable).
      weighting: server average of u_i, "num_examples" (n_i) or "uniform".
      execution: client-axis strategy ("vmap", "chunked", "sharded").

    Raises:
      ValueError: for a bad argument (named in the message), before any compile.
    """
    return partial_pfl(model, mode="alternating", personal=personal,
                       clients_per_round=clients_per_round,
                       batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs,
                       personal_steps=personal_steps, personal_epochs=personal_epochs,
                       client_optimizer=client_optimizer, client_lr=client_lr,
                       weighting=weighting, execution=execution)
