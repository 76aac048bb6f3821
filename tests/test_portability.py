"""`anychip check`: the train step lowers and serializes for platforms this machine does not have, and
the inspection flags vendor custom calls and what JAX on Neuron does not support."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from anychip.check import portability
from anychip.config import load_config

X = jax.ShapeDtypeStruct((8,), jnp.float32)


def lines(reports, cfg):
    return [line for r in reports for line in portability.format_report(r, cfg, 8)]


def test_default_config_passes_every_platform():
    cfg = load_config()
    reports = portability.check(cfg, ["cpu", "cuda", "tpu", "neuron"], n_devices=8)
    assert all(r.ok for r in reports), lines(reports, cfg)
    assert all(r.serialized_bytes > 10_000 for r in reports)
    # The portable path has no custom calls; attention=auto picks cuDNN on CUDA and the Pallas splash kernel
    # on TPU, whose custom calls are reported as notes on their own platform.
    assert not any(r.findings for r in reports if r.platform not in ("cuda", "tpu"))
    assert all(not f.fatal and "Mosaic TPU" in f.message for r in reports if r.platform == "tpu" for f in r.findings)
    assert [r.devices for r in reports if r.platform != "cuda"] == [8, 8, 8]


def test_fused_cross_entropy_is_portable():
    # compute.loss_chunk: a scan of plain einsums with a custom VJP; no custom calls, no data-dependent loops.
    cfg = load_config(None, ["model=tiny", "compute.loss_chunk=64", "compute.attention=xla"])
    reports = portability.check(cfg, ["tpu", "neuron"], n_devices=8)
    assert all(r.ok and not r.findings for r in reports), lines(reports, cfg)


@pytest.mark.parametrize("remat, forward_calls", [("none", 1), ("dots", 1), ("dots_no_batch", 1), ("full", 2)])
def test_dots_remat_keeps_the_flash_attention_forward(remat, forward_calls):
    # The CUDA train step as it lowers (no GPU needed): under the dots policies the cuDNN forward kernel
    # runs once, its outputs kept for the backward kernel; only 'full' runs it again. Running it twice
    # costs an extra attention forward per layer (8% of a 350m step's counted FLOPs at T=2048).
    cfg = load_config(None, ["model=tiny", "compute.attention=cudnn", "compute.dtype=bfloat16", f"compute.remat={remat}",
                             "mesh.fsdp=1"])
    text = portability.module_text(portability.export(*portability.step_and_inputs(cfg, 1, concrete=True),
                                                      "cuda"))
    assert len(re.findall(r"__cudnn\$fmhaSoftmax\b", text)) == forward_calls
    assert len(re.findall(r"__cudnn\$fmhaSoftmaxBackward", text)) == 1


def test_cudnn_attention_is_reported_for_cuda_and_fails_elsewhere():
    cfg = load_config(None, ["model=tiny", "compute.attention=cudnn"])
    cuda, tpu, neuron = portability.check(cfg, ["cuda", "tpu", "neuron"], n_devices=8)
    assert cuda.ok and any("@__cudnn$fmha" in f.message and not f.fatal for f in cuda.findings)
    for report in (tpu, neuron):
        assert not report.ok and "cuDNN attention runs on NVIDIA GPUs only" in report.findings[-1].message
    strict = portability.check(cfg, ["cuda"], n_devices=8, strict=True)[0]
    assert not strict.ok  # --strict: the portable path only


def test_cli_exit_code_and_one_line_per_problem(tmp_path):
    cmd = [sys.executable, "-m", "anychip.cli", "check", "model=tiny", "compute.attention=cudnn", "compute.dtype=bfloat16", "--platforms",
           "cpu", "--target", "neuron"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr
    out = r.stdout.splitlines()
    assert [line.split(":")[0] for line in out if ": FAIL: " in line] == ["cpu", "neuron"]
    assert out[-1] == "check: FAILED on cpu, neuron"


# ---------------------------------------------------------------------------------------------
# The Neuron inspector on deliberately bad functions


def neuron_report(fn, *args):
    return portability.check_function(jax.jit(fn), args or (X,), "neuron")


def test_neuron_flags_lax_cond():
    report = neuron_report(lambda x: jax.lax.cond(x.sum() > 0, lambda: x * 2, lambda: x))
    assert not report.ok and "lax.cond" in report.findings[0].message


def test_neuron_flags_host_callbacks():
    def debug(x):
        jax.debug.print("x = {}", x)
        return x + 1

    def pure(x):
        return jax.pure_callback(lambda a: a, X, x)

    for fn in (debug, pure):  # JAX refuses to lower these for Neuron: the failure names the callback
        report = neuron_report(fn)
        assert not report.ok and "host callback" in report.findings[0].message
    # ... and the text inspector spots one in a module lowered elsewhere (here for CPU).
    text = jax.jit(pure).trace(X).lower(lowering_platforms=("cpu",)).as_text(debug_info=False)
    assert any("host callback" in f.message for f in portability.neuron_findings(text))


def test_neuron_tells_data_dependent_loops_from_scans():
    scan = neuron_report(lambda x: jax.lax.scan(lambda c, _: (c * 2, None), x, None, length=4)[0])
    static = neuron_report(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c * 2, x))
    assert scan.ok and static.ok
    dynamic = neuron_report(lambda x: jax.lax.while_loop(lambda c: c.sum() < 100, lambda c: c * 2, x))
    traced_bound = neuron_report(lambda x, n: jax.lax.fori_loop(0, n, lambda i, c: c * 2, x), X,
                                 jax.ShapeDtypeStruct((), jnp.int32))
    for report in (dynamic, traced_bound):
        assert not report.ok and "data-dependent while" in report.findings[0].message


def test_neuron_flags_threefry_and_reduce_precision():
    rng = neuron_report(lambda k: jax.random.normal(k, (4,)), jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert not rng.ok and "threefry" in rng.findings[0].message
    low = neuron_report(lambda x: jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=2))
    assert not low.ok and "reduce_precision" in low.findings[0].message


@pytest.mark.parametrize("cond, static", [
    (["%c_1 = stablehlo.constant dense<4> : tensor<i32>",
      "%1 = stablehlo.compare  LT, %iterArg, %c_1,  SIGNED : (tensor<i32>, tensor<i32>) -> tensor<i1>",
      "stablehlo.return %1 : tensor<i1>"], True),
    (["%1 = stablehlo.compare  LT, %iterArg, %iterArg_0,  SIGNED : (tensor<i32>, tensor<i32>) -> tensor<i1>",
      "stablehlo.return %1 : tensor<i1>"], False),
    (["%1 = stablehlo.reduce(%iterArg_0 init: %cst) applies stablehlo.add across dimensions = [0]",
      "%2 = stablehlo.compare  LT, %1, %cst_1,  FLOAT : (tensor<f32>, tensor<f32>) -> tensor<i1>",
      "stablehlo.return %2 : tensor<i1>"], False),
])
def test_static_trip_count(cond, static):
    assert portability.has_static_trip_count(cond) is static
