"""`fedjax-pfl demo`: the three seed methods next to their strongest baselines.

Three scenarios on data that needs no download (scikit-learn's digits, the
seeded multimodal generator), with the settings of notebooks 02-04:

* "latent clusters": digits split IID over 30 clients in 3 hidden groups;
  group g relabels y -> perm_g(y) (group 0 keeps the true labels), the IFCA
  paper's setting. FedFew (K = 3, mu = 1e-3) vs IFCA (K = 3) vs FedAvg, full
  participation, 1 local epoch; a K-model method tests each client on the
  server model with its lowest training loss.
* "fast adaptation": the same split (the clients' tasks conflict, so the
  global model must adapt). meta-FL (nu = 2, exact meta-gradients) vs
  Per-FedAvg (HF) vs FedAvg-FT, 10 of 30 clients a round, 5 local steps; every
  model is tested after the same 2 SGD fine-tuning steps (alpha = 0.1,
  batches of 10) on the client's own training data.
* "multimodal": `multimodal_synthetic(20)` with the two-encoder model. FedAPM
  vs FedAlt (both with personal encoders, tested on (v_i, u)) vs FedAvg,
  6 of 20 clients a round, 1 local epoch.

Every method is one `simulate` run (one compile); the table reports the
personalized test accuracy after the last round: the unweighted mean over
clients, the sample-weighted mean and the worst client.
"""

from __future__ import annotations

import csv
import os
import re
import time

import numpy as np

SCENARIOS = ("latent clusters", "fast adaptation", "multimodal")
SUBTITLES = {"latent clusters": "digits, 30 clients in 3 relabelled groups",
             "fast adaptation": "the same split, after 2 fine-tuning steps",
             "multimodal": "multimodal_synthetic, 20 clients"}
COLUMNS = ("scenario", "method", "acc_mean", "acc_weighted", "acc_min", "seconds")


def latent_clusters(num_clients: int = 30, groups: int = 3, *, seed: int = 0):
    """Digits split IID over clients; client i is in hidden group i % groups.

    Group g relabels y -> perm_g(y) with its own fixed permutation (group 0:
    the identity), so one model cannot fit every group. Each client is split
    75/25 into train/test.

    Returns:
      (train, test, group [M]).
    """
    import fedjax_pfl as fp
    from fedjax_pfl.data import partition

    x, y = fp.data.datasets.load_digits()
    rng = np.random.default_rng(seed)
    perms = [np.arange(10)] + [rng.permutation(10) for _ in range(groups - 1)]
    group = np.arange(num_clients) % groups
    train_idx, test_idx = partition.train_test_split(
        partition.iid(y, num_clients, seed=seed), seed=seed + 1)

    def build(indices):
        return fp.ClientData.from_clients(
            [{"x": x[i], "y": perms[group[c]][y[i]].astype(np.int32)}
             for c, i in enumerate(indices)], num_classes=10)

    return build(train_idx), build(test_idx), group


