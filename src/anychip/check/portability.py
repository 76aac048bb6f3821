"""`anychip check`: will this config's train step compile on hardware this machine does not have?

For each platform the train step is lowered and serialized with `jax.export` for a mesh of
`n_devices` devices that need not exist (a `jax.sharding.AbstractMesh`, abstract inputs), and the
StableHLO is inspected:

* Vendor custom calls (cuDNN, cuBLAS, Triton, Mosaic/Pallas, LAPACK, ...) are notes on their own
  vendor's platform and failures elsewhere (everywhere with `strict`): the portable path has none.
* `neuron` (AWS Trainium/Inferentia, reached through the jax-neuronx PJRT plugin) also gets the
  limits AWS documents for JAX on Neuron ("JAX NeuronX known issues", Neuron SDK 2.2x–2.3x):
  no `lax.cond`/`switch` (`stablehlo.case`/`if`), no data-dependent `while` loops (a `scan` or a
  static `fori_loop` lowers to a `while` whose condition compares the counter with a constant:
  allowed), no host callbacks, threefry RNG "not completely supported" (use the rbg PRNG), sort
  comparators other than LT/LE/GT/GE, no `reduce_precision`; complex and 64-bit floats are not in
  Neuron's data-type list. JAX has no Neuron lowering rules of its own, so the step is lowered for
  the platform name "neuron" with JAX's generic rules: what the plugin receives. These rules come
  from AWS's documentation, not from a Neuron machine: unverified here.

Lowering needs no accelerator. The one exception is cuDNN attention, whose lowering asks the
installed cuDNN for its version; without CUDA libraries the check assumes cuDNN 9.10 for it.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from anychip.config import Config, replace
from anychip.errors import UserError
from anychip.model.attention import resolve as resolve_attention
from anychip.parallel import mesh as sharding
from anychip.train.step import abstract_state, build_trainer

PLATFORMS = ("cpu", "cuda", "rocm", "tpu", "neuron")
ASSUMED_CUDNN_VERSION = 91000

# Custom-call targets JAX emits on every platform (sharding annotations, shape assertions).
PORTABLE_CALLS = re.compile(r"^(Sharding|SPMDFullToShardShape|SPMDShardToFullShape|annotate_device_placement|"
                            r"shape_assertion|xla\.sdy\..*)$")
# (target pattern, platforms it runs on, what it is). First match wins.
VENDOR_CALLS: list[tuple[re.Pattern[str], tuple[str, ...], str]] = [
    (re.compile(r"python.*callback|callback.*python"), (), "a host callback (jax.debug, pure/io_callback)"),
    (re.compile(r"^__cudnn\$"), ("cuda",), "cuDNN (fused attention)"),
    (re.compile(r"^__cublas"), ("cuda",), "cuBLAS"),
    (re.compile(r"triton"), ("cuda", "rocm"), "a Triton kernel (Pallas GPU)"),
    (re.compile(r"^mosaic_gpu"), ("cuda",), "a Mosaic GPU kernel (Pallas)"),
    (re.compile(r"^tpu_custom_call$"), ("tpu",), "a Mosaic TPU kernel (Pallas)"),
    (re.compile(r"^(cu|cusolver|cusparse|cu_)"), ("cuda",), "a CUDA library kernel"),
    (re.compile(r"^(hip|rocm)"), ("rocm",), "a ROCm library kernel"),
    (re.compile(r"^lapack_|^ducc_"), ("cpu",), "a CPU library kernel (LAPACK/DUCC)"),
]


@dataclass(frozen=True)
class Finding:
    """One line of the report; `fatal` findings fail the check."""

    platform: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.platform}: {'FAIL' if self.fatal else 'note'}: {self.message}"


@dataclass(frozen=True)
class PlatformReport:
    platform: str
    findings: tuple[Finding, ...]
    serialized_bytes: int = 0  # 0: it did not lower
    devices: int = 0  # of the exported program

    @property
    def ok(self) -> bool:
        return self.serialized_bytes > 0 and not any(f.fatal for f in self.findings)


# ---------------------------------------------------------------------------------------------
# StableHLO inspection (text: the printed form jax.export's module deserializes to)


def custom_calls(text: str) -> list[str]:
    """Custom-call targets in a module, in both the pretty and the generic printed forms."""
    pretty = re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", text)
    generic = re.findall(r"call_target_name = \"([^\"]+)\"", text)
    return sorted(set(pretty + generic))


def custom_call_findings(text: str, platform: str, strict: bool = False) -> list[Finding]:
    out = []
    for target in custom_calls(text):
        if PORTABLE_CALLS.match(target):
            continue
        vendor, what = next(((p, w) for pat, p, w in VENDOR_CALLS if pat.search(target)), ((), "unknown"))
        native = platform in vendor
        where = f"runs on {'/'.join(vendor)} only" if vendor else "runs on no accelerator"
        out.append(Finding(platform, f"custom call @{target}: {what}; {where}", fatal=strict or not native))
    return out


def _while_conditions(text: str) -> list[list[str]]:
    """The lines of each `stablehlo.while` condition region (the printer indents regions by 2)."""
    lines, conds = text.splitlines(), []
    for i, line in enumerate(lines[:-1]):
        if "stablehlo.while(" in line and lines[i + 1].strip() == "cond {":
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            region = []
            for inner in lines[i + 2:]:
                if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) == indent:
                    break
                region.append(inner.strip())
            conds.append(region)
    return conds


def has_static_trip_count(cond: list[str]) -> bool:
    """True for the condition `scan` and static `fori_loop` lower to: counter < constant, nothing else."""
    defined = (re.match(r"(%[\w#]+) = stablehlo\.constant dense<-?\d+>", line) for line in cond)
    consts = {m.group(1) for m in defined if m}
    if any(not re.search(r"stablehlo\.(constant|compare|return)\b", line) for line in cond):
        return False
    compares = [re.search(r"stablehlo\.compare\s+(\w+),\s*(%[\w#]+),\s*(%[\w#]+)", line) for line in cond
                if "stablehlo.compare" in line]
    if len(compares) != 1 or compares[0] is None or compares[0].group(1) not in ("LT", "LE", "GT", "GE"):
        return False
    a, b = compares[0].group(2), compares[0].group(3)

    def constant(x: str) -> bool:  # defined in the region, or named as the printer names integer constants
        return x in consts or re.fullmatch(r"%c(_\d+)?", x) is not None

    return (a.startswith("%iterArg") and constant(b)) or (b.startswith("%iterArg") and constant(a))


NEURON_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"stablehlo\.(case|if)\b"), ("lax.cond / lax.switch (stablehlo.case): JAX on Neuron does not "
                                              "support it; use jnp.where or lax.select")),
    (re.compile(r"stablehlo\.(send|recv)\b"), "host transfers (stablehlo.send/recv: a host callback)"),
    (re.compile(r"@threefry2x32\b"), ("threefry RNG inside the step: 'not completely supported' on Neuron; "
                                      "set jax_default_prng_impl=rbg")),
    (re.compile(r"stablehlo\.rng\b"), "stablehlo.rng (legacy RNG op): use jax.random with the rbg PRNG"),
    (re.compile(r"stablehlo\.reduce_precision\b"), "lax.reduce_precision: not supported on Neuron"),
    (re.compile(r"\bcomplex<"), "complex numbers: not a Neuron data type"),
    (re.compile(r"tensor<[^>]*\bf64>"), "float64: not a Neuron data type"),
]


def neuron_findings(text: str, platform: str = "neuron") -> list[Finding]:
    """What JAX on Neuron does not support, found in a module's StableHLO text."""
    out = [Finding(platform, message) for pattern, message in NEURON_PATTERNS if pattern.search(text)]
    dynamic = sum(not has_static_trip_count(c) for c in _while_conditions(text))
    if dynamic:
        out.append(Finding(platform, f"{dynamic} data-dependent while loop(s) (lax.while_loop, fori_loop "
                                     "with traced bounds): Neuron runs only constant trip counts (scan)"))
    if re.search(r"stablehlo\.sort\b", text) and re.search(r"compare\s+(EQ|NE),", _sort_regions(text)):
        out.append(Finding(platform, "a sort comparator with EQ/NE: Neuron sorts with LT/LE/GT/GE only"))
    return out + [f for f in custom_call_findings(text, platform) if "callback" in f.message]


