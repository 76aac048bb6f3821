"""Stopping cleanly: SIGTERM/SIGINT handling and the checkpoint schedule, agreed across processes.

Schedulers (Kubernetes, Slurm, spot reclaim) send SIGTERM and a grace period before SIGKILL. The loop
asks `StopSignals.requested()` after every step (with several processes, the answer comes one step late,
see `Agreement`); when it says yes, the loop writes a checkpoint and
raises `Preempted`, which the CLI turns into exit code 75 (EX_TEMPFAIL: rerun the same command).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from anychip.config import CheckpointConfig

PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """`train` stopped on SIGTERM/SIGINT; exit_code is PREEMPTED_EXIT_CODE if its checkpoint was written."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Agreement:
    """True on every process if a flag was True on any: processes must take the same checkpoint and stop
    decisions, or their collectives hang.

    With one process the answer is the flag itself. With several it comes one call late: the max over all
    processes' flags is dispatched as a device computation behind the step just dispatched, and read at
    the next call, after the next step is dispatched. A blocking all-gather on every step would make the
    host wait for the device on every step and leave the device idle while the host prepares the next one.
    Every process calls at the same steps (the loop is the same program), so all read the same answers.
    """

    def __init__(self) -> None:
        self.pending: jax.Array | None = None
        if jax.process_count() > 1:
            mesh = Mesh(np.array(jax.devices()), ("processes",))
            self.rows = NamedSharding(mesh, P("processes"))
            self.reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __call__(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        local = np.full((jax.local_device_count(),), flag, np.int32)
        answer, self.pending = self.pending, self.reduce(jax.make_array_from_process_local_data(self.rows, local))
        return answer is not None and bool(answer)

    def forget(self) -> None:
        """Drop the answer in flight (it was asked before a change that all processes made together)."""
        self.pending = None


class StopSignals:
    """SIGTERM/SIGINT ask the loop to stop after the current step and write a checkpoint.

    A watchdog exits with 128+signal if that takes longer than `grace_s` (the scheduler's SIGKILL would
    come next; this way the exit code tells). A second SIGINT kills at once: the first resets SIGINT to
    the OS default, which acts even while the main thread is inside XLA, where a Python handler would
    only run after the step. The handler only sets a flag: printing there could re-enter a print.
    """

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Timer | None = None
        self._agree = Agreement()

    def __enter__(self) -> StopSignals:  # noqa: PYI034 - a plain class, not meant for subclassing
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            self._watchdog = threading.Timer(self.grace_s, self._expire)
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self) -> None:
        print(f"anychip: no checkpoint within checkpoint.grace_s={self.grace_s:g}s of {self.name}; exiting",
              file=sys.stderr, flush=True)
        os._exit(128 + (self.signum or signal.SIGTERM))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def requested(self) -> bool:
        return self._agree(self.signum is not None)


class SaveSchedule:
    """Checkpoint every `every_steps` steps and/or once `every_minutes` passed since the last save."""

    def __init__(self, cfg: CheckpointConfig):
        self.every_steps, self.every_s, self.last = cfg.every_steps, cfg.every_minutes * 60, time.monotonic()
        self._agree = Agreement()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_s) and self._agree(time.monotonic() - self.last >= self.every_s)

    def saved(self) -> None:
        self.last = time.monotonic()
        self._agree.forget()  # "is a save due?" asked before this save would say yes once more
