"""Naive per-client references of SCAFFOLD, HypCluster, FedEM and LG-FedAvg.

Written independently of the package's engine: the cohort, the minibatches
and plain SGD are re-derived here from the documented key scheme (round key
-> fold_in 0 samples the cohort, fold_in 1 then fold_in(client id) is the
client's key; the client key splits into a batch-plan key and a step key),
one Python step at a time on the UNPADDED rows, with aggregation in float64
NumPy. Only plain SGD on clients and server is supported (the conformance
suite's configuration).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_sgd(cfg):
    for name in ("client_optimizer", "server_optimizer"):
        if cfg.get(name, "sgd") != "sgd":
            raise NotImplementedError(f"naive references support plain SGD only ({name}).")


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _cohort(train, key, cohort_size):
    """(sorted client ids, base key of the client keys)."""
    m = int(train.num_examples.shape[0])
    sample_key, client_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    if cohort_size is None or cohort_size == m:
        return list(range(m)), client_key
    ids = jax.random.choice(sample_key, m, (cohort_size,), replace=False)
    return sorted(int(i) for i in np.asarray(ids)), client_key


def _examples(train, i):
    """Client i's unpadded examples (dict of [n_i, ...] arrays)."""
    return train.client_arrays(i)


def _plan(key, n, max_examples, cfg):
    """[(row indices, step key)] of the steps that run, as the engine draws them."""
    batch = cfg["batch_size"]
    plan_key, step_key = jax.random.split(key)
    if cfg["local_steps"] is not None:
        total = cfg["local_steps"]
        idx = np.asarray(jax.random.randint(plan_key, (total, batch), 0, max(n, 1)))
        steps = [(t, idx[t]) for t in range(total)] if n > 0 else []
    else:
        epochs = cfg["local_epochs"] or 1
        per_epoch = math.ceil(max_examples / batch)
        total = epochs * per_epoch
        steps = []
        for e, k in enumerate(jax.random.split(plan_key, epochs)):
            order = np.argsort(np.asarray(jax.random.uniform(k, (max_examples,)))[:n],
                               kind="stable")
            steps += [(e * per_epoch + b, order[b * batch:(b + 1) * batch])
                      for b in range(per_epoch) if b * batch < n]
    step_keys = jax.random.split(step_key, total)
    return [(rows, step_keys[t]) for t, rows in steps]


@functools.lru_cache(maxsize=16)
def _grad_fn(model):
    """jit(value_and_grad) of sum_b w_b loss_b(params) on one minibatch."""
    def objective(params, batch, weights, key):
        return jnp.sum(weights * model.loss(model.apply(params, batch, key), batch))
    return jax.jit(jax.value_and_grad(objective))


def sgd(model, params, examples, key, lr, cfg, *, example_weights=None, extra_grad=None,
        grad_mask=None, loss=None):
    """Plain minibatch SGD on one client. Returns (params, [(loss, count)] per step).

    `example_weights` [n] multiplies each example's loss (FedEM's
    responsibilities); `extra_grad` is added to every gradient (SCAFFOLD's
    correction); `grad_mask` (0/1 per leaf) freezes leaves (FedBABU's head);
    `loss(params, batch, key) -> [B]` replaces the model's loss (FedRoD).
    """
    n = len(examples["y"])
    max_examples = cfg["max_examples"]
    grad = _grad_fn(model)
    steps = []
    for rows, step_key in _plan(key, n, max_examples, cfg):
        batch = {k: jnp.asarray(v[rows]) for k, v in examples.items()}
        w = np.full(len(rows), 1.0 / len(rows), np.float32)
        if example_weights is not None:
            w = w * np.asarray(example_weights, np.float32)[rows]
        if loss is None:
            value, g = grad(params, batch, jnp.asarray(w), step_key)
        else:
            value, g = jax.value_and_grad(lambda p, b=batch, w=w, k=step_key: jnp.sum(
                jnp.asarray(w) * loss(p, b, k)))(params)
        if extra_grad is not None:
            g = jax.tree.map(jnp.add, g, extra_grad)
        if grad_mask is not None:
            g = jax.tree.map(jnp.multiply, g, grad_mask)
        params = jax.tree.map(lambda p, d: p - lr * d, params, g)
        steps.append((float(value), len(rows)))
    return params, steps


