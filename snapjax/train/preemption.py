"""A preemption notice (SIGTERM on Cloud TPU / spot VMs) turned into a stop every host takes after the same dispatch."""
import signal

import jax
import numpy as np

from snapjax.train.base import Hooks


class Preemption:
  """Turns a preemption notice into a stop every host takes at the same step; a context manager around a run.

  One process: a SIGTERM handler sets a flag the loop polls. Several processes: JAX's distributed runtime
  catches SIGTERM itself and its preemption sync manager picks one step for every host
  (multihost_utils.reached_preemption_sync_point, called at every dispatch). A Python handler would replace the
  runtime's and a host stopping alone hangs the others in their next collective, so none is installed then.
  If the runtime's service is off (jax_enable_preemption_service=False), each host keeps its own flag and the
  hosts agree every `agree_every` steps with an allgather of the flags.
  Every host asks once per dispatch (after the same updates on every host), so a run stops at the end of a dispatch.
  """

  def __init__(self, hooks: Hooks):
    self.requested = False
    self._previous = None
    self._sync_manager = False
    self._hooks = hooks
    self._start, self._calls = 0, 0  # The sync point counter is start + dispatches: consecutive, as the service needs.
    self._processes = jax.process_count()

  def __enter__(self):
    """One process: catch SIGTERM from the start, so a notice during set-up or compilation is kept too."""
    if jax.process_count() == 1:
      self._install_handler()
    return self

  def begin(self, start: int) -> None:
    """Called once before the first step (several processes: registers the start step with JAX's service)."""
    self._start = start
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:  # Registers the start step, so a notice that arrives before the first step picks a later one.
        self.requested = multihost_utils.reached_preemption_sync_point(start)
        self._sync_manager = True
      except RuntimeError:  # The preemption service is disabled: fall back to flags and an allgather.
        self._install_handler()

  def _install_handler(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no handler, the loop never sees a request.
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, first: int, last: int) -> bool:
    """Stop after the dispatch that ran updates first..last? Asked once per dispatch by every host."""
    self._calls += 1
    if self._hooks.stop_at is not None and any([self._hooks.stop_at(s) for s in range(first, last + 1)]):
      return True
    if self._processes == 1:
      return self.requested
    from jax.experimental import multihost_utils
    if self._sync_manager:  # Counter start + dispatches: consecutive on every host (K = 1: the step).
      return self.requested or multihost_utils.reached_preemption_sync_point(self._start + self._calls)
    if last // self._hooks.agree_every == (first - 1) // self._hooks.agree_every:  # No multiple in first..last.
      return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
