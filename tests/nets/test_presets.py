"""nets: the K-BFGS paper's autoencoders exactly as docs/kbfgs.md section 3.1 lists them."""

import pytest

import nets
from engine.layers import Dense, Identity, ReLU


@pytest.mark.parametrize("name, widths, loss, n_params", [
    ("mnist-ae", [784, 1000, 500, 250, 30, 250, 500, 1000, 784], "sigmoid_xent", 2_837_314),
    ("faces-ae", [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625], "half_mse", 7_537_655),
    ("curves-ae", [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784], "sigmoid_xent", 842_340),
])
def test_autoencoder_presets(name, widths, loss, n_params):
    model = nets.build(name)
    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    assert [d.d_in for d in dense] + [dense[-1].d_out] == widths
    assert model.loss_fn.name == loss and model.n_params == n_params and model.weight_decay == 1e-5
    # one activation per weight layer: ReLU except the code layer and the output (linear)
    acts = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer, Dense):
            nxt = model.layers[i + 1] if i + 1 < len(model.layers) else Identity()
            acts.append("relu" if isinstance(nxt, ReLU) else "linear")
    half = len(dense) // 2
    assert acts == ["relu"] * (half - 1) + ["linear"] + ["relu"] * (half - 1) + ["linear"]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown network 'resnet'"):
        nets.build("resnet")


def test_mlp_checks_activation_count():
    with pytest.raises(ValueError, match="need 2 activations"):
        nets.mlp([3, 4, 2], ["relu"], "half_mse")
