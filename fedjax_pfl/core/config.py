"""Typed hyperparameters: one frozen dataclass per algorithm.

`Config` holds what every algorithm shares (the cohort, the local schedule, the
execution strategy); an algorithm's config subclasses it (or `ServerConfig`)
and adds its own fields. Each field states its check (`number`, `integer`,
`choice`, ...) and whether it is *traced*: traced fields become float32
scalars in the state's `hparams` (sweepable under `jax.vmap`, no recompile),
the others are static and may fix shapes. Construction validates every field
(one line naming the argument), so a bad value fails before anything compiles.

An algorithm is written as `build(model, cfg)` and published with `factory`:

    @config.factory(FedAvgConfig)
    def fedavg(model, cfg): ...

    fedavg(model, client_lr=0.1)         # keyword arguments, checked
    fedavg.config                        # FedAvgConfig
    fedavg.keywords                      # the fields it accepts (the CLI and sweeps read it)
    fedavg.build(model, FedAvgConfig())  # the same, from a config object
"""


import dataclasses
import functools
import inspect
import typing
import warnings
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from fedjax_pfl import validation
from fedjax_pfl.core import algorithm, local
from fedjax_pfl.core import execution as ex

WEIGHTINGS = ("num_examples", "uniform")


def field(default, *, check: Callable[[str, Any], None] | None = None,
          traced: bool = False):
    """A hyperparameter: its default, its check `check(name, value)` and whether it is traced."""
    return dataclasses.field(default=default, metadata={"check": check, "traced": traced})


def number(default, *, traced: bool = True, minimum: float = 0.0, strict: bool = False,
           optional: bool = False):
    """A finite real >= (or >) `minimum`; None allowed when `optional`. Traced by default."""
    def check(name, value):
        if not (optional and value is None):
            algorithm.check_number(name, value, minimum=minimum, strict=strict)
    return field(default, check=check, traced=traced)


def integer(default, *, minimum: int = 1, optional: bool = False):
    """A static int >= `minimum`; None allowed when `optional`."""
    def check(name, value):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        algorithm.check_arg(name, value, ok or (optional and value is None),
                            f"{'None or ' if optional else ''}an int >= {minimum}")
    return field(default, check=check)


def choice(default, options: tuple):
    """One of `options` (static)."""
    return field(default, check=lambda name, value: algorithm.check_arg(
        name, value, value in options, f"one of {options}"))


def flag(default: bool):
    """A static bool."""
    return field(default, check=lambda name, value: algorithm.check_arg(
        name, value, isinstance(value, bool), "True or False"))


def seed(default: int = 0):
    """A static seed (an int in [0, 2**32))."""
    return field(default, check=validation.check_seed)


def optimizer(default: local.OptimizerSpec = "sgd"):
    """An optax optimizer name, an `lr -> optimizer` factory or an optimizer (static)."""
    return field(default, check=local.check_optimizer)


def weighting():
    """How the server weighs clients: "num_examples" (n_i) or "uniform"."""
    return choice("num_examples", WEIGHTINGS)


