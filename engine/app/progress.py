"""Progress of a training run: a tqdm bar per epoch on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm

class Progress:
    """A tqdm bar per epoch on a terminal, one plain line per epoch otherwise, nothing when quiet.

    Everything goes to ``stream`` (stderr), so stdout carries only the final summary / JSON.
    """

    #: seconds between redraws of the bar (tqdm's mininterval)
    refresh_interval = 0.1

    def __init__(self, quiet: bool, label: str = "", stream=None):
        self.stream = stream or sys.stderr
        self.mode = "none" if quiet else ("bar" if self._isatty() else "log")
        self.label = label
        self.bar = None

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _target(self, trainer, epochs) -> str:
        return f"/{epochs}" if epochs else ""

    def step(self, trainer, row: dict, epochs) -> None:
        if self.mode != "bar":
            return
        if self.bar is None:
            per_epoch = trainer.iterator.batches_per_epoch
            done = trainer.iteration - trainer.epoch * per_epoch - 1
            self.bar = tqdm(total=per_epoch, initial=done, desc=f"{self.label}epoch {trainer.epoch + 1}{self._target(trainer, epochs)}",
                            unit="it", leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=self.refresh_interval)
        self.bar.set_postfix_str(f"loss={row.get('loss', float('nan')):.5g}", refresh=False)
        self.bar.update(1)

    def epoch(self, trainer, row: dict, epochs) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode == "none":
            return
        parts = [f"{self.label}epoch {row['epoch']}{self._target(trainer, epochs)}", f"iter {row['iterations']}"]
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            if key in row and row[key] == row[key]:
                parts.append(f"{key.replace('_', ' ')} {row[key]:.6g}")
        parts.append(f"cpu {row['cpu_time']:.1f}s")
        parts.append(f"wall {row['wall_time']:.1f}s")
        print("  ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            print(f"{self.label}{text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
