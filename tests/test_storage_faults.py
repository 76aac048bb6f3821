"""Nothing lost, nothing confusing, with real processes, mounts and signals: one trainer per run directory
(a second one refused at once, a killed one's lock taken over), history moved aside rather than wiped, a
read-only or full disk found before the first step or stopping the run at the failing save within
seconds with one line, metrics rows whole or absent, outputs complete or invisible after SIGTERM.

Read-only and full disks are real: a read-only bind mount and a small tmpfs (root ignores permission bits,
so chmod would prove nothing; CI runs as root). Where mounting is not allowed the tests say so and skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoint import MICRO, file_size_limit
from test_fault_tolerance import Proc

from anychip.config import load_config
from anychip.errors import UserError
from anychip.files import SIGNAL_GRACE_S
from anychip.interop.hf import export_hf
from anychip.train.checkpoint import Checkpointer
from anychip.train.loop import train
from anychip.train.metrics import MetricsWriter
from anychip.train.report import plot_run
from anychip.train.run_dir import RunDir, load_run

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """Skips the test unless this process may mount (root in a container that allows it, as in CI)."""
    probe = tmp_path_factory.mktemp("mount_probe")
    try:
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount here ({getattr(e, 'stderr', '') or e}); the read-only and full-disk faults "
                    "need a real read-only mount or a small tmpfs")
    subprocess.run(["umount", str(probe)], check=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def bind_mount(path: Path):
    """`path` bound onto itself, so that `read_only(path)` can flip it while files are open."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path: Path, timeout: float = 60) -> None:
    """Flips the bind mount to read-only. The kernel refuses (EBUSY) while a file on it is open for
    writing, as during an async checkpoint save, so this retries until a moment between two saves."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _mount("-o", "remount,bind,ro", str(path))
        except subprocess.CalledProcessError as e:
            if "busy" not in e.stderr or time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache_storage_faults")


@pytest.fixture
def config(small_corpus, cache):
    def config(run_dir: Path, *overrides: str) -> list[str]:
        return [*MICRO, f"data.path={small_corpus}", f"run_dir={run_dir}", f"compute.compile_cache_dir={cache}",
                *overrides]

    return config


# ---------------------------------------------------------------------------------------------
# One trainer per run directory


HOLD_LOCK = "import sys, time; from anychip.train.run_dir import RunDir\n" \
            "with RunDir(sys.argv[1]).locked():\n    print('held', flush=True); time.sleep(600)"


def test_a_second_trainer_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        # data.path does not exist: had the trainer looked at anything before the lock, it would say so.
        second = subprocess.run([sys.executable, "-m", "anychip.cli", "train", f"run_dir={run_dir}", "model=tiny",
                                 f"data.path={tmp_path / 'no-data'}", "compute.compile_cache_dir=null"],
                                check=False, capture_output=True, text=True, timeout=300, env=ENV)
        assert second.returncode == 2 and second.stdout == "", second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"{run_dir} is in use by another trainer (host " in second.stderr
        assert f", pid {holder.pid}, since " in second.stderr
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup at all: the lock file still names it
        holder.wait()
    assert f"pid {holder.pid}" in (run_dir / "lock").read_text()
    logs: list[str] = []
    t0 = time.monotonic()
    with RunDir(run_dir).locked(log=logs.append):
        assert time.monotonic() - t0 < 1
        assert f"pid {os.getpid()}" in (run_dir / "lock").read_text()
    assert len(logs) == 1 and f"taking over the lock of {run_dir} from host " in logs[0]
    assert f"pid {holder.pid}" in logs[0] and "no longer running" in logs[0]
    assert (run_dir / "lock").read_text() == ""  # released: the next one has nobody to warn about


def test_a_fresh_start_moves_the_earlier_history_aside(config, tmp_path):
    """An earlier run was killed before its first checkpoint: its rows and config are history, kept."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_rows = "".join(json.dumps({"step": s, "loss": 9.0 - s}) + "\n" for s in range(1, 6))
    (run_dir / "metrics.jsonl").write_text(old_rows + '{"step": 6, "lo')  # cut short by the kill
    (run_dir / "config.yaml").write_text("train: {steps: 1000}\n")
    logs: list[str] = []
    train(load_config(None, config(run_dir, "train.steps=2")), log=logs.append)
    [moved] = [m for m in logs if m.startswith("starting fresh")]
    [history] = (run_dir / "history").iterdir()
    assert f"moved the earlier run's metrics.jsonl, config.yaml to {history}" in moved
    assert (history / "metrics.jsonl").read_text() == old_rows + '{"step": 6, "lo'
    assert (history / "config.yaml").read_text() == "train: {steps: 1000}\n"
    assert [r["step"] for r in RunDir(run_dir).read_metrics() if "loss" in r] == [1, 2]  # only this run's


# ---------------------------------------------------------------------------------------------
# Read-only and full disks


def test_read_only_checkpoints_are_found_before_the_first_step(mounts, config, tmp_path):
    steps: list[int] = []
    with bind_mount(tmp_path / "run" / "checkpoints") as checkpoints:
        read_only(checkpoints)
        with pytest.raises(UserError, match=r"checkpoints: cannot write \(Read-only file system\)") as e:
            train(load_config(None, config(tmp_path / "run", "train.steps=4")),
                  log=lambda _: None, callbacks=[lambda step, state: steps.append(step)])
    assert "\n" not in str(e.value) and steps == []
    assert (tmp_path / "run" / "lock").read_text() == ""


