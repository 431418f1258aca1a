"""engine.losses: gradients against complex step and central differences; stability; curvature helpers."""

import numpy
import pytest

from engine.backend import to_host
from engine.gradcheck import loss_directional_errors
from engine.losses import HalfSquaredError, SigmoidCrossEntropy, SoftmaxCrossEntropy, get_loss
from tests.reference import numpy_twin


def _case(xp, loss, scale=1.0, seed=0):
    rng = numpy.random.default_rng(seed)
    out = rng.standard_normal((6, 5)) * scale
    if loss.classification:
        target = rng.integers(0, 5, size=6)
    else:
        target = rng.random((6, 5))
    return xp.asarray(out), xp.asarray(target)


LOSSES = [SigmoidCrossEntropy(), HalfSquaredError(), SoftmaxCrossEntropy()]


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_gradient_against_complex_step_and_fd(xp, loss):
    out, target = _case(xp, loss)
    err = loss_directional_errors(loss, out, target, seed=1)
    assert err["cs"] <= 1e-14, err
    assert err["fd"] <= 1e-8, err


@pytest.mark.parametrize("loss", [SigmoidCrossEntropy(), SoftmaxCrossEntropy()], ids=repr)
def test_stable_at_plus_minus_1000(xp, loss):
    out, target = _case(xp, loss, scale=1000.0)
    out[0, 0], out[1, 0] = 1000.0, -1000.0
    value, grad = loss.value_and_grad(out, target)
    assert bool(xp.isfinite(value)) and bool(xp.isfinite(grad).all())
    oc = out + 1e-30j * xp.ones_like(out)
    vc = loss.value(oc, target)
    assert bool(xp.isfinite(vc.real)) and bool(xp.isfinite(vc.imag))
    # derivative along the all-ones direction equals sum of the gradient
    assert abs(float(vc.imag) / 1e-30 - float(grad.sum())) <= 1e-12 * max(1.0, abs(float(grad.sum())))


def test_sigmoid_xent_initial_autoencoder_value():
    """At zero logits the per-example loss is 784 ln 2 ~ 543.4 (docs/kbfgs.md section 3.2)."""
    loss = SigmoidCrossEntropy()
    value = loss.value(numpy.zeros((3, 784)), numpy.random.default_rng(0).random((3, 784)))
    assert abs(value - 784 * numpy.log(2)) < 1e-9


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_hessian_vp_against_complex_step_of_gradient(xp, loss):
    out, target = _case(xp, loss, seed=2)
    v = xp.asarray(numpy.random.default_rng(3).standard_normal(out.shape))
    h = 1e-30
    _, gc = loss.value_and_grad(out + 1j * h * v, target)
    hv = loss.hessian_vp(out, target, v)
    assert float(abs(hv - gc.imag / h).max()) <= 1e-14 * float(abs(hv).max())


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
def test_sampled_targets_follow_the_predictive_distribution(xp, loss):
    """Targets drawn with a host generator on the outputs' module: the same draws on NumPy and
    CuPy, with the predictive distribution's moments."""
    def run(m):
        out = m.asarray(numpy.tile(numpy.array([[-1.0, 0.0, 0.5, 2.0, 1.0]]), (20000, 1)))
        t = loss.sample_targets(out, numpy.random.default_rng(0))
        assert type(t) is type(out)
        return t

    t = numpy_twin(xp, run)
    out = numpy.array([-1.0, 0.0, 0.5, 2.0, 1.0])
    if isinstance(loss, SigmoidCrossEntropy):
        assert numpy.allclose(t.mean(axis=0), 1 / (1 + numpy.exp(-out)), atol=0.015)
    elif isinstance(loss, HalfSquaredError):
        assert numpy.allclose(t.mean(axis=0), out, atol=0.03) and numpy.allclose(t.std(axis=0), 1, atol=0.03)
    else:
        p = numpy.exp(out) / numpy.exp(out).sum()
        assert numpy.allclose(numpy.bincount(t, minlength=5) / len(t), p, atol=0.015)


def test_softmax_accuracy_and_label_check(xp):
    loss = SoftmaxCrossEntropy()
    out = xp.asarray([[1.0, 2.0], [3.0, 0.0]])
    assert float(to_host(loss.accuracy(out, xp.asarray([1, 1])))) == 0.5
    with pytest.raises(ValueError, match="integer labels"):
        loss.check_target(out, xp.zeros((2, 2)))


def test_get_loss_names():
    assert isinstance(get_loss("bce"), SigmoidCrossEntropy)
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
