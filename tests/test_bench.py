"""The trace summary of `anychip bench --profile` on a GPU-shaped trace (device process, kernels on
streams, a host span that contains them): the CPU test in test_cli.py only sees host-thread traces."""

import gzip
import json

import pytest

from anychip.check.bench import summarize_trace


def test_gpu_trace_counts_device_kernels_by_kind(tmp_path):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #1"}}]

    def kernel(name, ts, dur, pid=2):
        return {"ph": "X", "pid": pid, "tid": 7, "name": name, "ts": ts, "dur": dur}

    events = meta + [
        kernel("PjitFunction(step)", 0, 5000, pid=1),  # host: not device time
        kernel("while.3", 0, 3000),  # a span on the stream that contains the kernels below
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0, 1000),
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 1000, 800),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1800, 600),
        kernel("loop_add_fusion", 2400, 200),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 2600, 300),
        kernel("Memcpy HtoD", 2900, 100),
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = summarize_trace(path, steps=2)
    assert summary["source"] == "device"
    assert summary["device_ms_per_step"] == pytest.approx(3.0 / 2)  # leaves only, per step, in ms
    ms = {kind: row["ms"] for kind, row in summary["kinds"].items()}
    assert ms == pytest.approx({"matmul": 0.9, "attention": 0.3, "collective": 0.15, "other": 0.1, "copy": 0.05})
    assert summary["top_ops"][0]["name"].startswith("sm90_xmma_gemm")
