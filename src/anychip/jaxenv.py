"""jax's start-up with the `aot` extra installed: quiet on a CPU-only machine, the target compilers on demand.

The extra installs libtpu and the CUDA PJRT plugin so that `anychip check --compile` can compile for TPUs
and NVIDIA GPUs that this machine does not have. Left alone, jax would load both at start-up everywhere:
`import jax` loads the CUDA plugin's extension libraries, each logging "Could not find cuda drivers";
backend start-up imports the plugin again and starts libtpu, which complains about TPU_ACCELERATOR_TYPE
and worker hostnames: on every `anychip` command. So, with the extra installed and no accelerator device
on this machine (/dev/nvidia*, /dev/accel*, /dev/vfio/*, /dev/neuron*, /dev/kfd):

* `import jax` runs with those native start-up lines held back (shown if the import fails);
* with JAX_PLATFORMS unset, jax runs on the CPU (as it would without the extra);
* when jax is to run on the CPU only, plugin discovery (the CUDA plugin's import) is deferred until
  `load_plugins()`, which the target compiler calls, with the libraries' start-up chatter captured.

Machines with an accelerator are left exactly as jax sets them up.

It also answers the one host fact the compute policy needs: whether this CPU has bf16 dot instructions,
and starts the `anychip` command with transparent huge pages for glibc's large allocations (see
`restart_with_huge_pages`).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import platform
import sys
import tempfile
from collections.abc import Iterator

_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/neuron[0-9]*",
                        "/dev/kfd")
AOT_MODULES = ("libtpu", "jax_plugins.xla_cuda12")
_deferred = False
# CPU flags (Linux /proc/cpuinfo, x86 and Arm spellings) of bf16 dot-product instructions, which XLA:CPU's
# bf16 dots use; without them every bf16 operand is converted to fp32 and back.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
HUGE_PAGES_ENV = "ANYCHIP_HUGE_PAGES"
_HUGETLB = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def aot_installed() -> bool:
    """Whether the `aot` extra's libtpu and CUDA plugin are importable (without importing them)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in AOT_MODULES)
    except ModuleNotFoundError:  # the jax_plugins namespace package does not exist
        return False


def has_accelerator() -> bool:
    return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def quiet_start() -> None:
    """Run before jax starts its backends (anychip/__init__.py calls it): see the module docstring."""
    global _deferred
    if not aot_installed() or has_accelerator():
        return
    with captured_stderr():
        import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    if jax.config.jax_platforms == "cpu" and not xla_bridge._plugins_registered:
        xla_bridge._plugins_registered = True  # discovery runs in load_plugins(), when a target needs it
        _deferred = True


def load_plugins() -> None:
    """Discover jax's PJRT plugins (the CUDA plugin) now, if quiet_start deferred it."""
    global _deferred
    if not _deferred:
        return
    from jax._src import xla_bridge

    with captured_stderr():
        xla_bridge._plugins_registered = False
        xla_bridge._discover_and_register_pjrt_plugins()
    _deferred = False


@contextlib.contextmanager
def captured_stderr() -> Iterator[None]:
    """Hold what native libraries write to file descriptor 2 (absl/glog start-up lines); shown only if
    the block raises, so a failure keeps its explanation."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 dots natively; ANYCHIP_CPU_BF16=0/1 overrides (the test suite pins 0,
    so that it computes the same on every CI machine). False where the flags cannot be read."""
    forced = os.environ.get("ANYCHIP_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_flags_have_bf16(cpuinfo)


def cpu_flags_have_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU's flags name bf16 dot instructions (AVX512-BF16, AMX-BF16, Arm BF16), whatever the override."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("flags", "Features"))]
    except OSError:
        return False
    return any(_BF16_FLAGS & set(line.partition(":")[2].split()) for line in lines)


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode line, e.g. "always [madvise] never"; "" where it has none."""
    try:
        with open(_THP_MODE, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def huge_pages_tunables(environ: dict[str, str], libc: tuple[str, str], thp: str) -> str | None:
    """The GLIBC_TUNABLES value that turns on transparent huge pages for malloc, or None where the user
    set the tunable or ANYCHIP_HUGE_PAGES=0, or where there are none (not glibc >= 2.35; a kernel without
    THP or with THP `[never]`)."""
    name, version = libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    glibc_has_it = name == "glibc" and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) >= (2, 35)
    kernel_has_it = "[" in thp and "[never]" not in thp
    if environ.get(HUGE_PAGES_ENV) == "0" or _HUGETLB in tunables or not (glibc_has_it and kernel_has_it):
        return None
    return ":".join(filter(None, [tunables, f"{_HUGETLB}=1"]))


def restart_with_huge_pages() -> None:
    """Re-execs the `anychip` command (the console script or `python -m anychip.cli`, nothing that imports
    the library) once with glibc's malloc on transparent huge pages, before jax is imported.

    XLA:CPU allocates a step's temporaries afresh every step (140 MiB at the demo shape), and with 4 KiB
    pages the kernel faults and zeroes them page by page: ~35,000 faults per step, and stretches of steps
    1.4x slower on the 2-vCPU CI machine. With huge pages the demo step is ~12% faster and steady
    (benchmarks/RESULTS.md). Machines with an accelerator are left alone; ANYCHIP_HUGE_PAGES=0 turns it off."""
    argv = getattr(sys, "orig_argv", [])
    program = (getattr(sys, "argv", None) or [""])[0]  # embedded interpreters may have no argv
    is_command = os.path.basename(program) == "anychip" or argv[1:3] == ["-m", "anychip.cli"]
    if not is_command or not sys.platform.startswith("linux") or has_accelerator():
        return
    tunables = huge_pages_tunables(dict(os.environ), platform.libc_ver(), thp_mode())
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    with contextlib.suppress(OSError):  # no exec here: run as we are
        os.execv(sys.executable, [sys.executable, *argv[1:]])