def scenario(name: str, *, seed: int = 0):
    """(train, test, {method: algorithm}) of a scenario; the seed method comes first."""
    import fedjax_pfl as fp

    A = fp.algorithms
    if name == "latent clusters":
        train, test, _ = latent_clusters(seed=seed)
        model = fp.models.mlp((64,), 10, hidden=(32,))
        common = dict(batch_size=10, local_epochs=1, client_lr=0.1)
        return train, test, {
            "FedFew (K=3)": A.fedfew(model, num_models=3, mu=1e-3, **common),
            "IFCA (K=3)": A.ifca(model, num_models=3, **common),
            "FedAvg": A.fedavg(model, **common)}
    if name == "fast adaptation":
        train, test, _ = latent_clusters(seed=seed)
        model = fp.models.mlp((64,), 10, hidden=(32,), activation="elu")
        common = dict(clients_per_round=10, batch_size=10, local_steps=5, client_lr=0.1)
        alpha, steps = 0.1, 2
        return train, test, {
            "meta-FL (nu=2)": A.meta_fl(model, nu=steps, inner_lr=alpha, **common),
            "Per-FedAvg": A.per_fedavg(model, inner_lr=alpha, eval_steps=steps, **common),
            "FedAvg-FT": A.fedavg_ft(model, ft_steps=steps, ft_lr=alpha, ft_batch_size=10,
                                     **common)}
    if name == "multimodal":
        train, test, info = fp.data.multimodal_synthetic(20, seed=seed)
        model = fp.models.two_encoder(info["dims"], info["num_classes"])
        common = dict(clients_per_round=6, batch_size=32, local_epochs=1)
        personal = fp.models.ENCODERS
        return train, test, {
            # alpha_i = 1/M weights FedAPM's data loss (the released code): lr 1.0 = 0.05 M.
            "FedAPM": A.fedapm(model, personal=personal, client_lr=1.0, evaluation="global",
                               **common),
            "FedAlt": A.fedalt(model, personal=personal, client_lr=0.05, **common),
            "FedAvg": A.fedavg(model, client_lr=0.05, **common)}
    raise ValueError(f"name: unknown demo scenario {name!r}; expected one of {SCENARIOS}.")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(*, rounds: int = 100, eval_every: int = 10, seed: int = 0, out: str | None = None,
        scenarios=SCENARIOS, echo=print):
    """Runs every method of every scenario.

    Args:
      rounds, eval_every, seed: as for `simulate` (the seed also splits the data).
      out: if set, each run's results directory is OUT/<scenario>/<method>
        (replaced if present).
      scenarios: names from `SCENARIOS`.
      echo: called with one line per finished run.

    Returns:
      (rows: one dict per run with the keys of `COLUMNS`,
       results: {scenario: {method: Result}}).
    """
    from fedjax_pfl import simulate, validation

    validation.check_int("rounds", rounds, minimum=0)
    validation.check_int("eval_every", eval_every, minimum=1)
    rows, results = [], {}
    for name in scenarios:
        train, test, methods = scenario(name, seed=seed)
        results[name] = {}
        for method, algorithm in methods.items():
            path = os.path.join(out, _slug(name), _slug(method)) if out else None
            config = {"demo": {"scenario": name, "method": method, "rounds": rounds,
                               "eval_every": eval_every, "seed": seed}}
            start = time.perf_counter()
            result = simulate(algorithm, train, test, rounds=rounds, eval_every=eval_every,
                              seed=seed, progress=False, out=path, overwrite=True, config=config)
            seconds = time.perf_counter() - start
            final = result.final()
            rows.append({"scenario": name, "method": method, "seconds": round(seconds, 1),
                         **{k: final[k] for k in COLUMNS[2:5]}})
            results[name][method] = result
            echo(f"{name:16s} {method:15s} accuracy {final['acc_mean']:.3f}  ({seconds:.1f} s)")
    return rows, results


def write_table(rows: list[dict], path: str) -> None:
    """Writes the rows of `run` as CSV."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(results: dict, path: str, *, dpi: int = 90) -> None:
    """Saves one panel per scenario: mean client accuracy vs round (seed method bold).

    Needs matplotlib (extra `[plot]`); imported here so that the package does not.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the demo figure needs matplotlib: pip install 'fedjax_pfl[plot]'") from e

    fig = Figure(figsize=(4 * len(results), 3.4), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, runs) in zip(axes, results.items()):
        for i, (method, result) in enumerate(runs.items()):
            rounds = [e["round"] for e in result.evals]
            acc = [e["acc_mean"] for e in result.evals]
            ax.plot(rounds, acc, marker="o", markersize=3, lw=2.5 if i == 0 else 1.3,
                    label=method, zorder=3 - i)
        ax.set_title(f"{name}\n{SUBTITLES.get(name, '')}", fontsize=10)
        ax.set(xlabel="round", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("personalized test accuracy\n(mean over clients)")
    fig.savefig(path, dpi=dpi)
