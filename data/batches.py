"""Deterministic, resumable minibatch order (the K-BFGS reference protocol, docs/kbfgs.md section 3.4).

Batches are sequential slices of a per-epoch order; the remainder that does not fill a batch is
dropped (``n_examples // batch_size`` batches per epoch: MNIST 60, FACES 103, CURVES 20 at
batch size 1000); a new order is drawn only when an epoch is exhausted. As in the reference
code, the **first epoch is in the natural (unshuffled) order** and every later epoch is a fresh
uniform permutation; ``shuffle_first_epoch=True`` shuffles epoch 0 too, ``shuffle=False`` keeps
the natural order always. (In the reference, methods with a warm-start pass consume one epoch
first and so start on a shuffled order; a trainer reproduces that by consuming one epoch.)

Two sources of the order (``order=``):

* ``"pcg64"`` (default): each epoch's permutation comes from the iterator's own
  ``numpy.random.Generator`` (PCG64) seeded with ``seed``, independent of every other stream.
* ``"reference"``: **the batches of the reference code**, exactly (docs/kbfgs.md section 3.4). Its
  ``DataSet.next_batch`` draws ``numpy.random.shuffle`` of ``arange(n)`` from the global NumPy
  generator (``numpy.random.seed(seed)``, legacy MT19937) when an epoch is exhausted and applies
  it to the *current* order, so the permutations compose; and its second-order methods
  (K-BFGS, K-BFGS(L), K-FAC) draw ``numpy.random.permutation(batch_size)`` from the same
  generator once per training iteration (a row subsample of N2 = N1, which only reorders the
  batch but advances the generator). ``draws_per_batch`` says how many such draws follow each
  batch of epoch 1 onwards (1 for those methods, whose epoch 0 is their warm-start pass; 0 for
  the others). The legacy ``numpy.random.RandomState`` stream is frozen by NumPy's policy.

The state (epoch, position, and for PCG64 the generator state at the start of the epoch) is a
flat dict of ints and one uint64 array, so it fits in HDF5 attributes; restoring it regenerates
the current epoch's order (the reference order by replaying its draws from the seed, about 2 ms
per epoch of 60 batches) and continues with exactly the batches an uninterrupted run would have
seen.
"""

from __future__ import annotations

import numpy as np

from .dataset import DataError, check_seed

__all__ = ["BatchIterator", "ORDERS"]