def mean_step_loss(steps) -> float:
    count = sum(c for _, c in steps)
    return sum(loss * c for loss, c in steps) / max(count, 1)


def example_losses(model, params, examples) -> np.ndarray:
    """Per-example losses [n] (eval mode, float64)."""
    if len(examples["y"]) == 0:
        return np.zeros((0,))
    batch = {k: jnp.asarray(v) for k, v in examples.items()}
    return np.asarray(model.loss(model.apply(params, batch, None), batch), np.float64)


def _config(train, cfg):
    _check_sgd(cfg)
    return {**cfg, "max_examples": int(train.max_examples)}


def _naive_scaffold(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr, server_lr = float(state.hparams["client_lr"]), float(state.hparams["server_lr"])
    x, c = _f64(state.params), _f64(state.control)
    controls = [_f64(_row(state.client_control, i)) for i in range(len(train.num_examples))]
    delta, weight_sum, delta_c = jax.tree.map(np.zeros_like, x), 0.0, jax.tree.map(np.zeros_like, c)
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        correction = _f32(jax.tree.map(np.subtract, c, controls[i]))
        y, steps = sgd(model, state.params, _examples(train, i),
                       jax.random.fold_in(client_key, i), lr, cfg, extra_grad=correction)
        y = _f64(y)
        if steps and lr > 0:  # option II with K = the steps taken
            scale = len(steps) * lr
            new = jax.tree.map(lambda ci, cc, a, b, s=scale: ci - cc + (a - b) / s,
                               controls[i], c, x, y)
            delta_c = jax.tree.map(lambda t, a, b: t + a - b, delta_c, new, controls[i])
            controls[i] = new
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = jax.tree.map(lambda t, a, b, w=w: t + w * (a - b), delta, y, x)
        weight_sum += w
        loss_num += n * mean_step_loss(steps)
        n_sum += n
    mean = jax.tree.map(lambda d: d / weight_sum if weight_sum else 0 * d, delta)
    with_data = float(np.sum(np.asarray(train.num_examples) > 0))
    new = state.replace(
        round=state.round + 1,
        params=_f32(jax.tree.map(lambda a, d: a + server_lr * d, x, mean)),
        control=_f32(jax.tree.map(lambda a, d: a + d / max(with_data, 1.0), c, delta_c)),
        client_control=_f32(jax.tree.map(lambda *r: np.stack(r), *controls)))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _mean_loss(model, params, examples) -> float:
    losses = example_losses(model, params, examples)
    return float(losses.mean()) if len(losses) else 0.0


def _naive_hypcluster(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr, server_lr = float(state.hparams["client_lr"]), float(state.hparams["server_lr"])
    hyps = [_row(state.params, k) for k in range(cfg["num_models"])]
    deltas = [jax.tree.map(np.zeros_like, _f64(h)) for h in hyps]
    weights = np.zeros(cfg["num_models"])
    assignment = np.array(state.assignment)
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        examples = _examples(train, i)
        f = int(np.argmin([_mean_loss(model, h, examples) for h in hyps]))
        trained, steps = sgd(model, hyps[f], examples, jax.random.fold_in(client_key, i), lr, cfg)
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        deltas[f] = jax.tree.map(lambda t, a, b, w=w: t + w * (a - b), deltas[f], _f64(trained),
                                 _f64(hyps[f]))
        weights[f] += w
        if n > 0:
            assignment[i] = f
        loss_num += n * mean_step_loss(steps)
        n_sum += n
    new_hyps = [jax.tree.map(lambda h, d, w=weights[k]: h + server_lr * (d / w if w else 0 * d),
                             _f64(hyps[k]), deltas[k]) for k in range(cfg["num_models"])]
    new = state.replace(round=state.round + 1,
                        params=_f32(jax.tree.map(lambda *r: np.stack(r), *new_hyps)),
                        assignment=jnp.asarray(assignment, jnp.int32))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_fedem(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr, server_lr = float(state.hparams["client_lr"]), float(state.hparams["server_lr"])
    num = cfg["num_models"]
    comps = [_row(state.params, k) for k in range(num)]
    deltas = [jax.tree.map(np.zeros_like, _f64(c)) for c in comps]
    mixture = np.array(state.mixture, np.float64)
    loss_num, n_sum = 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        examples = _examples(train, i)
        if n > 0:  # E-step (log space), then M-step
            log_q = np.log(mixture[i])[:, None] - np.stack(
                [example_losses(model, c, examples) for c in comps])
            log_q -= log_q.max(0, keepdims=True)
            q = np.exp(log_q) / np.exp(log_q).sum(0, keepdims=True)
            mixture[i] = q.mean(1)
        else:
            q = np.zeros((num, 0))
        loss = 0.0
        for k in range(num):
            trained, steps = sgd(model, comps[k], examples, jax.random.fold_in(client_key, i), lr,
                                 cfg, example_weights=q[k])
            deltas[k] = jax.tree.map(lambda t, a, b, n=n: t + n * (a - b), deltas[k], _f64(trained),
                                     _f64(comps[k]))
            loss += mean_step_loss(steps)
        loss_num += n * loss
        n_sum += n
    new_comps = [jax.tree.map(lambda c, d: c + server_lr * (d / n_sum if n_sum else 0 * d),
                              _f64(comps[k]), deltas[k]) for k in range(num)]
    new = state.replace(round=state.round + 1,
                        params=_f32(jax.tree.map(lambda *r: np.stack(r), *new_comps)),
                        mixture=jnp.asarray(mixture, jnp.float32))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _naive_lg_fedavg(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(model.init, key))
    paths = [_path(p) for p, _ in flat]
    g = _f64(state.global_params)
    local_rows = [_f64(_row(state.client_local, i)) for i in range(len(train.num_examples))]
    delta, weight_sum, loss_num, n_sum = {k: 0 * v for k, v in g.items()}, 0.0, 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        both = {**g, **local_rows[i]}
        params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(both[p], jnp.float32)
                                                        for p in paths])
        trained, steps = sgd(model, params, _examples(train, i),
                             jax.random.fold_in(client_key, i), lr, cfg)
        trained = {_path(p): np.asarray(a, np.float64)
                   for p, a in jax.tree_util.tree_flatten_with_path(trained)[0]}
        local_rows[i] = {k: trained[k] for k in local_rows[i]}
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = {k: delta[k] + w * (trained[k] - g[k]) for k in g}
        weight_sum += w
        loss_num += n * mean_step_loss(steps)
        n_sum += n
    new_g = {k: g[k] + (delta[k] / weight_sum if weight_sum else 0.0) for k in g}
    client_local = ({k: np.stack([r[k] for r in local_rows]) for k in local_rows[0]}
                    if local_rows[0] else {})
    new = state.replace(round=state.round + 1, global_params=_f32(new_g),
                        client_local=_f32(client_local))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _naive_fedbabu(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    if not isinstance(cfg["personal"], (tuple, list)):
        raise NotImplementedError("the naive FedBABU takes `personal` as top-level module names.")
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    flat, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(model.init, key))
    paths = [_path(p) for p, _ in flat]
    both = {**state.head, **state.body}
    params = jax.tree_util.tree_unflatten(treedef, [both[p] for p in paths])
    mask = jax.tree_util.tree_unflatten(
        treedef, [float(p.split("/")[0] not in cfg["personal"]) for p in paths])
    body = _f64(state.body)
    delta, weight_sum, loss_num, n_sum = {k: 0 * v for k, v in body.items()}, 0.0, 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        trained, steps = sgd(model, params, _examples(train, i),
                             jax.random.fold_in(client_key, i), lr, cfg, grad_mask=mask)
        trained = {_path(p): np.asarray(a, np.float64)
                   for p, a in jax.tree_util.tree_flatten_with_path(trained)[0]}
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = {k: delta[k] + w * (trained[k] - body[k]) for k in body}
        weight_sum += w
        loss_num += n * mean_step_loss(steps)
        n_sum += n
    new_body = {k: body[k] + (delta[k] / weight_sum if weight_sum else 0.0) for k in body}
    new = state.replace(round=state.round + 1, body=_f32(new_body))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


def _ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _naive_fedrod(model, state, train, key, cfg):
    cfg = _config(train, cfg)
    if not isinstance(cfg["personal"], (tuple, list)):
        raise NotImplementedError("the naive FedRoD takes `personal` as top-level module names.")
    ids, client_key = _cohort(train, key, cfg["clients_per_round"])
    lr = float(state.hparams["client_lr"])
    heads = [_row(state.personal_head, i) for i in range(len(train.num_examples))]
    x = _f64(state.params)
    delta, weight_sum, loss_num, n_sum = jax.tree.map(np.zeros_like, x), 0.0, 0.0, 0.0
    for i in ids:
        n = float(train.num_examples[i])
        examples = _examples(train, i)
        num_classes = jax.eval_shape(model.apply, state.params, {
            k: jnp.zeros((1,) + train.example_shape(k), v.dtype)
            for k, v in train.examples.items()}, None).shape[-1]
        counts = np.bincount(examples["y"], minlength=num_classes).astype(np.float32)
        log_counts = jnp.asarray(np.where(counts > 0, np.log(np.maximum(counts, 1)), -1e9),
                                 jnp.float32)

        def loss(p, batch, k, log_counts=log_counts):
            params, h = p
            generic = model.apply(params, batch, k)
            swapped = {**jax.lax.stop_gradient(params),
                       **{name: h[name] for name in cfg["personal"]}}
            personal = model.apply(swapped, batch, k)
            return (_ce(generic + log_counts[None, :], batch["y"])
                    + _ce(jax.lax.stop_gradient(generic) + personal, batch["y"]))

        head_tree = {name: {leaf.split("/", 1)[1]: a for leaf, a in heads[i].items()
                            if leaf.split("/", 1)[0] == name} for name in cfg["personal"]}
        (trained, h), steps = sgd(model, (state.params, head_tree), examples,
                                  jax.random.fold_in(client_key, i), lr, cfg, loss=loss)
        heads[i] = {f"{name}/{leaf}": a for name in cfg["personal"]
                    for leaf, a in h[name].items()}
        w = n if cfg["weighting"] == "num_examples" else float(n > 0)
        delta = jax.tree.map(lambda t, a, b, w=w: t + w * (a - b), delta, _f64(trained), x)
        weight_sum += w
        loss_num += n * mean_step_loss(steps)
        n_sum += n
    params = jax.tree.map(lambda a, d: a + (d / weight_sum if weight_sum else 0 * d), x, delta)
    new = state.replace(round=state.round + 1, params=_f32(params), personal_head=_f32(
        {k: np.stack([np.asarray(h[k]) for h in heads]) for k in heads[0]}))
    return new, {"train_loss": loss_num / max(n_sum, 1.0)}


NAIVE_ROUNDS = {
    "scaffold": _naive_scaffold,
    "fedrod": _naive_fedrod,
    "fedbabu": _naive_fedbabu,
    "lg_fedavg": _naive_lg_fedavg,
    "hypcluster": _naive_hypcluster,
    "fedem": _naive_fedem,
}

# The factory defaults of the arguments each reference reads (checked against the
# factories' signatures by the test suite).
_SCHEDULE = {"clients_per_round": None, "batch_size": 32, "local_steps": None,
             "local_epochs": None, "client_optimizer": "sgd"}
DEFAULTS = {
    "scaffold": {**_SCHEDULE, "server_optimizer": "sgd", "weighting": "uniform"},
    "hypcluster": {**_SCHEDULE, "server_optimizer": "sgd", "weighting": "num_examples",
                   "num_models": 2},
    "fedem": {**_SCHEDULE, "server_optimizer": "sgd", "num_models": 2},
    "lg_fedavg": {**_SCHEDULE, "weighting": "num_examples"},
    "fedbabu": {**_SCHEDULE, "weighting": "num_examples", "personal": ("head",)},
    "fedrod": {**_SCHEDULE, "weighting": "num_examples", "personal": ("head",)},
}