def _cohort(name, value):
    del name
    algorithm.check_cohort_size(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """What every algorithm shares.

    Attributes:
      clients_per_round: S, sampled without replacement each round (None: all M).
      batch_size, local_steps, local_epochs: the local schedule (default one epoch).
      client_optimizer: optax name, `lr -> optimizer` factory or optimizer.
      client_lr: the client learning rate (traced).
      execution: client-axis strategy ("vmap", "chunked", "sharded" or an `Execution`).
    """

    clients_per_round: int | None = field(None, check=_cohort)
    batch_size: int = 32
    local_steps: int | None = None
    local_epochs: int | None = None
    client_optimizer: local.OptimizerSpec = optimizer()
    client_lr: float = number(0.05)
    execution: str | ex.Execution = "vmap"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata.get("check") is not None:
                f.metadata["check"](f.name, getattr(self, f.name))
        self.schedule, self.strategy  # noqa: B018 - validates them now
        self.check()

    def check(self) -> None:
        """Checks across fields (override; raise ValueError naming the argument)."""

    @functools.cached_property
    def schedule(self) -> local.LocalSchedule:
        """The clients' local schedule."""
        return local.LocalSchedule(self.batch_size, self.local_steps, self.local_epochs,
                                   self.client_optimizer)

    @functools.cached_property
    def strategy(self) -> ex.Execution:
        """The execution strategy of the client axis."""
        return ex.as_execution(self.execution)

    def hparams(self) -> dict:
        """The traced fields that are set, as float32 scalars (the state's `hparams`)."""
        return {f.name: jnp.asarray(getattr(self, f.name), jnp.float32)
                for f in dataclasses.fields(self)
                if f.metadata.get("traced") and getattr(self, f.name) is not None}

    def weights(self, n):
        """The clients' aggregation weights from their example counts n [S] (float)."""
        if getattr(self, "weighting", "num_examples") == "num_examples":
            return n
        return (n > 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig(Config):
    """`Config` plus a server optimizer applied to the pseudo-gradient.

    Attributes:
      server_optimizer, server_lr: the server step (`sgd(1.0)`: plain averaging;
        server_lr is traced).
    """

    server_optimizer: local.OptimizerSpec = optimizer()
    server_lr: float = number(1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuning:
    """Fields of a fine-tuning evaluation (mix in before the algorithm's config).

    Attributes:
      ft_steps, ft_epochs, ft_batch_size, ft_optimizer: the fine-tuning
        schedule (default one epoch; 0 steps or epochs evaluates the model as
        it is).
      ft_lr: fine-tuning learning rate (traced; `hparams["ft_lr"]`).
      ft_seed: seed of the fine-tuning minibatch order (client i uses
        `fold_in(key(ft_seed), i)`, the same at every evaluation).
    """

    ft_steps: int | None = None
    ft_epochs: int | None = None
    ft_batch_size: int = 32
    ft_lr: float = number(0.05)
    ft_optimizer: local.OptimizerSpec = optimizer()
    ft_seed: int = seed()

    def check(self):
        self.ft_schedule  # noqa: B018 - validates it
        super().check()

    @functools.cached_property
    def ft_schedule(self) -> local.LocalSchedule:
        """The fine-tuning schedule."""
        return local.LocalSchedule(self.ft_batch_size, self.ft_steps, self.ft_epochs,
                                   self.ft_optimizer, prefix="ft_", allow_zero=True)


def factory(config_cls: type[Config], *, fixed: dict | None = None,
            aliases: dict[str, str] | None = None, **defaults):
    """Publishes `build(model, cfg)` as `name(model, **hyperparameters)`.

    The result's signature lists the config's fields (the CLI, the sweeps and
    `help()` read it); unknown keywords raise TypeError naming them. `fixed`:
    fields this entry point sets itself (passing one is an error); `aliases`:
    old spellings {old: field}, accepted with a DeprecationWarning; `defaults`:
    other defaults than the config's.
    """
    fixed, aliases = dict(fixed or {}), dict(aliases or {})
    names = [f.name for f in dataclasses.fields(config_cls) if f.name not in fixed]

    def wrap(build):
        def make(model, **kwargs):
            for old in set(kwargs) & set(aliases):
                new = aliases[old]
                if new in kwargs:
                    raise TypeError(f"{make.__name__}: got both {old!r} and {new!r}; pass {new!r}.")
                warnings.warn(f"{make.__name__}: {old!r} is deprecated; pass {new!r}.",
                              DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            unknown = sorted(set(kwargs) - set(names))
            for key in unknown:
                if key in fixed:
                    raise ValueError(f"{key}: {make.__name__} fixes {key} = {fixed[key]!r}, got "
                                     f"{key}={kwargs[key]!r}.")
                raise TypeError(f"{make.__name__}: unexpected keyword argument {key!r}; it "
                                f"accepts {names}.")
            return build(model, config_cls(**{**defaults, **kwargs, **fixed}))

        functools.update_wrapper(make, build)
        del make.__wrapped__
        fields = {f.name: f for f in dataclasses.fields(config_cls)}
        try:  # real types, so that tools reading the signature need no namespace
            hints = typing.get_type_hints(config_cls)
        except Exception:  # noqa: BLE001 - an unresolvable annotation stays a string
            hints = {n: f.type for n, f in fields.items()}
        make.__signature__ = inspect.Signature(
            [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                 default=defaults.get(n, fields[n].default),
                                 annotation=hints[n]) for n in names])
        make.config, make.build, make.aliases = config_cls, build, aliases
        make.keywords = tuple(names)
        return make

    return wrap
