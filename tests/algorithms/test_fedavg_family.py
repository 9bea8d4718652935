"""FedAvg / FedProx / FedAvg-FT / Local: hand-computed goldens, reductions, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_pfl import models, testing
from fedjax_pfl.algorithms import fedavg, fedavg_ft, fedprox, local_only
from fedjax_pfl.core.local import evaluate_client
from fedjax_pfl.data.client_data import ClientData
from fedjax_pfl.models.model import Model

SCALAR = Model(init=lambda key: {"w": jnp.zeros(())},
               apply=lambda p, b, key: p["w"] * b["x"],
               loss=lambda out, b: (out - b["t"]) ** 2)
# Client A: x=[1, 2], t=[2, 4]; client B: x=[1], t=[3]. Full-batch gradients of
# mean((w x - t)^2): A: 5w - 10, B: 2w - 6.
GOLDEN = ClientData.from_clients([
    {"x": np.array([1.0, 2.0], np.float32), "t": np.array([2.0, 4.0], np.float32)},
    {"x": np.array([1.0], np.float32), "t": np.array([3.0], np.float32)},
])


def golden_round(w, lr, server_lr=1.0, weights=(2.0, 1.0)):
    wa, wb = w - lr * (5 * w - 10), w - lr * (2 * w - 6)
    mean = (weights[0] * wa + weights[1] * wb) / sum(weights)
    return w + server_lr * (mean - w)


@pytest.mark.parametrize("server_lr,weighting,weights", [
    (1.0, "num_examples", (2.0, 1.0)), (0.5, "num_examples", (2.0, 1.0)),
    (1.0, "uniform", (1.0, 1.0))])
def test_fedavg_hand_computed_golden(server_lr, weighting, weights):
    algo = fedavg(SCALAR, batch_size=2, local_epochs=1, client_lr=0.1, server_lr=server_lr,
                  weighting=weighting)
    state = algo.init(jax.random.key(0), GOLDEN)
    w = 0.0
    for r in range(3):
        state, _ = jax.jit(algo.round)(state, GOLDEN, jax.random.key(r))
        w = golden_round(w, 0.1, server_lr, weights)
        np.testing.assert_allclose(state.params["w"], w, rtol=1e-6)
    # Round 1 by hand: A -> 1.0, B -> 0.6, mean (2 * 1.0 + 0.6) / 3.
    assert golden_round(0.0, 0.1) == pytest.approx(2.6 / 3)


def test_fedprox_golden_and_mu_zero_is_fedavg():
    # Two local steps; the prox term mu/2 (w - w_t)^2 adds mu (w - w_t) to the gradient.
    mu, lr = 2.0, 0.1
    algo = fedprox(SCALAR, mu=mu, batch_size=2, local_epochs=2, client_lr=lr)
    state, _ = jax.jit(algo.round)(algo.init(jax.random.key(0), GOLDEN), GOLDEN, jax.random.key(0))

    def client(grad):
        w = 0.0
        for _ in range(2):
            w = w - lr * (grad(w) + mu * (w - 0.0))
        return w

    want = (2 * client(lambda w: 5 * w - 10) + client(lambda w: 2 * w - 6)) / 3
    np.testing.assert_allclose(state.params["w"], want, rtol=1e-6)

    a, b = fedprox(SCALAR, mu=0.0, batch_size=1), fedavg(SCALAR, batch_size=1)
    sa, _ = a.round(a.init(jax.random.key(0), GOLDEN), GOLDEN, jax.random.key(1))
    sb, _ = b.round(b.init(jax.random.key(0), GOLDEN), GOLDEN, jax.random.key(1))
    np.testing.assert_allclose(sa.params["w"], sb.params["w"], rtol=1e-6)


def test_server_optimizer_is_applied_to_the_pseudo_gradient():
    algo = fedavg(SCALAR, batch_size=2, client_lr=0.1, server_optimizer=optax.sgd(1.0,
                                                                                 momentum=0.5))
    state = algo.init(jax.random.key(0), GOLDEN)
    state, _ = algo.round(state, GOLDEN, jax.random.key(0))
    d1 = golden_round(0.0, 0.1)
    np.testing.assert_allclose(state.params["w"], d1, rtol=1e-6)
    w = float(state.params["w"])
    state, _ = algo.round(state, GOLDEN, jax.random.key(1))
    d2 = golden_round(w, 0.1) - w
    np.testing.assert_allclose(state.params["w"], w + d2 + 0.5 * d1, rtol=1e-5)


def test_local_clients_train_only_their_own_model(tiny_train, tiny_test):
    model = models.mlp((6,), 3, hidden=(8,))
    algo = local_only(model, batch_size=4, local_steps=5, client_lr=0.3)
    state = algo.init(jax.random.key(0), tiny_train)
    state, _ = jax.jit(algo.round)(state, tiny_train, jax.random.key(0))
    kernels = np.asarray(state.client_params["head"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_array_equal(kernels[3], kernels[8])  # both empty: still at the init
    # Evaluating client 0 uses client 0's own model.
    own = jax.tree.map(lambda a: a[0], state.client_params)
    want = testing.client_row(tiny_test, 0)
    got = jax.jit(algo.evaluate)(state, tiny_train, tiny_test)
    np.testing.assert_allclose(got["num_correct"][0],
                               evaluate_client(model, own, want)["num_correct"])


@pytest.mark.slow
def test_fedavg_ft_with_zero_steps_equals_fedavg_and_fine_tuning_helps(tiny_train, tiny_test):
    model = models.mlp((6,), 3, hidden=(8,))
    kw = dict(batch_size=4, local_steps=3, client_lr=0.1)
    base, zero = fedavg(model, **kw), fedavg_ft(model, ft_steps=0, **kw)
    tuned = fedavg_ft(model, ft_epochs=5, ft_lr=0.2, **kw)
    state = base.init(jax.random.key(0), tiny_train)
    for r in range(5):
        state, _ = jax.jit(base.round)(state, tiny_train, jax.random.key(r))
    hp = {**state.hparams, "ft_lr": jnp.float32(0.2)}
    e_base = base.evaluate(state, tiny_train, tiny_test)
    e_zero = zero.evaluate(state.replace(hparams=hp), tiny_train, tiny_test)
    testing.assert_trees_close(e_base, e_zero, atol=1e-6)
    e_tuned = tuned.evaluate(state.replace(hparams=hp), tiny_train, tiny_test)
    assert float(e_tuned["loss_sum"].sum()) < float(e_base["loss_sum"].sum())


@pytest.mark.parametrize("factory,kwargs,match", [
    (fedavg, {"client_lr": -1.0}, "client_lr"),
    (fedavg, {"client_lr": "big"}, "client_lr"),
    (fedavg, {"clients_per_round": 0}, "clients_per_round"),
    (fedavg, {"weighting": "median"}, "weighting"),
    (fedavg, {"server_optimizer": "nope"}, "server_optimizer"),
    (fedavg, {"client_optimizer": "nope"}, "optimizer"),
    (fedavg, {"execution": "pmap"}, "strategy"),
    (fedavg, {"batch_size": 0}, "batch_size"),
    (fedprox, {"mu": -0.1}, "mu"),
    (fedavg_ft, {"ft_lr": -1.0}, "ft_lr"),
    (fedavg_ft, {"ft_batch_size": 0}, "ft_batch_size"),
    (local_only, {"local_steps": 2, "local_epochs": 2}, "local_steps / local_epochs"),
])
def test_bad_arguments_raise_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(models.mlp((6,), 3), **kwargs)


def test_cohort_larger_than_population_fails_before_compiling(tiny_train):
    algo = fedavg(models.mlp((6,), 3), clients_per_round=50)
    with pytest.raises(ValueError, match="clients_per_round"):
        algo.init(jax.random.key(0), tiny_train)
    with pytest.raises(TypeError, match="train"):
        algo.init(jax.random.key(0), {"x": np.zeros((2, 3))})