def test_checkpoints_turning_read_only_stop_the_run_within_seconds_in_one_line(mounts, config, tmp_path):
    """The case that used to train to the end, print 12 tracebacks and hang for 5 minutes."""
    run_dir = tmp_path / "run"
    with bind_mount(run_dir / "checkpoints") as checkpoints:
        proc = Proc(config(run_dir, "train.steps=400", "checkpoint.every_steps=2"))
        assert proc.wait_for(r"^STEP 3\b", timeout=300)
        while not (checkpoints / "2").is_dir():  # renamed into place: complete
            time.sleep(0.01)
        read_only(checkpoints)
        t0 = time.monotonic()
        try:
            rc = proc.finish(timeout=120)
        except subprocess.TimeoutExpired:
            proc.p.kill()
            pytest.fail(f"still training 120 s after the checkpoints turned read-only:\n{proc.output()}")
        elapsed = time.monotonic() - t0
        output = proc.output()
    assert rc == 2, output
    assert elapsed < 30, f"took {elapsed:.0f}s to stop"
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("anychip: error: could not write checkpoint "), output
    assert "Read-only file system" in errors[0] and "Traceback" not in output
    failed = int(re.search(r"could not write checkpoint (\d+)", errors[0]).group(1))
    steps = [int(line.split()[1]) for line in output.splitlines() if line.startswith("STEP ")]
    assert steps[-1] <= failed + 3, f"trained on to step {steps[-1]} after checkpoint {failed} failed"
    assert Checkpointer(checkpoints, read_only=True).all_steps()[0] == 2
    cfg, params, _ = load_run(run_dir)  # the earlier checkpoints are intact
    assert cfg.train.steps == 400 and params


def test_a_full_disk_stops_the_run_with_whole_rows_and_intact_checkpoints(mounts, config, tmp_path):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        run_dir = disk / "run"

        def fill_at_step_3(step, state):
            if step == 3:
                while not (run_dir / "checkpoints" / "2").is_dir():  # checkpoint 2 is complete first
                    time.sleep(0.01)
                filled.append(fill(disk))

        filled: list[Path] = []
        with pytest.raises(UserError) as e:
            train(load_config(None, config(run_dir, "train.steps=40", "checkpoint.every_steps=2")),
                  log=lambda _: None, callbacks=[fill_at_step_3])
        message = str(e.value)
        assert "\n" not in message and ("No space left on device" in message or "no room for a checkpoint" in message)
        filled[0].unlink()
        text = (run_dir / "metrics.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(line)["step"] <= 6 for line in text.splitlines())
        assert Checkpointer(run_dir / "checkpoints", read_only=True).all_steps() == [2]
        assert load_run(run_dir)[0].train.steps == 40
        plot_run(run_dir, tmp_path / "report.png")
        # Exporting onto a full disk: one line, and nothing there afterwards, not even a hidden temporary.
        with tmpfs(tmp_path / "small", "64k") as small:
            with pytest.raises(UserError, match=r"out: cannot write \(.*No space left on device.*\); nothing was left"):
                export_hf(run_dir, small / "out")
            assert list(small.iterdir()) == []


def test_metrics_rows_are_whole_or_absent(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a row a killed process left half-written
    writer = MetricsWriter(path)
    assert path.read_text() == '{"step": 1}\n'
    with file_size_limit(200), pytest.raises(UserError, match="cannot append the row of step 3") as e:
        writer.write({"step": 3, "note": "x" * 400})  # EFBIG after 200 bytes: a full disk's short write
    assert "\n" not in str(e.value) and path.read_text() == '{"step": 1}\n'
    writer.write({"step": 4})
    writer.close()
    assert [r["step"] for r in RunDir(tmp_path).read_metrics()] == [1, 4]


def test_report_plots_a_damaged_metrics_file(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 1000.0, "mfu": None} for s in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += '{"step": "5", "loss": 1}\n{"step": 6, "loss": "x", "tokens_per_s": 1}\n[1]\n\xff\n{"step": 7, "lo'
    (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8", errors="surrogateescape")
    assert plot_run(tmp_path).read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl", "report.png"]  # no temporary left


# ---------------------------------------------------------------------------------------------
# SIGTERM while an output is being built


def test_sigterm_in_native_tokenizer_training_removes_the_unfinished_output(tmp_path):
    """Random letters without a separator: the BPE trainer runs for many seconds in native code, where
    no Python signal handler runs; the watcher thread must clean up anyway."""
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("".join(rng.choices(string.ascii_letters, k=2_000_000)))
    (tmp_path / "other.txt").write_text("a second document")
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "anychip.cli", "data", "prepare", str(tmp_path / "corpus.txt"),
                             str(tmp_path / "other.txt"), "--out", str(out), "--vocab-size", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("training a"):
            break
    time.sleep(0.5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")], "no temporary being built"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM and time.monotonic() - t0 < SIGNAL_GRACE_S + 10
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "other.txt"]
