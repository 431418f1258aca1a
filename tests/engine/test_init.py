"""engine.init: PyTorch's default initial weights without PyTorch, against values PyTorch drew.

The reference values below were printed by PyTorch 2.13.0 (CPU build) on this project's
machine, from

    torch.manual_seed(9999); l1 = nn.Linear(784, 1000); l2 = nn.Linear(1000, 500)
    torch.manual_seed(0);    c1 = nn.Conv2d(1, 32, 5);  c2 = nn.Conv2d(32, 64, (3, 5))

as float.hex of the first three and last two entries (C order) and the float64 sum of each
tensor. They are an independent reference: PyTorch is not installed for the tests.
"""

import numpy
import pytest

import nets
from engine.conv import Conv2d
from engine.init import INIT_SCHEMES, TorchGenerator, _init_genrand, fan_in_uniform, make_generator
from engine.layers import Dense

#: name -> (shape, first three, last two, float64 sum)
TORCH_9999 = {
    "l1.w": ((1000, 784), ["0x1.5093d4p-6", "-0x1.d62502p-9", "0x1.0e836ap-5"], ["0x1.32fe2ep-6", "0x1.aae498p-6"],
             -2.8291880331193013),
    "l1.b": ((1000,), ["0x1.d7c6dcp-8", "0x1.442338p-7", "0x1.779178p-6"], ["0x1.e1b5fcp-6", "0x1.78509cp-6"],
             -0.6312652480864926),
    "l2.w": ((500, 1000), ["0x1.1e7392p-8", "-0x1.96ac2ap-6", "-0x1.727f74p-9"], ["0x1.b4bdd0p-6", "-0x1.794722p-6"],
             8.776883467124021),
    "l2.b": ((500,), ["0x1.1016cap-6", "0x1.757ec0p-8", "0x1.4585f8p-6"], ["0x1.528e60p-8", "-0x1.00f250p-6"],
             0.2781413544980751),
}
TORCH_0 = {
    "c1.w": ((32, 1, 5, 5), ["-0x1.888666p-10", "0x1.b77460p-4", "-0x1.511e8ap-3"], ["-0x1.07dd34p-5", "-0x1.21c6cep-5"],
             -1.0115338726973278),
    "c1.b": ((32,), ["0x1.6c6e6ep-4", "-0x1.5e2800p-4", "0x1.4688dep-3"], ["0x1.03a42ap-3", "-0x1.4b9ef4p-5"],
             0.5710930690984242),
    "c2.w": ((64, 32, 3, 5), ["0x1.2bf7b4p-8", "-0x1.162ee8p-6", "-0x1.39224ap-5"], ["0x1.7c607cp-7", "0x1.dc0bf2p-7"],
             7.511147860651818),
    "c2.b": ((64,), ["0x1.833cacp-7", "-0x1.9da160p-10", "-0x1.dabbe0p-7"], ["0x1.31446ap-5", "-0x1.561c04p-6"],
             -0.03639917309919838),
}


def _check(arr, ref):
    shape, first, last, total = ref
    assert arr.shape == shape and arr.dtype == numpy.float32
    flat = arr.ravel()
    assert [float(v) for v in flat[:3]] == [float.fromhex(h) for h in first]
    assert [float(v) for v in flat[-2:]] == [float.fromhex(h) for h in last]
    assert float(arr.astype(numpy.float64).sum()) == total  # every entry, to the last bit of the sum


def test_dense_layers_draw_pytorch_linear_values_for_seed_9999():
    g = TorchGenerator(9999)
    w1, b1 = Dense(784, 1000).init(g, numpy.float32)
    w2, b2 = Dense(1000, 500).init(g, numpy.float32)  # the generator runs on across layers
    for name, arr in (("l1.w", w1), ("l1.b", b1), ("l2.w", w2), ("l2.b", b2)):
        _check(arr, TORCH_9999[name])


def test_conv_layers_draw_pytorch_conv2d_values_for_seed_0():
    g = TorchGenerator(0)
    c1 = Conv2d(1, 32, 5).init(g, numpy.float32)
    c2 = Conv2d(32, 64, (3, 5)).init(g, numpy.float32)
    for name, arr in (("c1.w", c1[0]), ("c1.b", c1[1]), ("c2.w", c2[0]), ("c2.b", c2[1])):
        _check(arr, TORCH_0[name])


def test_model_init_torch_is_the_reference_initial_point_in_both_dtypes():
    model = nets.build("mnist-ae")
    p32 = model.init(seed=9999, dtype=numpy.float32, xp=numpy, init="torch")
    p64 = model.init(seed=9999, dtype=numpy.float64, xp=numpy, init="torch")
    _check(p32[0], TORCH_9999["l1.w"])
    _check(p32[3], TORCH_9999["l2.b"])
    assert all(a.dtype == numpy.float64 and numpy.array_equal(a, b.astype(numpy.float64)) for a, b in zip(p64, p32))
    # the 0.5 tau ||theta||^2 and loss scale the reference starts from (docs/kbfgs.md 3.2): about 784 ln 2
    assert 1.0 < float(sum((p.astype(numpy.float64) ** 2).sum() for p in p64)) < 1e4


def test_seeding_is_the_classic_init_genrand():
    # numpy's legacy RandomState seeds MT19937 with the same recurrence for an integer seed;
    # it is an independent implementation of what torch.manual_seed does
    for seed in (0, 1, 9999, 2**32 - 1):
        ours = _init_genrand(seed)
        legacy = numpy.random.RandomState(seed).get_state()[1]
        assert numpy.array_equal(ours, legacy)
    # torch keeps 64-bit seeds and seeds the twister with the low 32 bits
    a = TorchGenerator(2**32 + 5).uniform(-1, 1, 10)
    assert numpy.array_equal(a, TorchGenerator(5).uniform(-1, 1, 10))


def test_uniform_is_24_bit_grid_in_the_open_interval():
    x = TorchGenerator(3).uniform(-0.5, 0.5, (200, 300))
    assert x.dtype == numpy.float32 and x.shape == (200, 300)
    assert x.min() >= -0.5 and x.max() < 0.5
    k = (x.astype(numpy.float64) + 0.5) * 2**24  # (v / 2**24) * 1 - 0.5, exact in float32 here
    assert numpy.array_equal(k, numpy.round(k))
    assert abs(x.mean()) < 5e-3 and abs(x.std() - 1 / numpy.sqrt(12)) < 2e-3


def test_numpy_scheme_is_unchanged_and_schemes_are_named():
    w, b = fan_in_uniform(make_generator("numpy", 7), (30, 20), 20, numpy.float64)
    rng = numpy.random.default_rng(7)
    bound = 1 / numpy.sqrt(20)
    assert numpy.array_equal(w, rng.uniform(-bound, bound, size=(30, 20)))
    assert numpy.array_equal(b, rng.uniform(-bound, bound, size=(30,)))
    assert INIT_SCHEMES == ("numpy", "torch")
    with pytest.raises(ValueError, match="unknown initialisation 'xavier'"):
        make_generator("xavier", 0)
    with pytest.raises(ValueError, match="seed"):
        TorchGenerator(-1)
    with pytest.raises(ValueError, match="unknown initialisation"):
        nets.build("mnist-ae").init(seed=0, init="jax")
