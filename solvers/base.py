"""The solver contract (DESIGN.md convention 5) and the solver registry.

A solver is a small object built from a model and named hyper-parameters:

* ``init(params) -> state``: a flat ``dict`` of names to arrays and scalars (``"m"``,
  ``"layer3/H_g"``, ``"k"``...). Only arrays of the active backend, NumPy arrays and Python
  ``int``/``float``/``bool`` appear, so the state round-trips through HDF5 exactly and a resumed run
  continues bit for bit on the same backend.
* ``warm_start(params, state, batches) -> state``: solvers with ``needs_warm_start`` get one
  full pass over the training batches before iteration 0 (K-FAC, K-BFGS, RMSprop; docs/kbfgs.md
  section 3.4: this consumes one epoch of the data iterator).
* ``step(params, state, x, y) -> (params, state, info)``: one iteration on the minibatch.
  ``params`` may be updated in place and returned. ``info`` is a flat dict of scalars (0-d arrays
  allowed, converted to host once per step by the caller): at least ``loss``, the regularised
  minibatch loss at the iterate the step started from.

Hyper-parameters are declared in ``hyperparameters`` with defaults, a check and a help line, so
the command line and the run files can list and validate them by their paper names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy

__all__ = ["Hyper", "Solver", "SOLVERS", "register", "get_solver", "make_solver", "solver_names",
           "positive", "nonnegative", "unit_interval", "rng_state_array", "rng_from_state_array"]


@dataclass(frozen=True)
class Hyper:
    """One named hyper-parameter: default, type, validity check (message on failure), help."""

    default: Any
    help: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""
    type: type | None = None

    def validate(self, name: str, value: Any) -> Any:
        kind = self.type or type(self.default)
        if kind is bool and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        elif kind in (int, float) and not isinstance(value, bool):
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        elif kind is str:
            value = str(value)
        if kind is float and not numpy.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{name} must be {self.requirement}, got {value!r}")
        return value


def positive(help: str, default, type=None) -> Hyper:
    return Hyper(default, help, lambda v: v > 0, "> 0", type)


def nonnegative(help: str, default, type=None) -> Hyper:
    return Hyper(default, help, lambda v: v >= 0, ">= 0", type)


def unit_interval(help: str, default) -> Hyper:
    return Hyper(default, help, lambda v: 0 <= v < 1, "in [0, 1)")


class Solver:
    """Base class: validated hyper-parameters as attributes, plus the contract above."""

    name: ClassVar[str] = "solver"
    #: one-line description for ``cstep --help`` listings
    summary: ClassVar[str] = ""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    needs_warm_start: ClassVar[bool] = False
    #: how many ``numpy.random.permutation(batch)`` draws the reference code makes per training
    #: iteration for this method (1 for its second-order methods, K-BFGS, K-BFGS(L) and K-FAC:
    #: the N2 row subsample); the ``"reference"`` batch order replays them (data/batches.py)
    reference_draws_per_batch: ClassVar[int] = 0

    def __init__(self, model, **hyper):
        unknown = sorted(set(hyper) - set(self.hyperparameters))
        if unknown:
            raise ValueError(f"{self.name} has no hyper-parameter {unknown[0]!r}; it takes {', '.join(self.hyperparameters) or 'none'}")
        self.model = model
        self.hyper = {}
        for key, spec in self.hyperparameters.items():
            value = hyper.get(key, spec.default)
            self.hyper[key] = spec.validate(key, value)
            setattr(self, key, self.hyper[key])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"

    def init(self, params) -> dict:
        raise NotImplementedError

    def warm_start(self, params, state: dict, batches) -> dict:
        return state

    def step(self, params, state: dict, x, y):
        raise NotImplementedError


SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding a solver to :data:`SOLVERS` under ``cls.name``."""
    SOLVERS[cls.name] = cls
    return cls


def solver_names() -> list[str]:
    return sorted(SOLVERS)


def get_solver(name: str) -> type[Solver]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(solver_names())}") from None


def make_solver(name: str, model, **hyper) -> Solver:
    """``get_solver(name)(model, **hyper)``."""
    return get_solver(name)(model, **hyper)


# --- RNG state as plain arrays (HDF5-friendly) ----------------------------------------------
_MASK64 = (1 << 64) - 1


def rng_state_array(rng: numpy.random.Generator) -> numpy.ndarray:
    """A PCG64 generator's full state as 6 uint64 words (exact; see :func:`rng_from_state_array`)."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise TypeError(f"only PCG64 generators are serialised, got {st['bit_generator']}")
    s, inc = st["state"]["state"], st["state"]["inc"]
    return numpy.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64, st["has_uint32"], st["uinteger"]],
                       dtype=numpy.uint64)


def rng_from_state_array(words) -> numpy.random.Generator:
    """Inverse of :func:`rng_state_array`."""
    w = [int(v) for v in numpy.asarray(words, dtype=numpy.uint64)]
    bg = numpy.random.PCG64()
    bg.state = {"bit_generator": "PCG64", "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
                "has_uint32": w[4], "uinteger": w[5]}
    return numpy.random.Generator(bg)
