"""A seeded multimodal synthetic dataset: two modalities, one latent label signal.

Every example has a class y and a latent code h = m_y + ε (class means m_y in
R^L, shared by all clients). Two modalities observe h through fixed random
linear maps of different output sizes, each client with its own distortion
and noise level:

  x_a = D_a,i A h + s_a,i ξ_a,     x_b = D_b,i B h + s_b,i ξ_b,

where A [d_a, L] and B [d_b, L] are shared, D_·,i are per-client diagonal
feature scalings with random signs (a client-specific sensor calibration, what
personal encoders can absorb and a shared encoder cannot) and s_·,i
per-client noise levels. A `noisy_fraction` of the clients get one modality
(chosen at random) with noise `noisy_scale` times larger, i.e. nearly useless.
Labels are skewed per client by a Dirichlet(`alpha`) draw over classes, and
sizes vary in [min, max].
No network access; the same seed gives the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedjax_pfl import validation
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.data.partition import train_test_split


def _check(name, value, ok, expected):
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}.")


def _pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2


def multimodal_synthetic(
    num_clients: int = 20,
    *,
    dims: tuple[int, int] = (24, 8),
    num_classes: int = 6,
    latent_dim: int = 8,
    examples: tuple[int, int] = (40, 120),
    alpha: float = 0.5,
    noise: tuple[float, float] = (1.0, 1.0),
    noisy_fraction: float = 0.3,
    noisy_scale: float = 10.0,
    distortion: float = 0.3,
    train_fraction: float = 0.75,
    seed: int = 0,
) -> tuple[ClientData, ClientData, dict[str, Any]]:
    """Builds train and test `ClientData` with fields "x_a" [N, d_a], "x_b" [N, d_b], "y".

    Args:
      num_clients: M.
      dims: (d_a, d_b), the two modalities' feature sizes.
      num_classes: C.
      latent_dim: L, the size of the shared latent label signal.
      examples: (min, max) examples per client, drawn uniformly.
      alpha: Dirichlet concentration of each client's label distribution.
      noise: base noise levels (s_a, s_b); each client's level is this times
        a factor drawn in [0.5, 1.5].
      noisy_fraction: fraction of clients with one nearly useless modality.
      noisy_scale: noise multiplier of that modality.
      distortion: spread of the per-client feature scalings D (log-normal σ).
      train_fraction: per-client training fraction.
      seed: the seed.

    Returns:
      (train, test, info); info holds "num_classes", "dims", "noise_levels"
      [M, 2] and "noisy_modality" [M] (-1: none, 0: x_a, 1: x_b).
    """
    validation.check_int("num_clients", num_clients, minimum=1)
    _check("dims", dims, _pair(dims) and all(validation.is_int(d) and d >= 1 for d in dims),
           "two positive ints")
    validation.check_int("num_classes", num_classes, minimum=2)
    validation.check_int("latent_dim", latent_dim, minimum=1)
    _check("examples", examples, _pair(examples) and all(map(validation.is_int, examples))
           and 2 <= examples[0] <= examples[1], "(min, max) ints with 2 <= min <= max")
    validation.check_real("alpha", alpha, minimum=0, strict=True)
    _check("noise", noise, _pair(noise) and all(isinstance(v, (int, float)) and np.isfinite(v)
                                                and v >= 0 for v in noise),
           "two finite numbers >= 0")
    validation.check_real("noisy_fraction", noisy_fraction, minimum=0, maximum=1)
    validation.check_real("noisy_scale", noisy_scale, minimum=0)
    validation.check_real("distortion", distortion, minimum=0)
    validation.check_real("train_fraction", train_fraction, minimum=0, maximum=1, strict=True)
    rng = np.random.default_rng(validation.check_seed("seed", seed))
    means = rng.normal(size=(num_classes, latent_dim)) * 1.5
    maps = [rng.normal(size=(d, latent_dim)) / np.sqrt(latent_dim) for d in dims]
    noisy = np.full(num_clients, -1)
    chosen = rng.permutation(num_clients)[: int(round(noisy_fraction * num_clients))]
    noisy[chosen] = rng.integers(0, 2, size=len(chosen))
    levels = np.asarray(noise)[None, :] * rng.uniform(0.5, 1.5, size=(num_clients, 2))
    for i in chosen:
        levels[i, noisy[i]] *= noisy_scale
    clients = []
    for i in range(num_clients):
        n = int(rng.integers(examples[0], examples[1] + 1))
        y = rng.choice(num_classes, size=n, p=rng.dirichlet(alpha * np.ones(num_classes)))
        h = means[y] + 0.5 * rng.normal(size=(n, latent_dim))
        fields = {"y": y.astype(np.int32)}
        for j, (name, proj) in enumerate((("x_a", maps[0]), ("x_b", maps[1]))):
            signs = rng.choice([-1.0, 1.0], size=proj.shape[0])
            scale = signs * np.exp(distortion * rng.normal(size=proj.shape[0]))
            x = (h @ proj.T) * scale + levels[i, j] * rng.normal(size=(n, proj.shape[0]))
            fields[name] = x.astype(np.float32)
        clients.append(fields)
    parts = [np.arange(len(c["y"])) for c in clients]
    train_idx, test_idx = train_test_split(parts, train_fraction=train_fraction, seed=seed + 1)

    def build(indices):
        return ClientData.from_clients([{k: v[idx] for k, v in c.items()}
                                        for c, idx in zip(clients, indices)],
                                       num_classes=num_classes)

    info = {"name": "multimodal_synthetic", "num_classes": num_classes, "dims": tuple(dims),
            "num_clients": num_clients, "noise_levels": levels, "noisy_modality": noisy}
    return build(train_idx), build(test_idx), info
