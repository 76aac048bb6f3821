"""The catalog and planner commands as a user runs them (library behaviour is in test_hardware/test_planner)."""

import subprocess
import sys
from pathlib import Path

import pytest


def anychip(*args):
    return subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_hardware_table_lists_the_catalog():
    r = anychip("hardware")
    assert r.returncode == 0, r.stderr
    for key in ("h100", "trn2", "tpu-v5p", "tpu-v6e", "mi300x", "inf2"):
        assert f" {key} " in r.stdout
    assert "[no training]" in r.stdout  # Inferentia2 is inference-only


def test_plan_prints_one_row_per_chip_sorted_by_cost(tmp_path):
    r = anychip("plan", "--model", "afm-3b", "--tokens", "6.3T", "--seq-len", "4096", "--chips", "h100,trn2",
                "--num-chips", "256", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("h100", "trn2"))]
    assert sorted(row[0] for row in rows) == ["h100", "trn2"]
    costs = [float(next(x for x in row if x.startswith("$")).strip("$").replace(",", "")) for row in rows]
    assert costs == sorted(costs)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, fragment", [
    (["--chips", "h10", "--num-chips", "8"], "h100"),
    (["--tokens", "0", "--num-chips", "8"], "tokens must be a positive count"),
    (["--deadline", "1s"], "deadline"),
])
def test_plan_errors_are_one_line(args, fragment):
    base = {"--model": "afm-3b", "--tokens": "6.3T", "--chips": "h100"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    r = anychip("plan", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bench_writes_a_record_the_planner_can_calibrate_from(tmp_path):
    import json
    import math

    from anychip.cost.calibration import load_records

    path = tmp_path / "bench.json"
    r = anychip("bench", "model=tiny", "train.batch_size=4", "train.seq_len=32", "--steps", "2", "--warmup", "1",
                "--json", str(path), "--profile", str(tmp_path / "trace"))
    assert r.returncode == 0, r.stderr
    record = json.loads(path.read_text())
    assert record["tokens_per_s"] == record["batch_size"] * record["seq_len"] / record["step_time_s"]
    assert record["mfu"] is None  # a CPU has no catalog peak: no made-up MFU
    # Random tokens over a 512 vocabulary: after 6 steps the loss is still about ln(512) = 6.24.
    assert abs(record["final_loss"] - math.log(512)) < 0.5
    assert load_records([path])[0].chip == "cpu"
    # The profile: a trace a person can open, and op times that add up to about the measured step (the
    # steps run one after another on one device, so the ops of a step cannot sum to much more than a step
    # or to far less: 9.0 ms vs 9.3 ms measured on the 2-core CI machine; this run's timings are noisier).
    profile = record["profile"]
    assert Path(profile["trace"]).is_file() and Path(profile["trace"]).is_relative_to(tmp_path / "trace")
    assert 0.2 < profile["device_ms_per_step"] / (1000 * record["step_time_s"]) < 3
    assert sum(k["share"] for k in profile["kinds"].values()) == pytest.approx(1.0)
    assert profile["kinds"]["matmul"]["share"] > 0.05  # the projections are found by name
    assert "top operations:" in r.stdout