def _sort_regions(text: str) -> str:
    return "\n".join(re.findall(r"stablehlo\.sort.*?stablehlo\.return", text, flags=re.DOTALL))


# ---------------------------------------------------------------------------------------------
# Lowering and export


@contextlib.contextmanager
def assumed_cudnn_version() -> Iterator[None]:
    """cuDNN attention asks the installed cuDNN for its version at trace time; a machine without CUDA
    libraries has none (no CUDA plugin, or a plugin without libcudnn), so assume a recent one (only the
    lowering and compiling, never a run, depend on it)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:  # another jax layout: lowering reports "cuDNN is not detected" instead
        yield
        return
    try:
        fa.check_cudnn_version()
        installed = True
    except (RuntimeError, AttributeError, TypeError):  # no plugin (cuda_versions is None) or no libcudnn
        installed = False
    if installed:
        yield
        return
    original = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: ASSUMED_CUDNN_VERSION
    try:
        yield
    finally:
        fa.check_cudnn_version = original


def export(fn: Callable, args: Sequence[Any], platform: str) -> jax.export.Exported:
    """jax.export for one platform; custom calls without a stability guarantee are allowed through (and
    reported by the inspection), since finding them is the point."""
    with assumed_cudnn_version():
        try:
            return jax.export.export(fn, platforms=[platform])(*args)
        except ValueError as e:
            targets = custom_calls(str(e))
            if "custom calls whose targets have no compatibility guarantees" not in str(e) or not targets:
                raise
            checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in targets]
            return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)


def module_text(exported: jax.export.Exported) -> str:
    """The exported StableHLO as text, without source locations (they would match the patterns)."""
    before = jax.config.values["jax_include_debug_info_in_dumps"]
    jax.config.update("jax_include_debug_info_in_dumps", False)
    try:
        return exported.mlir_module()
    finally:
        jax.config.update("jax_include_debug_info_in_dumps", before)


def serialize(exported: jax.export.Exported) -> bytes:
    """The full serialized Exported (needs the `flatbuffers` package), else its StableHLO bytecode,
    the portable artifact inside it."""
    try:
        return bytes(exported.serialize())
    except ImportError:
        return bytes(exported.mlir_module_serialized)


def check_function(fn: Callable, args: Sequence[Any], platform: str, strict: bool = False) -> PlatformReport:
    """Export a jitted `fn` for `platform` and inspect it (the train step, or any function in tests)."""
    try:
        exported = export(fn, args, platform)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        return PlatformReport(platform, (Finding(platform, _lowering_failure(e)),))
    text = module_text(exported)
    findings = custom_call_findings(text, platform, strict)
    if platform == "neuron":
        findings = neuron_findings(text, platform) + [f for f in findings if "callback" not in f.message]
    return PlatformReport(platform, tuple(findings), len(serialize(exported)), exported.nr_devices)


def _lowering_failure(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "callback" in first.lower() or "debug_print" in first:
        return f"does not lower: a host callback (jax.debug / pure_callback / io_callback) ({first})"
    if "dot_product_attention" in first:
        return f"does not lower: cuDNN attention runs on NVIDIA GPUs only, use compute.attention=auto ({first})"
    return f"does not lower: {first}"


# ---------------------------------------------------------------------------------------------
# The train step of a config


@functools.lru_cache(maxsize=16)
def step_and_inputs(cfg: Config, n_devices: int, concrete: bool = False) -> tuple[Callable, tuple[Any, Any]]:
    """The jitted train step over a mesh of `n_devices` and abstract (state, batch) inputs. The mesh is
    abstract unless `concrete` (then this machine's first devices): no hardware is needed."""
    if concrete:
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:n_devices])
    else:
        mesh = sharding.abstract_mesh(cfg.mesh, n_devices)
    trainer = build_trainer(cfg, mesh)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
    return trainer.step, (abstract_state(trainer), batch)


