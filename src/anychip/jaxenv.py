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

It also answers the one host fact the compute policy needs: whether this CPU has bf16 dot instructions.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
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