#: The sources of the batch order :class:`BatchIterator` accepts.
ORDERS = ("pcg64", "reference")

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
                 shuffle_first_epoch: bool = False, order: str = "pcg64", draws_per_batch: int = 0):
        for what, v in (("n_examples", n_examples), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise DataError(f"BatchIterator {what}={v!r} is not a positive integer; pass one")
        if batch_size > n_examples:
            raise DataError(f"BatchIterator batch_size={batch_size} exceeds the {n_examples} examples, so no full "
                            "batch exists; use a smaller batch size")
        if order not in ORDERS:
            raise DataError(f"BatchIterator order={order!r} is unknown; choose one of {', '.join(ORDERS)}")
        if isinstance(draws_per_batch, bool) or not isinstance(draws_per_batch, (int, np.integer)) or draws_per_batch < 0:
            raise DataError(f"BatchIterator draws_per_batch={draws_per_batch!r} is not a non-negative integer; pass one")
        self.n_examples, self.batch_size = int(n_examples), int(batch_size)
        self.seed = check_seed(seed, "BatchIterator seed")
        self.shuffle, self.shuffle_first_epoch = bool(shuffle), bool(shuffle_first_epoch)
        self.order, self.draws_per_batch = order, int(draws_per_batch)
        if order == "reference":
            if self.shuffle_first_epoch:
                raise DataError("the reference order keeps the first epoch unshuffled; "
                                "do not combine order='reference' with shuffle_first_epoch=True")
            if self.seed >= 2**32:
                raise DataError(f"BatchIterator seed={self.seed} is too large for the reference order "
                                "(numpy.random.seed takes seeds below 2**32); pass a smaller one, or use the PCG64 "
                                "order (order='pcg64', --order pcg64)")
        elif self.draws_per_batch:
            raise DataError("draws_per_batch emulates the reference code's generator and needs order='reference'")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._legacy = np.random.RandomState(self.seed) if order == "reference" else None
        self._order = np.arange(self.n_examples)
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
        if self._legacy is not None:
            if self._shuffled(epoch):  # the reference composes each new permutation with the current order
                perm = np.arange(self.n_examples)
                self._legacy.shuffle(perm)
                self._order = self._order[perm]
        else:
            self._order = self._rng.permutation(self.n_examples) if self._shuffled(epoch) else np.arange(self.n_examples)

    def _after_batch(self) -> None:
        """The reference methods' per-iteration row-subsample draws (epochs after the warm start)."""
        if self._legacy is not None and self._epoch > 0:
            for _ in range(self.draws_per_batch):
                self._legacy.permutation(self.batch_size)

    def _advance(self) -> None:
        """Past one batch: the reference draws that follow it, then a new epoch if this one is done."""
        self._position += 1
        self._after_batch()
        if self._position == self.batches_per_epoch:
            self._start_epoch(self._epoch + 1)

    def next_indices(self) -> np.ndarray:
        """The next batch's example indices (a fresh int64 array)."""
        start = self._position * self.batch_size
        idx = self._order[start:start + self.batch_size].copy()
        self._advance()
        return idx

    def peek_indices(self) -> np.ndarray:
        """The indices :meth:`next_indices` returns next, without advancing (a new epoch's order is
        drawn when the previous epoch ends, so the next batch is always known)."""
        start = self._position * self.batch_size
        return self._order[start:start + self.batch_size].copy()

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_indices()

    def state_dict(self) -> dict:
        """The iterator's configuration and position: a flat dict of ints and a uint64 array."""
        return {"n_examples": self.n_examples, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": int(self.shuffle), "shuffle_first_epoch": int(self.shuffle_first_epoch),
                "reference_order": int(self.order == "reference"), "draws_per_batch": self.draws_per_batch,
                "epoch": self._epoch, "position": self._position, **_encode_pcg64(self._epoch_rng_state)}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a :meth:`state_dict` (values may be NumPy scalars or 0-d arrays, as read
        back from HDF5); the configuration must match this iterator's."""
        config = ("n_examples", "batch_size", "seed", "shuffle", "shuffle_first_epoch", "reference_order", "draws_per_batch")
        try:
            d = {"reference_order": 0, "draws_per_batch": 0, **d}  # states written before the reference order existed
            values = {key: int(d[key]) for key in (*config, "epoch", "position")}
            state = _decode_pcg64(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"batch-iterator state is incomplete or malformed ({type(exc).__name__}: {exc}); "
                            "pass a dict made by BatchIterator.state_dict()") from None
        mine = {**{key: int(getattr(self, key)) for key in config if key != "reference_order"},
                "reference_order": int(self.order == "reference")}
        for key in config:
            if values[key] != mine[key]:
                raise DataError(f"batch-iterator state has {key}={values[key]} but this iterator has "
                                f"{mine[key]}; resume with the run's original data and settings")
        epoch, position = values["epoch"], values["position"]
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(f"batch-iterator state has epoch={epoch}, position={position}, outside "
                            f"0..{self.batches_per_epoch - 1} batches per epoch; the state is corrupt")
        if self._legacy is not None:
            self._replay(epoch, position)
            return
        self._rng.bit_generator.state = state
        self._start_epoch(epoch)
        self._position = position

    def _replay(self, epoch: int, position: int) -> None:
        """Reach (epoch, position) of the reference order by redoing its draws from the seed."""
        self._legacy = np.random.RandomState(self.seed)
        self._order = np.arange(self.n_examples)
        self._start_epoch(0)
        for _ in range(epoch * self.batches_per_epoch + position):
            self._advance()

    def __repr__(self) -> str:
        return (f"BatchIterator(n_examples={self.n_examples}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, order={self.order!r}, epoch={self._epoch}, "
                f"position={self._position}/{self.batches_per_epoch})")
