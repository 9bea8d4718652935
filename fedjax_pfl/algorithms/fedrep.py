"""FedRep: shared representation (body), personal head; head first, then body.

Reference:
  Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared Representations
  for Personalized Federated Learning", ICML 2021.

Each cohort client first trains its personal head with the body frozen (the
paper: many head epochs), then trains the received body with its new head
frozen; the server averages the bodies. This is FedAlt with `personal` =
the head, so it shares FedAlt's code (`partial.partial_pfl`).

Paper symbol -> argument: h_i (head) -> `head` (top-level module names, a
regex or a predicate; default "head"), φ (body) -> `state.shared`, τ_h ->
`personal_epochs` / `personal_steps` (the paper uses 10 epochs; default: the
body's schedule), τ_φ -> `local_epochs` / `local_steps`, α -> `client_lr`.
"""

from __future__ import annotations

from fedjax_pfl.algorithms.partial import partial_pfl
from fedjax_pfl.core import execution as ex
from fedjax_pfl.core import local
from fedjax_pfl.core.algorithm import FederatedAlgorithm
from fedjax_pfl.models.model import Model


def fedrep(
    model: Model,
    *,
    head=("head",),
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
    """FedRep (personal head trained first, then the shared body).

    Args:
      model: the model.
      head: which params form the personal head.
      others: as for `fedalt` (`personal_epochs` sets the head's epochs).
    """
    return partial_pfl(model, mode="alternating", personal=head,
                       clients_per_round=clients_per_round,
                       batch_size=batch_size, local_steps=local_steps, local_epochs=local_epochs,
                       personal_steps=personal_steps, personal_epochs=personal_epochs,
                       client_optimizer=client_optimizer, client_lr=client_lr,
                       weighting=weighting, execution=execution)
