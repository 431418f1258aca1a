"""nets.cnn: the CNN / MLP classifier presets and the all-convolutional autoencoder."""

import numpy
import pytest

import nets
from engine.conv import Conv2d, MaxPool2d, Unflatten
from engine.layers import Dense
from nets.presets import PRESETS
from tests.reference import numpy_twin


def _n_params(model):
    """Parameter count from the layer sizes alone (independent of Model's bookkeeping)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            total += layer.c_out * layer.c_in * layer.kernel[0] * layer.kernel[1] + layer.c_out
        elif isinstance(layer, Dense):
            total += layer.d_out * layer.d_in + layer.d_out
    return total


@pytest.mark.parametrize("name,dataset,n_params", [("mnist-cnn", "mnist-classify", 61706),
                                                   ("mnist-mlp", "mnist-classify", 545810),
                                                   ("mnist-conv-ae", "mnist", 3653)])
def test_presets_registered_with_dataset_and_size(name, dataset, n_params):
    assert name in nets.preset_names()
    assert PRESETS[name][1] == dataset
    model = nets.build(name)
    assert model.name == name
    assert model.n_params == n_params == _n_params(model)
    assert model.input_shape == (784,)
    assert model.weight_decay == 1e-5
    assert nets.build(name, weight_decay=0.0).weight_decay == 0.0


def test_lenet_feature_map_shapes():
    model = nets.build("mnist-cnn")
    shapes, shape = [], model.input_shape
    for layer in model.layers:
        shape = layer.output_shape(shape)
        shapes.append(shape)
    assert isinstance(model.layers[0], Unflatten)
    assert shapes[1] == (6, 28, 28) and shapes[3] == (6, 14, 14)
    assert shapes[4] == (16, 10, 10) and shapes[6] == (16, 5, 5) and shapes[7] == (400,)
    assert model.output_shape == (10,)
    assert sum(isinstance(layer, MaxPool2d) for layer in model.layers) == 2
    assert model.kron_layers == [1, 4, 8, 10, 12]


def test_conv_ae_is_all_convolutional_and_reconstructs_the_input_shape():
    model = nets.build("mnist-conv-ae")
    assert not any(isinstance(layer, Dense) for layer in model.layers)
    assert model.output_shape == (784,)
    assert model.loss_fn.name == "sigmoid_xent"
    shape = model.input_shape
    for layer in model.layers:
        shape = layer.output_shape(shape)
        if isinstance(layer, Conv2d) and layer.c_out == 4:
            assert shape == (4, 7, 7)  # the code
    with pytest.raises(ValueError, match="divisible by 4"):
        nets.conv_autoencoder(image_shape=(1, 30, 30))


@pytest.mark.parametrize("name", ["mnist-cnn", "mnist-mlp", "mnist-conv-ae"])
def test_presets_run_and_learn_on_a_small_batch(xp, name):
    """A few plain gradient steps on 32 fixed random examples lower the loss; outputs are finite;
    the CuPy run takes the same steps as the NumPy run."""
    def run(m):
        model = nets.build(name)
        params = model.init(seed=1, xp=m)
        rng = numpy.random.default_rng(0)
        x = m.asarray(rng.random((32, 784)))
        y = m.asarray(rng.integers(0, 10, 32)) if model.loss_fn.classification else x
        flat = model.flatten(params)
        lr = 0.5 if model.loss_fn.classification else 0.002
        losses = []
        loss, grads = model.loss_and_grad(model.unflatten(flat), x, y)
        for _ in range(10):
            losses.append(loss)
            flat = flat - lr * model.flatten(grads)
            loss, grads = model.loss_and_grad(model.unflatten(flat), x, y)
        losses.append(loss)
        acc = model.loss_fn.accuracy(model.predict(model.unflatten(flat), x), y) if model.loss_fn.classification else None
        return m.stack(losses), flat, acc

    losses, _, acc = numpy_twin(xp, run, rtol=1e-11)
    assert numpy.isfinite(losses).all() and losses[-1] < losses[0]
    if acc is not None:
        assert 0.0 <= float(acc) <= 1.0
