"""Fault tolerance with real processes: SIGKILL at random moments (mid-save too), SIGTERM/SIGINT,
and a topology change. Every interrupted run must end bitwise equal to an uninterrupted one.

Each training process is tests/fault_helper.py; restarts stay cheap through a persistent XLA compile
cache shared by the whole session (the first run pays the compile).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anychip.train.checkpoint import COMMIT_DELAY_ENV

HELPER = Path(__file__).with_name("fault_helper.py")
STEPS = 64
# The deterministic fields of metrics.jsonl rows (others, e.g. tokens_per_s, mfu, cost, depend on timing).
DETERMINISTIC = {"step", "loss", "grad_norm", "lr", "skipped", "tokens", "eval_loss", "eval_tokens",
                 "perplexity", "bits_per_byte", "event", "bad_steps", "lr_scale"}


@pytest.fixture(scope="module")
def run_args(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    # A one-layer model: compiles dominate these tests, and the model's size does not matter to them.
    return ["model=tiny", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
            "model.d_ff=64", "train.batch_size=8", "train.seq_len=32", "log.every=1",
            "eval.every=20", "eval.batches=1", "eval.sample_tokens=0",
            "compute.dtype=float32", "optim.warmup_steps=4",
            f"train.steps={STEPS}", f"data.path={small_corpus}", f"compute.compile_cache_dir={cache}",
            "checkpoint.every_steps=1", "checkpoint.keep=2"]


class Proc:
    """A fault_helper.py process whose output is read by a thread, so that waits can time out."""

    def __init__(self, args: list[str], devices: int = 1, env: dict[str, str] | None = None):
        full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                    "JAX_PLATFORMS": "cpu", **(env or {})}
        self.p = subprocess.Popen([sys.executable, "-u", str(HELPER), *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=full_env)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:  # type: ignore[union-attr]
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match | None:
        """The first new output line matching `pattern`; None if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                return None
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise TimeoutError(f"no line matching {pattern!r}; output:\n{self.output()}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.p.wait(timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc

    def output(self) -> str:
        return "".join(self.lines[-40:])


def train_to_end(args: list[str], **kw) -> Proc:
    proc = Proc(args, **kw)
    rc = proc.finish()
    assert rc == 0, proc.output()
    return proc


def deterministic_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k in DETERMINISTIC} for r in rows]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise-equal final params and identical deterministic metrics rows."""
    got, want = np.load(run_dir / "final_params.npz"), np.load(reference / "final_params.npz")
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
        assert got[name].tobytes() == want[name].tobytes(), f"{name} differs"
    assert deterministic_rows(run_dir) == deterministic_rows(reference)


def complete_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []


@pytest.fixture(scope="module")
def reference(run_args, tmp_path_factory) -> Path:
    """An uninterrupted run (it also fills the compile cache for the restarts)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_to_end([*run_args, f"run_dir={run_dir}"])
    return run_dir


def test_sigkill_after_step_n_resumes_bitwise(run_args, reference, tmp_path):
    run_dir, n = tmp_path / "run", STEPS // 2
    args = [*run_args, f"run_dir={run_dir}"]
    proc = Proc(args)
    assert proc.wait_for(rf"^STEP {n}\b")
    while n not in complete_steps(run_dir / "checkpoints"):
        time.sleep(0.01)
    proc.p.send_signal(signal.SIGKILL)  # the run goes on for a few steps, its rows are written again
    proc.finish()
    assert max(r["step"] for r in deterministic_rows(run_dir)) > n
    resumed = train_to_end(args)
    assert resumed_step(resumed) >= n  # n, or a later one committed before the kill landed
    assert_same_run(run_dir, reference)


def resumed_step(proc: Proc) -> int | None:
    m = re.search(r"resumed from .*checkpoints/(\d+)", "".join(proc.lines))
    return int(m.group(1)) if m else None


