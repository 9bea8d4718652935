"""`core.config`: typed hyperparameters and the published factories (nothing compiles here)."""

import dataclasses
import inspect

import pytest

from fedjax_pfl import models
from fedjax_pfl.core import config


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(config.ServerConfig):
    lam: float = config.number(0.5, strict=True)
    depth: int = config.integer(2)
    mode: str = config.choice("a", ("a", "b"))
    extra: float | None = config.number(None, optional=True)
    frozen: bool = config.flag(False)

    def check(self):
        if self.mode == "b" and self.extra is None:
            raise ValueError("extra: expected a number when mode='b', got None.")


BUILT = []


@config.factory(ToyConfig, fixed={"depth": 3}, aliases={"lambda_": "lam"}, client_lr=0.2)
def toy(model, cfg):
    """A toy algorithm."""
    BUILT.append(cfg)
    return cfg


MODEL = models.mlp((4,), 3, hidden=())


def test_signature_lists_the_fields_with_entry_defaults():
    params = inspect.signature(toy).parameters
    assert list(params)[0] == "model" and "depth" not in params
    assert params["client_lr"].default == 0.2 and params["lam"].default == 0.5
    assert all(p.kind is p.KEYWORD_ONLY for name, p in params.items() if name != "model")
    assert toy.keywords == tuple(n for n in params if n != "model")
    assert toy.config is ToyConfig and toy.__doc__ == "A toy algorithm."


def test_built_config_has_fixed_and_default_values():
    cfg = toy(MODEL, lam=1.5)
    assert (cfg.depth, cfg.client_lr, cfg.lam, cfg.mode) == (3, 0.2, 1.5, "a")
    assert set(cfg.hparams()) == {"client_lr", "server_lr", "lam"}  # traced and set
    assert set(toy(MODEL, extra=0.1).hparams()) == {"client_lr", "server_lr", "lam", "extra"}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lamb": 1.0}, TypeError, r"unexpected keyword argument 'lamb'; it accepts \["),
    ({"depth": 4}, ValueError, r"^depth: toy fixes depth = 3, got depth=4"),
    ({"lam": 0.0}, ValueError, r"^lam: "),
    ({"lam": float("nan")}, ValueError, r"^lam: "),
    ({"mode": "c"}, ValueError, r"^mode: expected one of \('a', 'b'\), got 'c'"),
    ({"frozen": 1}, ValueError, r"^frozen: expected True or False"),
    ({"mode": "b"}, ValueError, r"^extra: expected a number when mode='b'"),
    ({"clients_per_round": 0}, ValueError, r"clients_per_round"),
    ({"batch_size": 0}, ValueError, r"^batch_size: expected an int >= 1"),
    ({"local_steps": 2, "local_epochs": 1}, ValueError, r"^local_steps / local_epochs"),
    ({"execution": "threads"}, ValueError, r"execution"),
    ({"lam": 1.0, "lambda_": 2.0}, TypeError, r"got both 'lambda_' and 'lam'"),
])
def test_bad_values_fail_at_construction(kwargs, error, match):
    BUILT.clear()
    with pytest.raises(error, match=match):
        toy(MODEL, **kwargs)
    assert not BUILT  # nothing was built


def test_alias_warns_and_gives_the_same_config():
    with pytest.warns(DeprecationWarning, match="'lambda_' is deprecated; pass 'lam'"):
        old = toy(MODEL, lambda_=2.0)
    assert old == toy(MODEL, lam=2.0)


def test_weights_follow_weighting():
    import jax.numpy as jnp

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Weighted(config.Config):
        weighting: str = config.weighting()

    n = jnp.array([0.0, 2.0, 5.0])
    assert Weighted().weights(n).tolist() == [0.0, 2.0, 5.0]
    assert Weighted(weighting="uniform").weights(n).tolist() == [0.0, 1.0, 1.0]


def test_fine_tuning_mixin_validates_its_schedule():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Tuned(config.FineTuning, config.Config):
        pass

    assert Tuned(ft_steps=0).ft_schedule.local_steps == 0  # 0: evaluate the model as it is
    assert set(Tuned().hparams()) == {"client_lr", "ft_lr"}
    with pytest.raises(ValueError, match=r"^ft_batch_size: expected an int >= 1"):
        Tuned(ft_batch_size=0)
