"""The precision study's targets: scalar test functions with 50-digit mpmath references, and a small
MLP whose gradient and Hessian-vector product are measured against backprop and the exact
R-operator (docs/complex-step.md sections 7.1-7.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from ..backend import array_module, get_xp, to_host
from ..curvature import HessianRop
from ..layers import Dense, activation
from ..model import Model

#: method key -> label used in tables, legends and CSV.
METHODS = {"cs": "complex step", "forward": "forward FD", "central": "central FD"}
#: precision -> (real dtype, complex dtype); the complex step of a float32 study runs in complex64.
PRECISIONS = {"float64": ("float64", "complex128"), "float32": ("float32", "complex64")}
#: names accepted by ``--target`` and ``run_study(targets=...)``.
TARGETS = ("demo", "squire-trapp", "st-power", "st-exp", "mlp-hvp", "mlp-grad", "all")
ACTIVATIONS = ("tanh", "relu")
X0 = "1.5"  # the evaluation point of every scalar test function (exact in binary)
#: Default MLP seed. A representative draw: no pre-activation closer than 1e-3 to a ReLU kink and
#: <grad L, v> not unusually small against ||grad L||. (Seed 0 has a pre-activation 5.6e-6 from a
#: kink, so ReLU finite differences fail up to h = 1e-4 there, and <grad L, v> 2000x below
#: ||grad L||, which costs the directional derivative two digits in every method.)
DEFAULT_SEED = 1


# --- step grid ----------------------------------------------------------------------------------

def default_steps() -> list[float]:
    """1e-1 ... 1e-20 every decade, then 1e-30 ... 1e-100 every ten decades, 1e-150 ... 1e-300
    every fifty, 1e-305 (just above the float64 normal range, 2.2e-308) and the subnormal 1e-310,
    where the complex step finally loses digits (docs/complex-step.md section 3)."""
    exps = list(range(1, 21)) + list(range(30, 101, 10)) + [150, 200, 250, 300, 305, 310]
    return [float(f"1e-{k}") for k in exps]


def parse_steps(text: str) -> list[float]:
    """Steps from ``"1e-1,1e-8,1e-30"``: positive finite numbers, returned unique and decreasing."""
    steps = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            h = float(item)
        except ValueError:
            raise ValueError(f"--steps entry {item!r} is not a number; give a comma list such as 1e-1,1e-8,1e-30") from None
        steps.append(h)
    return _check_steps(steps)


def _check_steps(steps) -> list[float]:
    steps = [float(h) for h in steps]
    if not steps:
        raise ValueError("the step list is empty; give at least one step such as 1e-8")
    bad = [h for h in steps if not (math.isfinite(h) and h > 0)]
    if bad:
        raise ValueError(f"steps must be positive finite numbers, got {bad[0]!r}; use e.g. 1e-1,1e-8,1e-30")
    return sorted(set(steps), reverse=True)


# --- scalar test functions (docs/complex-step.md section 7.2) -----------------------------------------

def _demo(x):
    """e^x / sqrt(sin^3 x + cos^3 x): analytic near x = 1.5 (the root's argument is ~0.997 > 0)."""
    xp = array_module(x)
    return xp.exp(x) / xp.sqrt(xp.sin(x) ** 3 + xp.cos(x) ** 3)


def _st_power(x):
    """x^(9/2) written as x^4 sqrt(x): principal branch, analytic for Re x > 0, no complex pow."""
    xp = array_module(x)
    x2 = x * x
    return x2 * x2 * xp.sqrt(x)


def _st_exp(x):
    """e^x / (sin^3 x + cos^3 x) (Squire & Trapp 1998, no square root)."""
    xp = array_module(x)
    return xp.exp(x) / (xp.sin(x) ** 3 + xp.cos(x) ** 3)


def _demo_mp(x):
    import mpmath
    return mpmath.exp(x) / mpmath.sqrt(mpmath.sin(x) ** 3 + mpmath.cos(x) ** 3)


def _st_power_mp(x):
    import mpmath
    return mpmath.power(x, mpmath.mpf(9) / 2)


def _st_exp_mp(x):
    import mpmath
    return mpmath.exp(x) / (mpmath.sin(x) ** 3 + mpmath.cos(x) ** 3)


#: name -> (array-module function, mpmath function, title for tables and plots)
SCALAR_FUNCTIONS = {
    "demo": (_demo, _demo_mp, "e^x/sqrt(sin^3 x + cos^3 x) at x = 1.5"),
    "st-power": (_st_power, _st_power_mp, "Squire-Trapp x^(9/2) at x = 1.5"),
    "st-exp": (_st_exp, _st_exp_mp, "Squire-Trapp e^x/(sin^3 x + cos^3 x) at x = 1.5"),
}


def _mpmath():
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath ships with the project's dependencies
        raise ValueError("the precision study needs mpmath for its 50-digit references; pip install mpmath") from None
    return mpmath


def scalar_reference(name: str, dps: int = 50):
    """f'(1.5) of the scalar function ``name`` as an mpmath number with ``dps`` digits.

    ``mpmath.diff`` differentiates at a raised working precision, so all ``dps`` digits are
    correct; the test suite checks them against the literature values of docs/complex-step.md 7.2.
    """
    mpmath = _mpmath()
    f_mp = SCALAR_FUNCTIONS[name][1]
    with mpmath.workdps(dps + 20):
        d = mpmath.diff(f_mp, mpmath.mpf(X0))
    with mpmath.workdps(dps):
        return +d  # rounded to dps digits


# --- MLP targets ----------------------------------------------------------------------------

@dataclass
class MLPSetup:
    """The model, data, point and direction of the MLP targets (host float64 arrays)."""

    model: Model
    sizes: tuple[int, ...]
    act: str
    batch: int
    seed: int
    w: numpy.ndarray  # flat parameters
    v: numpy.ndarray  # unit-norm direction
    x: numpy.ndarray  # inputs, batch x sizes[0]
    y: numpy.ndarray  # integer labels in [0, sizes[-1])


def _check_mlp(sizes, act, batch, seed):
    try:
        sizes = tuple(int(s) for s in sizes)
    except (TypeError, ValueError):
        raise ValueError(f"MLP sizes must be integers such as 6,10,10,4, got {sizes!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"MLP sizes need at least an input and an output width, all positive, got {','.join(map(str, sizes))}")
    if sizes[-1] < 2:
        raise ValueError(f"the MLP output width must be at least 2 classes for softmax cross-entropy, got {sizes[-1]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {act!r}; choose tanh or relu")
    if int(batch) < 1:
        raise ValueError(f"the MLP batch size must be positive, got {batch}")
    if int(seed) < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed}")
    return sizes, int(batch), int(seed)


def mlp_setup(sizes=(6, 10, 10, 4), act: str = "tanh", batch: int = 16, seed: int = DEFAULT_SEED) -> MLPSetup:
    """A softmax cross-entropy MLP with hidden activation ``act`` and a linear output layer,
    PyTorch-default initial weights from ``seed``, standard normal inputs, uniform random labels
    and a unit-norm Gaussian direction v (docs/complex-step.md section 7.3's setup)."""
    sizes, batch, seed = _check_mlp(sizes, act, batch, seed)
    layers = []
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(d_in, d_out))
        if k < len(sizes) - 2:
            layers.append(activation(act))
    model = Model(layers, "softmax_xent", input_shape=(sizes[0],), name=f"mlp {'-'.join(map(str, sizes))} {act}")
    w = to_host(model.flatten(model.init(seed=seed, dtype=numpy.float64, xp=numpy)))
    rng = numpy.random.default_rng([seed, 2009_07098])
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], size=batch)
    v = rng.standard_normal(model.n_params)
    v /= numpy.linalg.norm(v)
    return MLPSetup(model, sizes, act, batch, seed, w, v, x, y)


