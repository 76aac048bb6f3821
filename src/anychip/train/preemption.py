"""Stopping cleanly: SIGTERM/SIGINT handling, agreed across processes.

Schedulers (Kubernetes, Slurm, spot reclaim) send SIGTERM and a grace period before SIGKILL. The loop
asks `StopSignals.requested()` after every step (with several processes, the answer comes one step late,
see `distributed.Agreement`); when it says yes, the loop writes a checkpoint and
raises `Preempted`, which the CLI turns into exit code 75 (EX_TEMPFAIL: rerun the same command).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from anychip.parallel.distributed import Agreement

PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """`train` stopped on SIGTERM/SIGINT; exit_code is PREEMPTED_EXIT_CODE if its checkpoint was written."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
