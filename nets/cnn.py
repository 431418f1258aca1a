"""Convolutional and MLP classifiers and a small all-convolutional autoencoder for MNIST.

The presets take the flat ``(N, 784)`` rows that ``data.load("mnist-classify")`` and
``data.load("mnist")`` return; the convolutional ones open with ``Unflatten((1, 28, 28))``.

| preset | layers | loss | parameters |
|---|---|---|---|
| mnist-cnn | LeNet-5 style: conv5x5(6, pad 2)-relu-maxpool2, conv5x5(16)-relu-maxpool2, 400-120-84-10 | softmax cross-entropy | 61,706 |
| mnist-mlp | 784-500-300-10, ReLU | softmax cross-entropy | 545,810 |
| mnist-conv-ae | conv3x3 s2 (1->8->16), conv3x3 16->4 code (4x7x7), upsample x2 + conv3x3 (4->16->8), conv3x3 8->1 | sigmoid cross-entropy | 3,653 |

LeNet-5 is LeCun, Bottou, Bengio, Haffner (Proc. IEEE 1998) with the modern substitutions
(ReLU for the scaled tanh, max-pooling for the trainable subsampling, full C3 connectivity, a
softmax output instead of the RBF layer). Every weight layer has a bias; weight decay defaults to
the reference protocol's tau = 1e-5 (docs/kbfgs.md section 3.2), like the autoencoder presets.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.conv import Conv2d, Flatten, MaxPool2d, Unflatten, Upsample2d
from engine.layers import Dense, ReLU
from engine.model import Model

from .mlp import mlp
from .presets import PAPER_WEIGHT_DECAY, register

__all__ = ["lenet", "conv_autoencoder", "mnist_cnn", "mnist_mlp", "mnist_conv_ae"]


def lenet(image_shape: tuple[int, int, int] = (1, 28, 28), channels: Sequence[int] = (6, 16),
          hidden: Sequence[int] = (120, 84), n_classes: int = 10, weight_decay: float = 0.0,
          name: str = "lenet") -> Model:
    """LeNet-5-style classifier on flat inputs of ``prod(image_shape)`` values.

    conv5x5(channels[0], padding 2) - ReLU - maxpool 2x2, conv5x5(channels[1]) - ReLU - maxpool
    2x2, flatten, Dense layers of widths ``hidden`` with ReLU, Dense to ``n_classes`` logits;
    softmax cross-entropy. On 28x28 MNIST the feature maps are 6x28x28 -> 6x14x14 -> 16x10x10
    -> 16x5x5 = 400 features, as in LeNet-5 (whose 32x32 input is MNIST padded by 2).
    """
    c, h, w = (int(s) for s in image_shape)
    c1, c2 = (int(s) for s in channels)
    layers = [Unflatten((c, h, w)), Conv2d(c, c1, 5, padding=2), ReLU(), MaxPool2d(2),
              Conv2d(c1, c2, 5), ReLU(), MaxPool2d(2), Flatten()]
    shape = (c * h * w,)
    for layer in layers:
        shape = layer.output_shape(shape)
    width = shape[0]
    for d in hidden:
        layers += [Dense(width, int(d)), ReLU()]
        width = int(d)
    layers.append(Dense(width, int(n_classes)))
    return Model(layers, "softmax_xent", weight_decay=weight_decay, input_shape=(c * h * w,), name=name)


def conv_autoencoder(image_shape: tuple[int, int, int] = (1, 28, 28), channels: Sequence[int] = (8, 16),
                     code_channels: int = 4, loss: str = "sigmoid_xent", weight_decay: float = 0.0,
                     name: str = "conv-ae") -> Model:
    """An all-convolutional autoencoder (no dense layer) on flat inputs of ``prod(image_shape)``.

    Encoder: 3x3 convolutions with stride 2 and padding 1 (each halves the image) with ReLU,
    then a linear 3x3 convolution to ``code_channels`` maps (the code). Decoder, mirrored:
    nearest-neighbour upsampling x2 followed by a 3x3 convolution (padding 1) with ReLU, and a
    final linear 3x3 convolution back to the input channels; the output is flattened to match the
    flat targets (logits for the sigmoid cross-entropy, as the MLP autoencoders).
    """
    c, h, w = (int(s) for s in image_shape)
    chans = [int(s) for s in channels]
    factor = 2 ** len(chans)
    if h % factor or w % factor:
        raise ValueError(f"conv_autoencoder halves the image {len(chans)} times, so {h}x{w} must be divisible by {factor}; "
                         "pass fewer channels or pad the images")
    layers = [Unflatten((c, h, w))]
    prev = c
    for ch in chans:
        layers += [Conv2d(prev, ch, 3, stride=2, padding=1), ReLU()]
        prev = ch
    layers.append(Conv2d(prev, int(code_channels), 3, padding=1))  # linear code layer
    prev = int(code_channels)
    for ch in chans[::-1]:
        layers += [Upsample2d(2), Conv2d(prev, ch, 3, padding=1), ReLU()]
        prev = ch
    layers += [Conv2d(prev, c, 3, padding=1), Flatten()]
    return Model(layers, loss, weight_decay=weight_decay, input_shape=(c * h * w,), name=name)


@register("mnist-cnn", "mnist-classify",
          "MNIST LeNet-5-style CNN: conv5x5(6)-pool-conv5x5(16)-pool-120-84-10, ReLU, softmax cross-entropy")
def mnist_cnn(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return lenet(weight_decay=weight_decay, name="mnist-cnn")


@register("mnist-mlp", "mnist-classify", "MNIST MLP classifier 784-500-300-10, ReLU, softmax cross-entropy")
def mnist_mlp(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return mlp([784, 500, 300, 10], "relu", "softmax_xent", weight_decay=weight_decay, name="mnist-mlp")


@register("mnist-conv-ae", "mnist",
          "MNIST all-convolutional autoencoder: stride-2 conv encoder to a 4x7x7 code, upsample+conv decoder, sigmoid cross-entropy")
def mnist_conv_ae(weight_decay: float = PAPER_WEIGHT_DECAY) -> Model:
    return conv_autoencoder(weight_decay=weight_decay, name="mnist-conv-ae")