def _grad_flat(model, flat, x, y):
    """Flat gradient of the mean loss at the flat parameters ``flat`` (real or complex)."""
    _, grads = model.loss_and_grad(model.unflatten(flat), x, y)
    xp = array_module(flat)
    return xp.concatenate([g.reshape(-1) for g in grads])


def _loss_flat(model, flat, x, y):
    return model.loss(model.unflatten(flat), x, y)


def kinks_crossed(setup: MLPSetup, h: float) -> int:
    """Number of ReLU pre-activations (over the batch) whose sign differs between w and w + h v
    or w - h v: where a finite difference of a ReLU network steps across a kink and measures a
    jump instead of a derivative (the complex step never moves the real point). 0 for tanh."""
    model = setup.model
    relu = [i for i, layer in enumerate(model.layers) if getattr(layer, "name", "") == "relu"]
    if not relu:
        return 0
    xp = get_xp()
    w, v, x = (xp.asarray(a) for a in (setup.w, setup.v, setup.x))

    def masks(flat):
        _, caches = model.forward(model.unflatten(flat), x)
        return [caches[i] for i in relu]

    base = masks(w)
    plus, minus = masks(w + h * v), masks(w - h * v)
    return int(sum(int(to_host(((b != p) | (b != m)).sum())) for b, p, m in zip(base, plus, minus)))


def exact_hvp(setup: MLPSetup, w=None, v=None) -> numpy.ndarray:
    """The exact H v (host float64) of the setup's loss at flat weights ``w`` along ``v``
    (default: the setup's own), by Pearlmutter's R-operator (:class:`engine.curvature.HessianRop`),
    which shares no code path with the complex step."""
    w = setup.w if w is None else w
    v = setup.v if v is None else v
    xp = get_xp()
    wd, vd, xd = (xp.asarray(a, dtype=numpy.float64) for a in (w, v, setup.x))
    op = HessianRop(setup.model, setup.model.unflatten(wd), xd, xp.asarray(setup.y))
    return to_host(op.matvec(vd))
