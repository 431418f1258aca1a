"""Batches of a training set that stays on the host, for a CUDA device: pinned double buffering.

When the training set does not fit on the device (engine/app/train.py, ``DEVICE_DATA_FRACTION``),
each batch is gathered on the host and copied. :class:`PinnedStaging` makes that copy cheap and
overlaps it with the previous step:

* the rows are gathered (and cast to the run's dtype) straight into one of two page-locked host
  buffers (``cupyx.empty_pinned``), so the copy is a DMA at full bus speed and asynchronous;
* the copy goes on its own stream into one of two device buffers, and the compute stream waits
  for it with an event (no host sync);
* the trainer asks for batch k + 1 (``BatchIterator.peek_indices``) right after launching step k
  and before its one host sync, so the gather and the copy run while step k runs; step k reads
  the other buffer pair, and a buffer pair is refilled only two batches later, after the sync
  that ended the step reading it.

A batch that was not prefetched (the first, one after a resume, one of another size) is staged
and waited for on the spot, through the same buffers.
"""

from __future__ import annotations

import numpy

__all__ = ["PinnedStaging"]


class PinnedStaging:
    """Two pinned host buffers and two device buffers per array (``x``, and ``y`` unless None) for
    batches of ``rows`` rows; :meth:`prefetch` starts a batch's copy, :meth:`take` returns it."""

    def __init__(self, xp, x, y, rows: int, x_dtype, y_dtype=None):
        import cupyx  # noqa: PLC0415 (CuPy only; the trainer makes one only on a device)

        self.xp, self.x, self.y, self.rows = xp, x, y, int(rows)
        arrays = [(x, numpy.dtype(x_dtype))] + ([] if y is None else [(y, numpy.dtype(y_dtype or y.dtype))])
        self.pinned = [[cupyx.empty_pinned((self.rows,) + a.shape[1:], dtype=dt) for a, dt in arrays] for _ in range(2)]
        self.device = [[xp.empty((self.rows,) + a.shape[1:], dtype=dt) for a, dt in arrays] for _ in range(2)]
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.slot = 1              # the pair the last staged batch went to
        self.pending = None        # (indices, slot, event) of the batch in flight
        self.prefetched = 0        # batches taken that had been prefetched (for tests and inspection)

    def prefetch(self, idx) -> None:
        """Gather the rows ``idx`` into the next pinned buffer and start their copy to the device."""
        idx = numpy.asarray(idx, dtype=numpy.int64)
        if idx.shape[0] != self.rows:
            self.pending = None
            return
        self.slot = 1 - self.slot
        sources = [self.x] + ([] if self.y is None else [self.y])
        for src, pin, dev in zip(sources, self.pinned[self.slot], self.device[self.slot]):
            pin[...] = src[idx]  # the gather, cast to the buffer's dtype
            dev.set(pin, stream=self.stream)
        self.pending = (idx, self.slot, self.stream.record())

    def take(self, idx):
        """``(x[idx], y[idx])`` on the device (``y`` is ``x`` without targets), or None for a batch of
        another size; the compute stream waits for the copy."""
        idx = numpy.asarray(idx, dtype=numpy.int64)
        if idx.shape[0] != self.rows:
            return None
        if self.pending is not None and numpy.array_equal(self.pending[0], idx):
            self.prefetched += 1
        else:
            self.prefetch(idx)
        _, slot, event = self.pending
        self.pending = None
        self.xp.cuda.get_current_stream().wait_event(event)
        out = self.device[slot]
        return out[0], (out[0] if self.y is None else out[1])
