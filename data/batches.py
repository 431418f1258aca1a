"""Deterministic, resumable minibatch order (the K-BFGS reference protocol, kbfgs.md section 3.4).

Batches are sequential slices of a per-epoch order; the remainder that does not fill a batch is
dropped (``n_examples // batch_size`` batches per epoch: MNIST 60, FACES 103, CURVES 20 at
batch size 1000); a new order is drawn only when an epoch is exhausted. As in the reference
code, the **first epoch is in the natural (unshuffled) order** and every later epoch is a fresh
uniform permutation; ``shuffle_first_epoch=True`` shuffles epoch 0 too, ``shuffle=False`` keeps
the natural order always. (In the reference, methods with a warm-start pass consume one epoch
first and so start on a shuffled order; a trainer reproduces that by consuming one epoch.)

Permutations come from the iterator's own ``numpy.random.Generator`` (PCG64) seeded with
``seed``, on the host, independent of every other random stream. The state (epoch, position,
generator state at the start of the epoch) is a flat dict of ints and one uint64 array, so it
fits in HDF5 attributes; restoring it regenerates the current epoch's order and continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np

from engine.backend import to_device

from .dataset import DataError, check_seed

__all__ = ["BatchIterator", "gather_batch"]

_MASK64 = (1 << 64) - 1


def _encode_pcg64(state: dict) -> dict:
    s, inc = state["state"]["state"], state["state"]["inc"]
    words = np.array([s >> 64, s & _MASK64, inc >> 64, inc & _MASK64], dtype=np.uint64)
    return {"rng_state": words, "rng_has_uint32": int(state["has_uint32"]), "rng_uinteger": int(state["uinteger"])}


def _decode_pcg64(d: dict) -> dict:
    w = [int(x) for x in np.asarray(d["rng_state"], dtype=np.uint64).reshape(4)]
    return {"bit_generator": "PCG64", "state": {"state": (w[0] << 64) | w[1], "inc": (w[2] << 64) | w[3]},
            "has_uint32": int(d["rng_has_uint32"]), "uinteger": int(d["rng_uinteger"])}


class BatchIterator:
    """Index batches ``(batch_size,)`` int64 over ``n_examples`` examples, epoch after epoch.

    ``epoch`` is the epoch the next batch comes from and ``position`` the number of batches
    already taken from it: after the last batch of an epoch the iterator moves to
    ``(epoch + 1, 0)`` at once (drawing the new order), so ``position == 0`` marks an epoch
    boundary. Iterating yields batches forever; take ``batches_per_epoch`` of them per epoch.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 shuffle_first_epoch: bool = False):
        for what, v in (("n_examples", n_examples), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise DataError(f"BatchIterator {what}={v!r} is not a positive integer; pass one")
        if batch_size > n_examples:
            raise DataError(f"BatchIterator batch_size={batch_size} exceeds the {n_examples} examples, so no full "
                            "batch exists; use a smaller batch size")
        self.n_examples, self.batch_size = int(n_examples), int(batch_size)
        self.seed = check_seed(seed, "BatchIterator seed")
        self.shuffle, self.shuffle_first_epoch = bool(shuffle), bool(shuffle_first_epoch)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._start_epoch(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.n_examples // self.batch_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def _shuffled(self, epoch: int) -> bool:
        return self.shuffle and (epoch > 0 or self.shuffle_first_epoch)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._position = epoch, 0
        self._epoch_rng_state = self._rng.bit_generator.state  # what a restore replays from
        self._order = self._rng.permutation(self.n_examples) if self._shuffled(epoch) else np.arange(self.n_examples)

    def next_indices(self) -> np.ndarray:
        """The next batch's example indices (a fresh int64 array)."""
        start = self._position * self.batch_size
        idx = self._order[start:start + self.batch_size].copy()
        self._position += 1
        if self._position == self.batches_per_epoch:
            self._start_epoch(self._epoch + 1)
        return idx

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_indices()

    def state_dict(self) -> dict:
        """The iterator's configuration and position: a flat dict of ints and a uint64 array."""
        return {"n_examples": self.n_examples, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": int(self.shuffle), "shuffle_first_epoch": int(self.shuffle_first_epoch),
                "epoch": self._epoch, "position": self._position, **_encode_pcg64(self._epoch_rng_state)}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a :meth:`state_dict` (values may be NumPy scalars or 0-d arrays, as read
        back from HDF5); the configuration must match this iterator's."""
        config = ("n_examples", "batch_size", "seed", "shuffle", "shuffle_first_epoch")
        try:
            values = {key: int(d[key]) for key in (*config, "epoch", "position")}
            state = _decode_pcg64(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"batch-iterator state is incomplete or malformed ({type(exc).__name__}: {exc}); "
                            "pass a dict made by BatchIterator.state_dict()") from None
        for key in config:
            if values[key] != int(getattr(self, key)):
                raise DataError(f"batch-iterator state has {key}={values[key]} but this iterator has "
                                f"{int(getattr(self, key))}; resume with the run's original data and settings")
        epoch, position = values["epoch"], values["position"]
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(f"batch-iterator state has epoch={epoch}, position={position}, outside "
                            f"0..{self.batches_per_epoch - 1} batches per epoch; the state is corrupt")
        self._rng.bit_generator.state = state
        self._start_epoch(epoch)
        self._position = position

    def __repr__(self) -> str:
        return (f"BatchIterator(n_examples={self.n_examples}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, epoch={self._epoch}, position={self._position}/{self.batches_per_epoch})")


def gather_batch(idx: np.ndarray, x: np.ndarray, y: np.ndarray | None = None, xp=None, dtype=None):
    """``(x[idx], y[idx])`` gathered on the host and moved to the backend ``xp`` (default: the
    active one) in one transfer each, optionally cast to ``dtype`` (inputs only; labels keep
    theirs). With ``y=None`` (autoencoder) the target is the same device array as the input."""
    xb = to_device(x[idx], xp=xp, dtype=dtype)
    return xb, (xb if y is None else to_device(y[idx], xp=xp))