def kill_repeatedly(args: list[str], run_dir: Path, kills: int, rng: random.Random) -> int:
    """SIGKILL training `kills` times at random moments, then let it finish; returns how many kills
    left a save half-written. Every start that got to train must have resumed from the newest complete
    checkpoint on disk when the previous process died."""
    mid_save, newest = 0, None
    env = {COMMIT_DELAY_ENV: "0.05"}  # widens the window between a save's writes and its commit
    for _ in range(kills):
        proc = Proc(args, env=env)
        if rng.random() < 0.1:  # during start-up, restore or the first steps
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            first = proc.wait_for(r"^STEP (\d+)")
            assert first, f"the run ended before it was killed:\n{proc.output()}"
            if rng.random() < 0.5:
                assert proc.wait_for(rf"^STEP {int(first.group(1)) + 1}\b")
            time.sleep(rng.uniform(0, 0.25))
        proc.p.send_signal(signal.SIGKILL)
        assert proc.finish() == -signal.SIGKILL, f"the run ended before it was killed:\n{proc.output()}"
        if any(line.startswith("STEP") for line in proc.lines):
            assert resumed_step(proc) == newest, proc.output()
        ckpt_dir = run_dir / "checkpoints"
        mid_save += any("tmp" in p.name for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else 0
        newest = (complete_steps(ckpt_dir) or [None])[-1]
    last = train_to_end(args)
    assert resumed_step(last) == newest, last.output()
    return mid_save


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_random_sigkills_during_training_and_saves(run_args, reference, tmp_path):
    run_dir = tmp_path / "run"
    mid_save = kill_repeatedly([*run_args, f"run_dir={run_dir}"], run_dir, 20, random.Random(0))
    assert mid_save >= 1  # some kills really landed inside a save
    assert_same_run(run_dir, reference)


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_sigterm_and_sigint_stop_with_a_checkpoint(run_args, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*run_args, f"run_dir={run_dir}", "checkpoint.every_steps=0"]  # only stop and final checkpoints
    # A checkpoint that cannot be written within the grace period: exit 128 + SIGTERM, nothing visible.
    proc = Proc([*args, "checkpoint.grace_s=0.2"], env={COMMIT_DELAY_ENV: "30"})
    assert proc.wait_for(r"^STEP 5\b")
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish() == 128 + signal.SIGTERM, proc.output()
    assert "no checkpoint within checkpoint.grace_s=0.2s of SIGTERM" in proc.output()
    assert complete_steps(run_dir / "checkpoints") == []
    # SIGTERM: the step finishes, its checkpoint is written, exit code 75.
    proc = Proc(args)
    assert proc.wait_for(r"^STEP 8\b")
    proc.p.send_signal(signal.SIGTERM)
    assert proc.finish() == 75, proc.output()
    step = int(re.search(r"checkpoint (\d+) written", proc.output()).group(1))
    assert step >= 8 and complete_steps(run_dir / "checkpoints") == [step]
    # A second SIGINT aborts at once, here in the middle of the (slowed-down) stop checkpoint.
    proc = Proc(args, env={COMMIT_DELAY_ENV: "30"})
    assert proc.wait_for(rf"^STEP {step + 3}\b")
    proc.p.send_signal(signal.SIGINT)
    assert proc.wait_for(r"SIGINT: writing checkpoint")
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGINT)
    assert proc.finish() == -signal.SIGINT and time.monotonic() - t0 < 5
    assert complete_steps(run_dir / "checkpoints") == [step]  # the interrupted checkpoint is invisible
    last = train_to_end(args)
    assert resumed_step(last) == step
    assert_same_run(run_dir, reference)


def check_topology_change(run_args: list[str], tmp_path: Path, train_on: tuple[int, ...]) -> None:
    """Save sharded 8 ways (fsdp=8); restore checkpoint 2 of 6 on 1, 2 and 4 devices: the params are
    bitwise those saved, and on `train_on` device counts training goes on with the same batches."""
    args = [*run_args, "train.steps=6", "eval.every=1000", "checkpoint.every_steps=2",
            "checkpoint.keep=10"]
    source = tmp_path / "fsdp8"
    train_to_end(["--dump-at", "2", str(tmp_path / "saved.npz"), *args, f"run_dir={source}", "mesh.fsdp=8"],
                 devices=8)
    saved = np.load(tmp_path / "saved.npz")
    want = {r["step"]: r for r in deterministic_rows(source) if "loss" in r}
    for devices in (1, 2, 4):
        run_dir, restored = tmp_path / f"on{devices}", tmp_path / f"restored{devices}.npz"
        shutil.copytree(source, run_dir)
        train = devices in train_on
        train_to_end(["--dump-restored", "2", str(restored), *([] if train else ["--no-train"]), *args,
                      f"run_dir={run_dir}", "checkpoint.resume=2"], devices=devices)
        got = np.load(restored)
        for name in saved.files:
            assert got[name].tobytes() == saved[name].tobytes(), f"{name} on {devices} devices"
        if not train:
            continue
        rewound = run_dir / "checkpoints.rewound"  # the rewind moved, did not delete
        assert sorted(p.name for p in rewound.iterdir() if p.is_dir()) == ["4", "6"]
        assert [p.name.startswith("metrics-") for p in rewound.iterdir() if p.is_file()] == [True]
        rows = {r["step"]: r for r in deterministic_rows(run_dir) if "loss" in r}
        assert sorted(rows) == sorted(want)
        for step in (3, 4, 5, 6):  # same batches; only the summation order differs across device counts
            assert rows[step]["tokens"] == want[step]["tokens"]
            assert rows[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), (devices, step)


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_topology_change_8_devices_to_1_2_4(run_args, tmp_path):
    check_topology_change(run_args, tmp_path, train_on=(1,))  # 1 device reuses the cached compile


@pytest.mark.slow
def test_topology_change_8_devices_to_1_2_4_training_on_each(run_args, tmp_path):
    check_topology_change(run_args, tmp_path, train_on=(1, 2, 4))


@pytest.mark.slow
def test_hundred_random_sigkills(run_args, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*run_args, f"run_dir={run_dir}", "train.steps=400"]  # 100 lives of 1-3 steps
    reference_run = tmp_path / "reference"
    train_to_end([*run_args, f"run_dir={reference_run}", "train.steps=400"])
    mid_save = kill_repeatedly(args, run_dir, 100, random.Random(1))
    assert mid_save >= 5
    assert_same_run(run_dir, reference_run)
