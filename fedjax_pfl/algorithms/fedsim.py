"""FedSim: stateful partial personalization with simultaneous block updates.

Reference:
  Pillutla et al., "Federated Learning with Partial Model Personalization",
  ICML 2022 (arXiv:2204.03809), Algorithm 2 (FedSim). FedPer (Arivazhagan et
  al., 2019) is the case "personal = head".

Each cohort client i trains (v_i, u_i), u_i starting from u, jointly: every
step takes the gradient of the same minibatch loss with respect to both blocks.
The server sets u to the cohort's weighted mean of u_i; v_i stays on the
client (state [M]).

Paper symbol -> argument: V -> `personal` (labels), u -> `state.shared`,
τ -> `local_steps` / `local_epochs`, γ -> `client_lr`, S -> `clients_per_round`,
aggregation weights -> `weighting`. Evaluation: every client's (v_i, u).
"""

from __future__ import annotations

from fedjax_pfl.algorithms.partial import PartialState, partial_pfl
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model

__all__ = ["PartialState", "fedsim"]


def fedsim(
    model: Model,
    *,
    personal=("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedSim (simultaneous personal and shared updates).

    Args:
      model: the model.
      personal: which params are personal (see `core.params.partition`).
      clients_per_round: S, sampled without replacement (None: all clients).
      batch_size, local_steps, local_epochs: the joint schedule (default one
        epoch).
      client_optimizer, client_lr: the local optimizer; lr traced (sweepable).
      weighting: server average of u_i, "num_examples" (n_i) or "uniform".
      execution: client-axis strategy ("vmap", "chunked", "sharded").
    """
    return partial_pfl(model, mode="simultaneous", personal=personal,
                       clients_per_round=clients_per_round,
                       batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs,
                       client_optimizer=client_optimizer, client_lr=client_lr,
                       weighting=weighting, execution=execution)
