"""Naive per-client reference of CFL (clustered federated learning).

A Python loop over the cohort (each client plain SGD from its cluster's model,
`local_reference`), the split test of each cluster in index order on the
float64 updates, and the bipartition written out from its definition:
agglomerative clustering of the members on the distance -cos(Delta_i, Delta_j),
the linkage of two groups recomputed from all their pairs at every merge (the
farthest pair for "complete", the closest for "single") until two groups remain.
"""

from __future__ import annotations

import jax
import numpy as np

from fedjax_pfl.testing.common import Clients, cohort, f64, stack, stacked_row
from fedjax_pfl.testing.local_reference import (
    Schedule,
    check_sgd,
    server_sgd,
    train_model,
    tree_sub,
)


def agglomerate(similarity, linkage: str = "complete") -> list[list[int]]:
    """Two groups of rows of `similarity` [m, m] (m >= 2), the first holding row 0.

    Merges the two groups at the smallest linkage distance (ties: the first pair
    in order of the groups' smallest rows) until two remain.
    """
    dist = -np.asarray(similarity, np.float64)
    link = max if linkage == "complete" else min
    groups = [[i] for i in range(len(dist))]
    while len(groups) > 2:
        best = None
        for p in range(len(groups)):
            for q in range(p + 1, len(groups)):
                d = link(dist[x, y] for x in groups[p] for y in groups[q])
                if best is None or d < best[0]:
                    best = (d, p, q)
        _, p, q = best
        groups[p] = sorted(groups[p] + groups.pop(q))
    return groups


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(f64(tree))])


def cosines(vectors) -> np.ndarray:
    """[m, m] <a, b> / (|a| |b| + 1e-12) of float64 vectors (the released code's formula)."""
    return np.asarray([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
                        for b in vectors] for a in vectors])


def _naive_cfl(model, state, train, key, cfg):
    check_sgd(cfg)
    ids, client_key = cohort(train, key, cfg["clients_per_round"])
    clients = Clients(train)
    hp = {k: float(v) for k, v in state.hparams.items()}
    schedule = Schedule.of(cfg["batch_size"], cfg["local_steps"], cfg["local_epochs"])
    slots = cfg["max_clusters"]
    models = [stacked_row(state.params, k) for k in range(slots)]
    assignment = np.array(state.assignment)
    num_clusters = int(state.num_clusters)
    updates, weights, loss_num, n_sum = {}, {}, 0.0, 0.0
    for i in ids:
        start, n = models[assignment[i]], clients.n[i]
        run = train_model(model, start, clients.examples(i), n,
                          jax.random.fold_in(client_key, i), schedule, hp["client_lr"])
        updates[i] = f64(tree_sub(run.params, start))  # float32, as the package's
        weights[i] = float(n) if cfg["weighting"] == "num_examples" else float(n > 0)
        loss_num, n_sum = loss_num + n * run.mean_loss(), n_sum + n
    members = lambda c: [i for i in ids if assignment[i] == c and weights[i] > 0]
    for c in range(num_clusters):  # the clusters of the round's start, in index order
        mine = members(c)
        if (len(mine) < cfg["min_split_size"] or int(state.round) < hp["warmup_rounds"]
                or num_clusters == slots):
            continue
        vectors = [_flat(updates[i]) for i in mine]
        w = np.asarray([weights[i] for i in mine])
        mean_norm = np.linalg.norm(sum(wi * v for wi, v in zip(w, vectors)) / w.sum())
        max_norm = max(np.linalg.norm(v) for v in vectors)
        if mean_norm < hp["eps1"] and max_norm > hp["eps2"]:
            _, leaving = agglomerate(cosines(vectors), cfg["linkage"])
            models[num_clusters] = models[c]  # the new cluster starts from its parent
            for p in leaving:
                assignment[mine[p]] = num_clusters
            num_clusters += 1
    means = []
    for k in range(slots):  # FedAvg within each cluster over its new members
        mine = members(k)
        total = jax.tree.map(lambda a: np.zeros(np.shape(a)), models[k])
        for i in mine:
            total = jax.tree.map(lambda t, d, w=weights[i]: t + w * d, total, updates[i])
        scale = 1.0 / sum(weights[i] for i in mine) if mine else 0.0
        means.append(jax.tree.map(lambda t, s=scale: s * t, total))
    new = state.replace(round=state.round + 1,
                        params=server_sgd(cfg, state.hparams, stack(models),
                                          jax.tree.map(lambda *r: np.stack(r), *means)),
                        assignment=np.asarray(assignment, np.int32),
                        num_clusters=np.asarray(num_clusters, np.int32))
    return new, {"train_loss": loss_num / max(n_sum, 1.0), "num_clusters": float(num_clusters)}


NAIVE_ROUNDS = {"cfl": _naive_cfl}

# The factory defaults of the arguments the reference reads (checked against the factory).
DEFAULTS = {"cfl": {"clients_per_round": None, "batch_size": 32, "local_steps": None,
                    "local_epochs": None, "client_optimizer": "sgd", "server_optimizer": "sgd",
                    "max_clusters": 4, "min_split_size": 2, "linkage": "complete",
                    "weighting": "num_examples"}}