def for_platform(cfg: Config, platform: str) -> Config:
    """`auto` compute settings resolve per target platform (cuDNN on CUDA, bf16 off CPU), not per this machine."""
    c = cfg.compute_for(platform)
    return replace(cfg, compute={"attention": resolve_attention(c.attention, backend=platform), "dtype": c.dtype,
                                 "layers": c.layers, "attention_block": c.attention_block,
                                 "loss_chunk": c.loss_chunk})


def check_step(cfg: Config, platform: str, n_devices: int, strict: bool = False) -> PlatformReport:
    """Export and inspect the train step of `cfg` for `platform` on `n_devices`."""
    cfg = for_platform(cfg, platform)
    report = check_function(*step_and_inputs(cfg, n_devices), platform, strict)
    if not any(NEEDS_DEVICES in f.message for f in report.findings):
        return report
    # custom_partitioning (cuDNN attention's sharding rule) is a Python callback: it needs real devices
    # to lower and cannot be serialized. Export the one-device step to see what it lowers to inside.
    single = replace(cfg, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    inner = check_function(*step_and_inputs(single, 1, concrete=True), platform, strict)
    if not inner.serialized_bytes:
        return inner
    note = Finding(platform, f"custom_partitioning (e.g. cuDNN attention's sharding rule, a Python callback) "
                             f"cannot be exported for {n_devices} devices; checked the 1-device step",
                   fatal=strict)
    return PlatformReport(platform, (note, *inner.findings), inner.serialized_bytes, inner.devices)


NEEDS_DEVICES = "primitives that require devices to be present during lowering"


def check(cfg: Config, platforms: Sequence[str], n_devices: int = 8,
          strict: bool = False) -> list[PlatformReport]:
    """One report per platform."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise UserError(f"unknown platform(s) {', '.join(unknown)}; choose from {', '.join(PLATFORMS)}")
    if n_devices < 1:
        raise UserError(f"--devices must be positive, got {n_devices}")
    sharding.mesh_shape(cfg.mesh, n_devices)  # a mesh that does not fit the device count: one clear line
    return [check_step(cfg, platform, n_devices, strict) for platform in platforms]


def format_report(report: PlatformReport, cfg: Config, n_devices: int) -> list[str]:
    """Lines for the terminal: one per finding, then the platform's verdict."""
    lines = [str(f) for f in report.findings]
    if report.serialized_bytes:
        shape = sharding.mesh_shape(cfg.mesh, n_devices) if report.devices == n_devices else (1, 1, 1)
        mesh = dict(zip(sharding.MESH_AXES, shape))
        lines.append(f"{report.platform}: {'ok' if report.ok else 'FAILED'}: train step exported for "
                     f"{report.devices} device(s), mesh {mesh} ({report.serialized_bytes:,} bytes)")
    else:
        lines.append(f"{report.platform}: FAILED")
    return lines
