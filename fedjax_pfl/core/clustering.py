"""CFL's clustering: update norms and cosines, per-cluster means, the bipartition
of a cluster's members and the split of clusters into free model slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_pfl.core import aggregation

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in the sums and cosines on GPUs


def bipartition(similarity, cluster, member, linkage: str = "complete") -> jax.Array:
    """Splits each cluster's `member` rows [S] in two by agglomerative clustering on
    the distance -`similarity` [S, S], `linkage` "complete" (a group's distance is
    its farthest pair) or "single" (its closest). `cluster`: int [S].

    Returns bool [S]: the members outside the group of their cluster's first member.
    """
    size = similarity.shape[0]
    index = jnp.arange(size)
    same = (cluster[:, None] == cluster[None, :]) & member[:, None] & member[None, :]
    similarity = (similarity + similarity.T) / 2  # exactly symmetric
    dist = jnp.where(same & (index[:, None] != index[None, :]), -similarity, jnp.inf)
    combine = jnp.maximum if linkage == "complete" else jnp.minimum

    def merge(_, carry):  # the closest two groups of any cluster still in > 2 groups
        dist, root = carry
        open_rows = jnp.sum(same & (root == index)[None, :], axis=1) > 2
        d = jnp.where(open_rows[:, None] & open_rows[None, :], dist, jnp.inf)
        r, c = jnp.divmod(jnp.argmin(d), size)
        a, b = jnp.minimum(r, c), jnp.maximum(r, c)  # b joins a: roots are group minima
        row = combine(dist[a], dist[b])
        new = dist.at[a].set(row).at[:, a].set(row)
        new = new.at[b].set(jnp.inf).at[:, b].set(jnp.inf).at[a, a].set(jnp.inf)
        ok = jnp.isfinite(d[r, c])
        return jnp.where(ok, new, dist), jnp.where(ok & (root == b), a, root)

    _, root = jax.lax.fori_loop(0, max(size - 2, 0), merge, (dist, index))
    first = jnp.min(jnp.where(same, index[None, :], size), axis=1)
    return member & (root != first)


def row_norms(tree) -> jax.Array:
    """[R] Euclidean norm of each row of a stacked pytree (leaves [R, ...])."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)
                        for a in jax.tree.leaves(tree)))


def cosines(deltas) -> jax.Array:
    """[S, S] cosine similarities of the cohort's updates (+1e-12 in the denominator)."""
    flat = [a.reshape(a.shape[0], -1) for a in jax.tree.leaves(deltas)]
    gram = sum(jnp.matmul(f, f.T, precision=_HIGHEST) for f in flat)
    norms = row_norms(deltas)
    return gram / (norms[:, None] * norms[None, :] + 1e-12)


def cluster_means(deltas, cluster, weights, num: int):
    """[K, ...] the p-weighted mean update of each cluster's members (0 if none)."""
    one_hot = jax.nn.one_hot(cluster, num, dtype=jnp.float32) * weights[:, None]
    total = jnp.sum(one_hot, axis=0)
    return jax.tree.map(lambda d: aggregation.safe_div(
        jnp.tensordot(one_hot, d, axes=(0, 0), precision=_HIGHEST),
        total.reshape((-1,) + (1,) * (d.ndim - 1))), deltas)


def split(deltas, cluster, weights, *, stalled, num_clusters, min_split_size: int,
          linkage: str, num: int):
    """One round's splits of CFL.

    A cluster splits when `stalled(mean_norm [K], max_norm [K])` (its members'
    mean update is small and their largest large), it has >= `min_split_size`
    members with weight and a free slot remains (slots num_clusters .. num - 1,
    given in cluster order); its members are bipartitioned on their cosines and
    the group without its first member moves to the slot.

    Returns (new cluster [S], `copy(tree)`: the [K, ...] leaves of `tree` with each
    new slot a copy of its parent, number of splits).
    """
    member = weights > 0
    in_cluster = jax.nn.one_hot(cluster, num, dtype=jnp.float32) * member[:, None]  # [S, K]
    mean_norm = row_norms(cluster_means(deltas, cluster, weights, num))
    max_norm = jnp.max(in_cluster * row_norms(deltas)[:, None], axis=0)
    wants = stalled(mean_norm, max_norm) & (jnp.sum(in_cluster, axis=0) >= min_split_size)
    slot = num_clusters + jnp.cumsum(wants.astype(jnp.int32)) - 1
    splits = wants & (slot < num)
    moves = jax.lax.cond(
        jnp.any(splits),
        lambda: bipartition(cosines(deltas), cluster, member & splits[cluster], linkage),
        lambda: jnp.zeros_like(member))
    source = jnp.arange(num).at[jnp.where(splits, slot, num)].set(jnp.arange(num), mode="drop")
    copy = lambda tree: jax.tree.map(
        lambda a: a[source] if a.ndim and a.shape[0] == num else a, tree)
    return jnp.where(moves, slot[cluster], cluster), copy, jnp.sum(splits, dtype=jnp.int32)
