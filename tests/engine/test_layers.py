"""engine.layers: every layer's backward and R-operator rules against independent references."""

import numpy
import pytest

from engine.backend import to_host
from engine.gradcheck import layer_directional_errors
from engine.conv import Conv2d
from engine.layers import Dense, Identity, KroneckerLayer, Layer, ReLU, Sigmoid, Tanh, activation


def _layer_cases():
    return [Dense(5, 3), ReLU(), Sigmoid(), Tanh(), Identity()]


@pytest.mark.parametrize("layer", _layer_cases(), ids=repr)
def test_backward_against_complex_step_and_central_difference(xp, layer):
    rng = numpy.random.default_rng(0)
    params = [xp.asarray(p) for p in layer.init(rng, numpy.float64)]
    x = xp.asarray(rng.standard_normal((4, 5)) * 1.5)
    err = layer_directional_errors(layer, params, x, seed=3)
    for key, value in err.items():
        tol = 1e-14 if key.startswith("cs") else 1e-8
        assert value <= tol, (key, value)


def _rop_check(xp, layer, d_in, seed=0):
    """jvp and backward_rop against the complex step of forward and backward (independent)."""
    rng = numpy.random.default_rng(seed)
    params = [xp.asarray(p) for p in layer.init(rng, numpy.float64)]
    x = xp.asarray(rng.standard_normal((4, d_in)))
    rx = xp.asarray(rng.standard_normal((4, d_in)))
    rparams = [xp.asarray(rng.standard_normal(p.shape)) for p in params]
    y, cache = layer.forward(params, x)
    dy = xp.asarray(rng.standard_normal(y.shape))
    rdy = xp.asarray(rng.standard_normal(y.shape))
    h = 1e-30
    pc = [p + 1j * h * r for p, r in zip(params, rparams)]
    xc = x + 1j * h * rx
    yc, cache_c = layer.forward(pc, xc)
    ry = layer.jvp(params, cache, rx, rparams)
    assert float(abs(ry - yc.imag / h).max()) <= 1e-14 * float(abs(ry).max())
    dxc, dpc = layer.backward(pc, cache_c, dy + 1j * h * rdy)
    rdx, rdp = layer.backward_rop(params, cache, dy, rdy, rx, rparams)
    assert float(abs(rdx - dxc.imag / h).max()) <= 1e-14 * float(abs(rdx).max())
    for a, b in zip(rdp, dpc):
        assert float(abs(a - b.imag / h).max()) <= 1e-14 * float(abs(a).max())


@pytest.mark.parametrize("layer", _layer_cases(), ids=repr)
def test_r_operator_rules(xp, layer):
    _rop_check(xp, layer, 5)


def test_dense_homogeneous_view_roundtrip():
    layer = Dense(4, 3)
    w, b = layer.init(numpy.random.default_rng(0), numpy.float64)
    m = layer.to_matrix([w, b])
    assert m.shape == (3, 5)
    w2, b2 = layer.from_matrix(m)
    assert numpy.array_equal(w2, w) and numpy.array_equal(b2, b)


def test_dense_init_matches_pytorch_linear_default():
    layer = Dense(400, 300)
    w, b = layer.init(numpy.random.default_rng(0), numpy.float64)
    bound = 1 / numpy.sqrt(400)
    assert abs(w).max() <= bound and abs(b).max() <= bound
    assert abs(w.std() - bound / numpy.sqrt(3)) < 1e-3 * bound * 10


def test_bad_shapes_and_names_are_clear():
    with pytest.raises(ValueError, match="positive sizes"):
        Dense(0, 3)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        Dense(4, 3).output_shape((5,))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activation("gelu")


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_real_mode_dtype_preserved(dtype):
    rng = numpy.random.default_rng(0)
    for layer in _layer_cases():
        params = layer.init(rng, dtype)
        x = rng.standard_normal((3, 5)).astype(dtype)
        y, cache = layer.forward(params, x)
        dx, dp = layer.backward(params, cache, y)
        assert y.dtype == dtype and dx.dtype == dtype and all(d.dtype == dtype for d in dp)


def test_the_layer_contract_is_an_abstract_base():
    """Layer declares forward/backward/jvp/backward_rop; a layer missing one cannot be built."""
    class ForwardOnly(Layer):
        def forward(self, params, x):
            return x, None

    with pytest.raises(TypeError, match="abstract"):
        ForwardOnly()
    for layer in (Dense(4, 3), Conv2d(1, 2, 3)):
        assert isinstance(layer, KroneckerLayer) and layer.kronecker
    assert not Dense(4, 3).spatial and Conv2d(1, 2, 3).spatial
    assert not any(isinstance(layer, KroneckerLayer) or layer.kronecker for layer in (ReLU(), Identity()))
    assert Dense(4, 3).locations(6, 6) == 1 and Conv2d(1, 2, 3).locations(6 * 9, 6) == 9
    with pytest.raises(ValueError, match="does not fit the batch size"):
        Dense(4, 3).locations(12, 6)


@pytest.mark.parametrize("layer", _layer_cases(), ids=repr)
def test_input_gradient_is_backward_dx(xp, layer):
    rng = numpy.random.default_rng(4)
    params = [xp.asarray(p) for p in layer.init(rng, numpy.float64)]
    y, cache = layer.forward(params, xp.asarray(rng.standard_normal((4, 5))))
    dy = xp.asarray(rng.standard_normal(y.shape))
    dx, _ = layer.backward(params, cache, dy)
    assert numpy.array_equal(to_host(layer.input_gradient(params, cache, dy)), to_host(dx))
