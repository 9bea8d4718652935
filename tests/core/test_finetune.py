"""The fine-tuning curve: every entry equals explicit nu' SGD steps then a test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_pfl import metrics, models, testing
from fedjax_pfl.algorithms import fedavg_ft
from fedjax_pfl.core import finetune, local

MODEL = models.mlp((6,), 3, hidden=(8,))


@pytest.mark.parametrize("full_batch", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["minibatch", "full-batch"])
def test_curve_equals_explicit_steps(tiny_train, tiny_test, full_batch):
    params = MODEL.init(jax.random.key(0))
    lr, steps = 0.3, 3
    got = jax.jit(lambda p: finetune.finetune_evaluate(
        MODEL, p, tiny_train, tiny_test, lr, max_steps=steps, report_step=2, batch_size=4,
        full_batch=full_batch, seed=5))(params)
    assert got["curve_num_correct"].shape == (tiny_train.num_clients, steps + 1)
    np.testing.assert_array_equal(got["num_correct"], got["curve_num_correct"][:, 2])
    loss_fn = local.model_loss_fn(MODEL)
    for i in (0, 3, 7):  # client 3 has no training data: a flat curve
        row, test_row = testing.client_row(tiny_train, i), testing.client_row(tiny_test, i)
        n = int(row.num_examples)
        idx, w = local.batch_plan(jax.random.fold_in(jax.random.key(5), i), row.num_examples,
                                  tiny_train.max_examples, batch_size=4, local_steps=steps)
        p = params
        for j in range(steps + 1):
            want = local.evaluate_client(MODEL, p, test_row)
            np.testing.assert_allclose(got["curve_num_correct"][i, j], want["num_correct"])
            np.testing.assert_allclose(got["curve_loss_sum"][i, j], want["loss_sum"], rtol=1e-5,
                                       atol=1e-6)
            if j == steps:
                break
            if full_batch:
                batch = jax.tree.map(lambda a, n=n: a[:n], row.examples)
                loss = lambda q, b=batch: jnp.mean(loss_fn(q, b, None))
            else:
                batch = jax.tree.map(lambda a, k=idx[j]: a[k], row.examples)
                loss = lambda q, b=batch, wj=w[j]: jnp.sum(wj * loss_fn(q, b, None))
            g = jax.grad(loss)(p) if n else jax.tree.map(jnp.zeros_like, p)
            p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    curve = metrics.finetune_curve(got)
    assert curve["acc_mean"].shape == (steps + 1,)
    total = float(np.sum(got["num_examples"]))
    np.testing.assert_allclose(curve["acc_weighted"],
                               np.sum(got["curve_num_correct"], 0) / total)


@pytest.mark.slow  # ~12 s
def test_fedavg_ft_reports_the_curve_and_keeps_its_scalars(tiny_train, tiny_test):
    kw = dict(batch_size=4, local_steps=3, client_lr=0.1, ft_steps=2, ft_lr=0.2, ft_batch_size=4)
    plain, curved = fedavg_ft(MODEL, **kw), fedavg_ft(MODEL, ft_curve_steps=4, **kw)
    state = plain.init(jax.random.key(0), tiny_train)
    a = plain.evaluate(state, tiny_train, tiny_test)
    b = curved.evaluate(state, tiny_train, tiny_test)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert b["curve_num_correct"].shape == (tiny_train.num_clients, 5)
    # nu' = 0 is the global model itself
    np.testing.assert_allclose(b["curve_loss_sum"][:, 0],
                               fedavg_ft(MODEL, **{**kw, "ft_steps": 0}).evaluate(
                                   state, tiny_train, tiny_test)["loss_sum"], rtol=1e-5)
    with pytest.raises(ValueError, match="ft_curve_max_steps"):
        fedavg_ft(MODEL, ft_curve_steps=-1)
    with pytest.raises(ValueError, match="metrics"):
        metrics.finetune_curve(a)
