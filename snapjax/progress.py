"""Progress and ETA, one place for every long job: the training loop's rate, the analyses' batch counter, and the
throughput of a pass over batches (eval.py's scoring)."""
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import jax

LOG_EVERY_S = 10.0  # BatchProgress logs at most this often.


def clock(seconds: float) -> str:
  """h:mm:ss (the training loop's ETA)."""
  seconds = max(seconds, 0.0)
  return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def duration(seconds: float) -> str:
  """'42s' or '3m05s' (the analyses' elapsed time and ETA)."""
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepRate:
  """Steps per second over the window since the last progress line, and the ETA at that rate."""

  def __init__(self, t0: float, step0: int):
    self.t0, self.step0, self.rate = t0, step0, 0.0

  def update(self, step: int, now: float | None = None) -> float:
    """The rate over the window that ends now at `step` (steps/s); the next window starts here."""
    now = time.time() if now is None else now
    self.rate = (step - self.step0) / max(now - self.t0, 1e-9)
    self.t0, self.step0 = now, step
    return self.rate

  def eta(self, steps_left: int) -> float:
    """Seconds for steps_left more steps at the last window's rate."""
    return steps_left / max(self.rate, 1e-9)


class BatchProgress:
  """Logs 'WHAT: k/N batches (x%), elapsed, ETA' at most every LOG_EVERY_S seconds, and at the last batch."""

  def __init__(self, what: str, total: int | None, every_s: float = LOG_EVERY_S):
    self.what, self.total, self.every_s = what, total, every_s
    self.start = self.last = time.monotonic()

  def __call__(self, done: int) -> None:
    now = time.monotonic()
    if (now - self.last < self.every_s and done != self.total) or jax.process_index() != 0:
      return  # One progress log for a multi-host run, as training's.
    self.last = now
    elapsed = now - self.start
    if self.total:
      eta = elapsed / done * (self.total - done)
      logging.info("%s: %d/%d batches (%.0f%%), %s elapsed, ETA %s", self.what, done, self.total,
                   100 * done / self.total, duration(elapsed), duration(eta))
    else:
      logging.info("%s: %d batches, %s elapsed", self.what, done, duration(elapsed))


class Throughput:
  """Passes an iterable's batches through and times their consumer: items per second after the first batch.

  The first batch's time (its programs compile) is left out where there are more; size(batch) -> its items (rows).
  """

  def __init__(self, batches: Iterable[Any], size: Callable[[Any], int]):
    self._batches, self._size = batches, size
    self.batches, self.items, self._items_after_first = 0, 0, 0
    self._start = self._first_done = self._end = None

  def __iter__(self) -> Iterator[Any]:
    self._start = time.monotonic()
    for batch in self._batches:
      if self.batches == 1:
        self._first_done = time.monotonic()  # The consumer asks for the second batch: the first is done.
      n = self._size(batch)
      yield batch
      self.batches, self.items = self.batches + 1, self.items + n
      self._items_after_first += n if self.batches > 1 else 0
    self._end = time.monotonic()

  def rate(self) -> tuple[float, bool]:
    """(items per second, whether the first batch is included: a pass of one batch)."""
    if self._first_done is not None:
      return self._items_after_first / max(self._end - self._first_done, 1e-9), False
    return self.items / max((self._end or time.monotonic()) - (self._start or time.monotonic()), 1e-9), True
