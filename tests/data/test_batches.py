"""BatchIterator: each example once per epoch minus the dropped remainder, natural order in the
first epoch by default, and a saved/restored state (also through HDF5) continues exactly."""

import h5py
import numpy as np
import pytest

from data import BatchIterator, DataError


def take(it, n):
    return [it.next_indices() for _ in range(n)]


def through_hdf5(tmp_path, state: dict) -> dict:
    """``state`` written as HDF5 attributes and read back, as a run file stores it."""
    with h5py.File(tmp_path / "run.h5", "w") as f:
        g = f.create_group("iterator")
        for k, v in state.items():
            g.attrs[k] = v
    with h5py.File(tmp_path / "run.h5", "r") as f:
        return dict(f["iterator"].attrs)


def test_every_example_once_per_epoch_remainder_dropped():
    it = BatchIterator(103, 10, seed=5)
    assert it.batches_per_epoch == 10
    dropped = []
    for epoch in range(4):
        assert (it.epoch, it.position) == (epoch, 0)
        seen = np.concatenate(take(it, 10))
        assert len(seen) == 100 and len(np.unique(seen)) == 100 and seen.min() >= 0 and seen.max() < 103
        dropped.append(tuple(sorted(set(range(103)) - set(seen.tolist()))))
    assert dropped[0] == (100, 101, 102)  # natural first epoch drops the tail
    assert len(set(dropped)) > 1  # later epochs drop different examples


def test_first_epoch_natural_then_fresh_permutations():
    it = BatchIterator(50, 5, seed=0)
    first, second, third = (np.concatenate(take(it, 10)) for _ in range(3))
    np.testing.assert_array_equal(first, np.arange(50))
    assert not np.array_equal(second, np.arange(50)) and not np.array_equal(second, third)
    shuffled = BatchIterator(50, 5, seed=0, shuffle_first_epoch=True)
    assert not np.array_equal(np.concatenate(take(shuffled, 10)), np.arange(50))
    fixed = BatchIterator(50, 5, seed=0, shuffle=False)
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate(take(fixed, 10)), np.arange(50))


def test_seed_determines_the_order():
    def epochs(seed):
        it = BatchIterator(40, 8, seed=seed)
        return np.concatenate(take(it, 15))

    np.testing.assert_array_equal(epochs(3), epochs(3))
    assert not np.array_equal(epochs(3), epochs(4))


@pytest.mark.parametrize("shuffle_first_epoch", [False, True])
@pytest.mark.parametrize("cut", [0, 1, 6, 7, 8, 13, 21])  # batches per epoch = 7: cuts at and across boundaries
def test_resume_gives_the_uninterrupted_sequence(cut, shuffle_first_epoch):
    kw = dict(n_examples=30, batch_size=4, seed=11, shuffle_first_epoch=shuffle_first_epoch)
    reference = take(BatchIterator(**kw), 30)
    it = BatchIterator(**kw)
    take(it, cut)
    state = it.state_dict()
    resumed = BatchIterator(**kw)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (cut // 7, cut % 7)
    for expected, got in zip(reference[cut:], take(resumed, 30 - cut), strict=True):
        np.testing.assert_array_equal(expected, got)
    # the original keeps going identically too (state_dict does not disturb it)
    np.testing.assert_array_equal(it.next_indices(), reference[cut])


def test_state_round_trips_through_hdf5(tmp_path):
    kw = dict(n_examples=1000, batch_size=64, seed=2**40 + 7)
    reference = take(BatchIterator(**kw), 60)
    it = BatchIterator(**kw)
    take(it, 33)  # epoch 2, mid-epoch
    state = through_hdf5(tmp_path, it.state_dict())
    resumed = BatchIterator(**kw)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[33:], take(resumed, 27), strict=True):
        np.testing.assert_array_equal(expected, got)


def test_state_is_flat_ints_and_arrays():
    state = BatchIterator(10, 3, seed=1).state_dict()
    assert all(isinstance(v, (int, np.ndarray)) for v in state.values())
    assert state["rng_state"].dtype == np.uint64 and state["rng_state"].shape == (4,)


def test_bad_state_or_settings_raise():
    state = BatchIterator(30, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="batch_size=4 but this iterator has 5"):
        BatchIterator(30, 5, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="incomplete or malformed"):
        BatchIterator(30, 4, seed=1).load_state_dict({k: v for k, v in state.items() if k != "rng_state"})
    with pytest.raises(DataError, match="outside"):
        BatchIterator(30, 4, seed=1).load_state_dict({**state, "position": 7})
    with pytest.raises(DataError, match="no full batch"):
        BatchIterator(3, 4)
    with pytest.raises(DataError, match="positive integer"):
        BatchIterator(10, 0)


