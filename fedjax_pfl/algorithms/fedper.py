"""FedPer: federated learning with personalization layers (joint updates).

Reference:
  Arivazhagan, Aggarwal, Singh, Choudhary, "Federated Learning with
  Personalization Layers", arXiv:1912.00818, 2019.

Each cohort client trains its personal head and the received base layers
jointly (the same SGD steps update both); the server averages the base layers.
This is FedSim with `personal` = the head, so it shares FedSim's code.

Paper symbol -> argument: personalization layers -> `head` (default "head"),
base layers -> `state.shared`, E -> `local_epochs`, B -> `batch_size`,
η -> `client_lr`.
"""

from __future__ import annotations

from fedjax_pfl.algorithms.partial import partial_pfl
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


def fedper(
    model: Model,
    *,
    head=("head",),
    clients_per_round: int | None = None,
    batch_size: int = 32,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    client_optimizer: local.OptimizerSpec = "sgd",
    client_lr: float = 0.05,
    weighting: str = "num_examples",
    execution: str | ex.Execution = "vmap",
) -> FederatedAlgorithm:
    """FedPer (personal head and shared base trained jointly).

    Args:
      model: the model.
      head: which params form the personal head.
      others: as for `fedsim`.
    """
    return partial_pfl(model, mode="simultaneous", personal=head,
                       clients_per_round=clients_per_round,
                       batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs,
                       client_optimizer=client_optimizer, client_lr=client_lr,
                       weighting=weighting, execution=execution)
