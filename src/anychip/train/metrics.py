"""The step log: metrics.jsonl rows (and TensorBoard), progress lines with tokens/s, MFU and ETA, read
one step late so the host never waits for the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import jax

from anychip.config import Config
from anychip.cost import hardware
from anychip.errors import UserError
from anychip.files import storage_error
from anychip.model.flops import flops_per_token
from anychip.parallel.distributed import is_main_process


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class MetricsWriter:
    """Appends one JSON object per record to a metrics.jsonl, optionally mirrored to TensorBoard event
    files in `tensorboard` (a directory).

    A row is whole or absent: it goes out in one unbuffered write, and a write cut short (a full disk)
    is cut back to the end of the previous row before the one-line error is raised. A partial last line
    left by a killed process is dropped when the file is opened (readers skip it too).
    """

    def __init__(self, path: Path, tensorboard: Path | None = None):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = _drop_partial_last_line(self._fd)
        except OSError as e:
            raise storage_error(self.path, e) from None
        self._tb = None
        if tensorboard is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard=true needs tensorboardX: pip install 'anychip[tensorboard]'") from None
            self._tb = SummaryWriter(str(tensorboard))

    def write(self, record: dict[str, Any]) -> None:
        row = (json.dumps(record) + "\n").encode("utf-8")
        try:
            done = 0
            while done < len(row):  # a regular file takes it in one write unless the disk fills up
                done += os.write(self._fd, row[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise storage_error(self.path, e, f"cannot append the row of step {record.get('step')}") from None
        self._size += len(row)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        os.close(self._fd)
        if self._tb is not None:
            self._tb.close()


def _drop_partial_last_line(fd: int) -> int:
    """Cut a file back to its last newline (a row a killed process left half-written); the new size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep = size
    while keep > 0:
        block = os.pread(fd, min(keep, 1 << 16), max(keep - (1 << 16), 0))
        newline = block.rfind(b"\n")
        if newline >= 0:
            keep = keep - len(block) + newline + 1
            break
        keep -= len(block)
    os.ftruncate(fd, keep)
    return keep


class Progress:
    """One status line per logged step: step, loss, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr):
        self.total, self.start_step, self.stream = total_steps, start_step, stream
        self.t0 = time.perf_counter()

    def update(self, record: dict[str, Any]) -> None:
        step = record["step"]
        elapsed = time.perf_counter() - self.t0
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.total - step)
        parts = [f"step {step:>6}/{self.total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"{record['tokens_per_s']:,.0f} tok/s"]
        if record.get("mfu") is not None:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts.append(f"eta {format_duration(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)


class Discard:
    """The metrics writer and progress stream of processes other than 0: the same calls, nothing written."""

    def write(self, *_args: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StepLogger:
    """Turns step metrics into metrics.jsonl rows and progress lines, one step late.

    `jax` dispatches a step asynchronously; reading its metrics forces a host-device sync. Reading
    step s-1's metrics right after dispatching step s costs nothing: step s-1 is already done.
    """

    def __init__(self, cfg: Config, writer: MetricsWriter | Discard, start: int, chip: hardware.Chip,
                 observe: Callable[[int, bool], None] = lambda step, skipped: None):
        """`observe(step, skipped)` hears of every finished step (the non-finite guard counts them)."""
        self.cfg, self.writer, self.chip, self.observe = cfg, writer, chip, observe
        stream = sys.stderr if is_main_process() else Discard()
        self.progress = Progress(cfg.train.steps, start, stream=stream)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.pending: tuple[int, dict[str, jax.Array]] | None = None
        self.last_time, self.last_step = time.perf_counter(), start
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        # The cost ledger counts this process's wall time from the first step on all chips in use.
        self.t_start, self.start_step = time.perf_counter(), start
        self.n_chips = hardware.chips_in_use(chip, jax.device_count())

    def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Record that `step` was dispatched; log the previously pushed step if it is due."""
        if self.pending is not None:
            self._take(*self.pending)
        self.pending = (step, metrics)

    def drain(self) -> None:
        """Take the pending step now (logged only if due, as it would be later): before a checkpoint, so
        metrics.jsonl holds exactly the rows up to it, whenever the checkpoint is taken."""
        if self.pending is not None:
            self._take(*self.pending)
        self.pending = None

    def flush(self) -> None:
        if self.pending is not None:
            self._take(*self.pending, force=True)
        self.pending = None

    def reset(self, step: int) -> None:
        """Forget the pending step: the loop went back to checkpoint `step`."""
        self.pending = None
        self.last_time, self.last_step = time.perf_counter(), step

    def ledger(self, now: float, step: int) -> dict[str, Any]:
        """chip-hours, $ and $ per million tokens since this process started training."""
        tokens = (step - self.start_step) * self.tokens_per_step
        return hardware.cost_summary(self.chip, self.n_chips, now - self.t_start, tokens,
                                     self.cfg.log.price_per_hour)

    def _take(self, step: int, metrics: dict[str, jax.Array], force: bool = False) -> None:
        # Every step's flag, not only logged steps': the step is finished, so reading it costs no wait.
        skipped = "skipped" in metrics and float(metrics["skipped"]) > 0
        self.observe(step, skipped)
        self._log(step, metrics, force or skipped)

    def _log(self, step: int, metrics: dict[str, jax.Array], force: bool = False) -> None:
        if not (force or step % self.cfg.log.every == 0 or step == self.last_step + 1 == 1):
            return
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in metrics.items()}}  # waits for step
        now = time.perf_counter()
        record["tokens"] = step * self.tokens_per_step
        record["tokens_per_s"] = (step - self.last_step) * self.tokens_per_step / max(now - self.last_time, 1e-9)
        record["mfu"] = hardware.mfu(record["tokens_per_s"], self.flops_per_token, self.chip.peak_flops_per_device,
                            jax.device_count())
        record |= self.ledger(now, step)
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        self.writer.write(record)
        self.progress.update(record)
        self.last_time, self.last_step = now, step
