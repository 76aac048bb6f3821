"""`anychip train` as 2 processes × 4 CPU devices on localhost (jax.distributed, gloo collectives)
matches the same run in one process with 8 devices: per-step loss, held-out loss and final params.

Both runs use the same (data=2, fsdp=2, tensor=2) mesh, so every all-reduce and all-gather of the
multi-process run crosses the process boundary on at least one axis. fp32 compute and
"highest" matmul precision leave only the order of the cross-process sums to differ.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anychip.train.run_dir import RunDir

HERE = Path(__file__).parent
RUN = ["model=tiny", "train.steps=3", "train.batch_size=8", "train.seq_len=32", "log.every=1",
       "eval.batches=2", "eval.every=100", "eval.sample_tokens=0", "compute.dtype=float32",
       "checkpoint.every_steps=0", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
       "compute.compile_cache_dir=none"]


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    flags = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; when one fails, stop the others at once (they would wait minutes for it)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def start_two_processes(data: Path, run_dir: Path, *overrides: str) -> tuple[list[subprocess.Popen], list]:
    """The coordinator and process ids come from ANYCHIP_* variables, as a launcher script would set them.
    Output goes to files: a full pipe would block a process while we wait on the other."""
    port = free_port()
    cmd = [sys.executable, "-m", "anychip.cli", "train", *RUN, f"data.path={data}", f"run_dir={run_dir}", *overrides]
    logs = [(run_dir.parent / f"p{i}.out", run_dir.parent / f"p{i}.err") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        env = cpu_env(4, ANYCHIP_COORDINATOR=f"127.0.0.1:{port}", ANYCHIP_NUM_PROCESSES="2",
                      ANYCHIP_PROCESS_ID=str(i))
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env))
    return procs, logs


def launch_two_processes(data: Path, run_dir: Path) -> list[tuple[str, str]]:
    procs, logs = start_two_processes(data, run_dir)
    wait_all(procs, timeout=400)
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
    return outputs


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_one_checkpoint(small_corpus, tmp_path):
    # Only process 1 gets SIGTERM (a scheduler reclaiming one host). Both processes must agree on one step
    # to stop at (preemption.Agreement, answered one step late so the host never waits for the device),
    # write that checkpoint together, and exit 75. If they disagreed, one would wait forever in a
    # collective the other never joins, and wait_all's timeout would end the test.
    run_dir = tmp_path / "mp"
    procs, logs = start_two_processes(small_corpus, run_dir, "train.steps=100000")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if sum('"loss"' in row for row in rows) >= 5:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), [err.read_text()[-2000:] for _, err in logs]
    procs[1].send_signal(signal.SIGTERM)
    wait_all(procs, timeout=300)
    errors = [err.read_text() for _, err in logs]
    assert [p.returncode for p in procs] == [75, 75], errors
    stops = [re.search(r"stopped by SIGTERM at step (\d+); checkpoint (\d+) written", e) for e in errors]
    assert all(stops), errors
    steps = {int(m.group(1)) for m in stops} | {int(m.group(2)) for m in stops}
    assert len(steps) == 1, stops  # one step, the same on both processes
    (step,) = steps
    assert 5 <= step < 100000
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == step, saved


@pytest.mark.slow  # long: the slow job (.ci/long)
def test_two_processes_match_one_process(small_corpus, tmp_path):
    outputs = launch_two_processes(small_corpus, tmp_path / "mp")
    for i, (out, _) in enumerate(outputs):
        assert f"jax.distributed: process {i} of 2, 4 of 8 devices local" in out
    assert "done in" in outputs[0][0] and "done in" not in outputs[1][0]  # process 0 alone speaks
    # The reference also checks the persistent compilation cache (every compile cached, however quick).
    cache = tmp_path / "xla"
    cmd = [sys.executable, str(HERE / "multiprocess_reference.py"), str(small_corpus), str(tmp_path / "ref"),
           str(tmp_path / "mp"), *RUN, f"compute.compile_cache_dir={cache}"]
    ref = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400,
                         env=cpu_env(8, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert ref.returncode == 0, ref.stderr[-4000:]
    result = json.loads(ref.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert any(path.name.startswith("jit_train_step") for path in cache.iterdir())

    mp, one = RunDir(tmp_path / "mp").read_metrics(), RunDir(tmp_path / "ref").read_metrics()
    # Process 0 alone wrote metrics.jsonl: each step once, not once per process.
    assert [r["step"] for r in mp if "loss" in r] == [1, 2, 3]
    for key in ("loss", "eval_loss"):
        a, b = [r[key] for r in mp if key in r], [r[key] for r in one if key in r]
        assert len(a) == len(b) > 0
        # Same batches, same math; only cross-process reduction order differs: fp32 noise, ~1e-7 relative.
        assert a == pytest.approx(b, rel=1e-5), key
    # After 3 AdamW steps (each moves a weight by at most ~lr = 3e-3·step/warmup) params agree to fp32
    # round-off of the updates; a wrong data slice or a missing all-reduce moves them by ~1e-4.
    assert result["max_param_diff"] < 1e-6