# --- the reference code's order -------------------------------------------------------------------
#: (seed, n, batch, draws per batch) -> {training batch: (first three indices, index sum)}, printed by
#: a transcription of the official DataSet.next_batch loop (numpy.random.seed, compounding shuffles,
#: one numpy.random.permutation(batch) per training iteration for its second-order methods after
#: their warm-start epoch). That transcription, as part of an op-for-op PyTorch port of the official
#: K-BFGS, reproduces the measured reference run (docs/kbfgs.md pitfall 20) to the printed digits.
REFERENCE_BATCHES = {
    (9999, 60000, 1000, 1): {0: ([57526, 4472, 32767], 30928267), 1: ([18035, 37823, 12435], 29583848),
                             59: ([39781, 16862, 7340], 29512439), 60: ([23095, 23547, 58156], 30295385),
                             61: ([33816, 43158, 26049], 29892605), 120: ([27407, 2100, 16482], 30003094),
                             179: ([5889, 18302, 54030], 30438473)},
    (3, 103, 10, 1): {0: ([87, 64, 101], 537), 1: ([45, 96, 89], 603), 9: ([20, 38, 97], 392),
                      10: ([26, 65, 11], 532), 11: ([45, 67, 12], 457), 20: ([87, 84, 30], 565),
                      29: ([100, 77, 80], 619)},
}
#: a first-order method (no warm start, no draws): epoch 0 in natural order, then the shuffles
REFERENCE_FIRST_ORDER = {0: ([0, 1, 2], 499500), 59: ([59000, 59001, 59002], 59499500),
                         60: ([57526, 4472, 32767], 30928267), 61: ([18035, 37823, 12435], 29583848),
                         120: ([2758, 57000, 8419], 29616878), 179: ([12296, 47399, 48537], 30020614)}


@pytest.mark.parametrize("key", list(REFERENCE_BATCHES), ids=str)
def test_reference_order_is_the_official_batch_sequence(key):
    seed, n, batch, draws = key
    it = BatchIterator(n, batch, seed=seed, order="reference", draws_per_batch=draws)
    warm = take(it, it.batches_per_epoch)  # the warm-start epoch: natural order
    np.testing.assert_array_equal(np.concatenate(warm), np.arange(it.batches_per_epoch * batch))
    batches = take(it, 3 * it.batches_per_epoch)
    for k, (first, total) in REFERENCE_BATCHES[key].items():
        assert batches[k][:3].tolist() == first and int(batches[k].sum()) == total, k
    for e in range(3):  # still every example once per epoch
        epoch = np.concatenate(batches[e * it.batches_per_epoch:(e + 1) * it.batches_per_epoch])
        assert len(np.unique(epoch)) == len(epoch)


def test_reference_order_without_draws_is_the_first_order_sequence():
    it = BatchIterator(60000, 1000, seed=9999, order="reference")
    batches = take(it, 180)
    for k, (first, total) in REFERENCE_FIRST_ORDER.items():
        assert batches[k][:3].tolist() == first and int(batches[k].sum()) == total, k


@pytest.mark.parametrize("cut", [0, 5, 10, 11, 19, 20, 37])  # 10 batches per epoch
def test_reference_order_resumes_by_replay_also_through_hdf5(tmp_path, cut):
    kw = dict(n_examples=103, batch_size=10, seed=3, order="reference", draws_per_batch=2)
    reference = take(BatchIterator(**kw), 45)
    it = BatchIterator(**kw)
    take(it, cut)
    state = through_hdf5(tmp_path, it.state_dict())
    resumed = BatchIterator(**kw)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (cut // 10, cut % 10)
    for expected, got in zip(reference[cut:], take(resumed, 45 - cut), strict=True):
        np.testing.assert_array_equal(expected, got)
    # a state of another order or draw count is refused, and old states (no such keys) load as PCG64
    with pytest.raises(DataError, match="reference_order=1 but this iterator has 0"):
        BatchIterator(103, 10, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="draws_per_batch=2 but this iterator has 1"):
        BatchIterator(103, 10, seed=3, order="reference", draws_per_batch=1).load_state_dict(state)
    plain = BatchIterator(103, 10, seed=3)
    take(plain, 4)
    old = {k: v for k, v in plain.state_dict().items() if k not in ("reference_order", "draws_per_batch")}
    again = BatchIterator(103, 10, seed=3)
    again.load_state_dict(old)
    np.testing.assert_array_equal(again.next_indices(), plain.next_indices())


def test_reference_order_arguments_are_checked():
    with pytest.raises(DataError, match="order='lcg' is unknown"):
        BatchIterator(10, 2, order="lcg")
    with pytest.raises(DataError, match="needs order='reference'"):
        BatchIterator(10, 2, draws_per_batch=1)
    with pytest.raises(DataError, match="below 2\\*\\*32"):
        BatchIterator(10, 2, seed=2**32, order="reference")
    with pytest.raises(DataError, match="unshuffled"):
        BatchIterator(10, 2, order="reference", shuffle_first_epoch=True)
    with pytest.raises(DataError, match="draws_per_batch=-1"):
        BatchIterator(10, 2, order="reference", draws_per_batch=-1)
    fixed = BatchIterator(10, 2, seed=1, order="reference", shuffle=False, draws_per_batch=1)
    np.testing.assert_array_equal(np.concatenate(take(fixed, 15)), np.tile(np.arange(10), 3))


@pytest.mark.parametrize("order", ["pcg64", "reference"])
def test_peek_shows_the_next_batch_without_advancing(order):
    """peek_indices (the trainer's prefetch) is what next_indices returns next, across epoch ends, and
    peeking changes neither the sequence nor the saved state."""
    draws = 2 if order == "reference" else 0
    plain = BatchIterator(23, 5, seed=4, order=order, draws_per_batch=draws)
    peeked = BatchIterator(23, 5, seed=4, order=order, draws_per_batch=draws)
    for _ in range(3 * plain.batches_per_epoch + 1):
        ahead = peeked.peek_indices()
        assert np.array_equal(peeked.peek_indices(), ahead)
        state = peeked.state_dict()
        got = peeked.next_indices()
        assert np.array_equal(got, ahead) and np.array_equal(got, plain.next_indices())
        assert set(state) == set(plain.state_dict())
