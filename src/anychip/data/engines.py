"""Where the tasks of a preparation run: in this process (`local`) or on a Ray cluster (`ray`).

A task is a plain function of one JSON-able job that writes its own outputs and returns a small
record; the engine only decides where it runs. Both engines run the same task functions on the same
jobs, so their outputs are byte-identical.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from typing import Any

from anychip.errors import UserError

ENGINES = ("local", "ray")
# Forwarded to Ray workers of a remote cluster so they reach the same store; secrets are not: a
# cluster's nodes carry their own credentials (instance roles, their environment).
_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")

Job = dict[str, Any]
LOCAL_TASKS_IN_FLIGHT = 2


def check_engine(engine: str) -> None:
    """Fail before any work if `engine` is unknown or its package is missing."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError("--engine ray needs Ray: pip install 'anychip[ray]'") from None


def _start_ray(address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start or reach the Ray cluster {address or '(local)'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray


def _common(jobs: list[Job]) -> Job:
    """The fields every job has with the same value (the tokenizer, the settings): sent once, not per task."""
    first = jobs[0]
    return {k: v for k, v in first.items() if all(k in job and job[k] == v for job in jobs[1:])}


def _run_with(fn: Callable[[Job], dict[str, Any]], common: Job, own: Job) -> dict[str, Any]:
    return fn({**common, **own})


def _run_local(fn: Callable[[Job], dict[str, Any]], jobs: list[Job],
               on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Two tasks in flight on threads: tokenizers' encode runs on every core with the GIL released, so
    one task's encode overlaps the other's per-document Python work (bytes, checksums, shard writes),
    which one task at a time leaves to a single core (0.74x raw encode, against Ray's 0.92x with two
    one-thread tasks, benchmarks/RESULTS.md). On an error the tasks not started are dropped and the
    running one finishes before the error propagates: nothing writes into an output the caller removes."""
    records = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=LOCAL_TASKS_IN_FLIGHT)
    try:
        for future in [pool.submit(fn, job) for job in jobs]:
            records.append(future.result())
            on_done(records[-1])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def run_tasks(fn: Callable[[Job], dict[str, Any]], jobs: list[Job], engine: str, ray_address: str | None,
              on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """fn(job) for every job; `on_done` sees each record as it completes. Records come back in job order.

    On Ray each task claims one CPU, and its worker runs tokenizers' thread pool with one thread
    (RAYON_NUM_THREADS=1): Ray already runs a task per core, and a pool per task sized to the whole
    machine would put cores x cores threads on it. The fields all jobs share are put in the object store
    once (one copy per node) instead of being serialized with every task."""
    if engine == "local":
        return _run_local(fn, jobs, on_done)
    ray = _start_ray(ray_address)
    env = {**{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}, "RAYON_NUM_THREADS": "1"}
    remote = ray.remote(num_cpus=1, max_retries=2, runtime_env={"env_vars": env})(_run_with)
    common = _common(jobs)
    shared = ray.put(common)
    pending = {remote.remote(fn, shared, {k: v for k, v in job.items() if k not in common}): i
               for i, job in enumerate(jobs)}
    out: list[dict[str, Any] | None] = [None] * len(jobs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            try:
                out[pending.pop(ref)] = record = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, UserError) else None
                if cause is not None:
                    raise cause from None
                raise
            on_done(record)
    return [r for r in out if r is not None]


class Progress:
    """A line per finished task: tasks (groups of files), tokens and tokens/s so far."""

    def __init__(self, total: int, doing: str, log: Callable[[str], None]):
        self.total, self.doing, self.log = total, doing, log
        self.files = self.tokens = 0
        self.start = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        self.files += 1
        self.tokens += int(record.get("tokens", 0))
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        tokens = f", {self.tokens:,} tokens ({rate:,.0f} tokens/s)" if self.tokens else ""
        self.log(f"{self.doing} {self.files:,}/{self.total:,} tasks{tokens}")
