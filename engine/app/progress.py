"""Progress of a training run: a tqdm bar per epoch on a terminal; off a terminal (a log file, a
batch job) a plain line every ``every_s`` seconds or ``every`` iterations and one per epoch, each
with the loss, the iteration rate and the time left."""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s', 7.2 -> '7s'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """A tqdm bar per epoch on a terminal, plain lines otherwise, nothing when quiet.

    Everything goes to ``stream`` (stderr), so stdout carries only the final summary / JSON. The
    time left is the remaining iterations (to ``epochs``) at the rate measured in this process, or
    the remaining CPU budget (``max_time``), whichever ends first.
    """

    #: seconds between redraws of the bar (tqdm's mininterval)
    refresh_interval = 0.1

    def __init__(self, quiet: bool, label: str = "", stream=None, every_s: float | None = 30.0,
                 every: int | None = None, max_time: float | None = None):
        self.stream = stream or sys.stderr
        self.mode = "none" if quiet else ("bar" if self._isatty() else "log")
        self.label = label
        self.bar = None
        self.every_s, self.every, self.max_time = every_s, every, max_time
        self._start = self._last = time.monotonic()
        self._start_iteration = None

    def _rate(self, trainer) -> float:
        done = trainer.iteration - (self._start_iteration or 0)
        elapsed = time.monotonic() - self._start
        return done / elapsed if elapsed > 0 and done > 0 else math.nan

    def eta(self, trainer, epochs) -> float:
        """Seconds left: iterations to the target epoch at this process's rate, or the CPU budget left."""
        rate = self._rate(trainer)
        left = math.inf
        if epochs:
            remaining = epochs * trainer.iterator.batches_per_epoch - trainer.iteration
            left = remaining / rate if rate == rate else math.nan
        if self.max_time is not None:
            left = min(left, max(self.max_time - trainer.cpu_time, 0.0))
        return left

    def _log_line(self, trainer, row: dict, epochs) -> None:
        per_epoch = trainer.iterator.batches_per_epoch
        in_epoch = trainer.iteration - trainer.epoch * per_epoch
        parts = [f"{self.label}epoch {trainer.epoch + 1}{self._target(trainer, epochs)}",
                 f"iter {in_epoch}/{per_epoch} ({trainer.iteration} total)",
                 f"loss {row.get('loss', math.nan):.6g}", f"{self._rate(trainer):.3g} it/s",
                 f"ETA {format_duration(self.eta(trainer, epochs))}"]
        print("  ".join(parts), file=self.stream, flush=True)

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _target(self, trainer, epochs) -> str:
        return f"/{epochs}" if epochs else ""

    def step(self, trainer, row: dict, epochs) -> None:
        if self._start_iteration is None:
            self._start_iteration = trainer.iteration - 1
            self._start = time.monotonic()
        if self.mode == "log":
            now = time.monotonic()
            by_time = self.every_s is not None and now - self._last >= self.every_s
            by_count = self.every is not None and trainer.iteration % self.every == 0
            if by_time or by_count:
                self._last = now
                self._log_line(trainer, row, epochs)
        if self.mode != "bar":
            return
        if self.bar is None:
            per_epoch = trainer.iterator.batches_per_epoch
            done = trainer.iteration - trainer.epoch * per_epoch - 1
            self.bar = tqdm(total=per_epoch, initial=done, desc=f"{self.label}epoch {trainer.epoch + 1}{self._target(trainer, epochs)}",
                            unit="it", leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=self.refresh_interval)
        self.bar.set_postfix_str(f"loss={row.get('loss', float('nan')):.5g}, run ETA {format_duration(self.eta(trainer, epochs))}",
                                 refresh=False)
        self.bar.update(1)

    def epoch(self, trainer, row: dict, epochs) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        if row["epoch"] == 0:
            parts = [f"{self.label}initial point"]
            parts += [f"{k.replace('_', ' ')} {row[k]:.6g}" for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
                      if k in row and row[k] == row[k]]
            print("  ".join(parts), file=self.stream, flush=True)
            return
        parts = [f"{self.label}epoch {row['epoch']}{self._target(trainer, epochs)}", f"iter {row['iterations']}"]
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            if key in row and row[key] == row[key]:
                parts.append(f"{key.replace('_', ' ')} {row[key]:.6g}")
        parts.append(f"cpu {row['cpu_time']:.1f}s")
        parts.append(f"wall {row['wall_time']:.1f}s")
        if self._start_iteration is not None and (not epochs or row["epoch"] < epochs):
            parts.append(f"ETA {format_duration(self.eta(trainer, epochs))}")
        self._last = time.monotonic()
        print("  ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(f"{self.label}{text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
