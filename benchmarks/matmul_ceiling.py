"""The practical ceiling for MFU on this device: a bf16 N×N×N matmul in JAX and in PyTorch, same run.

MFU counts only the model's FLOPs against the datasheet peak; no training step can beat the largest
plain matmul, so this number (and the MFU it stands for) is the honest top of the scale.

    python benchmarks/matmul_ceiling.py [--n 8192] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from anychip.cost import hardware


def jax_tflops(n: int, iters: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = matmul(a, b)
    out.block_until_ready()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def torch_tflops(n: int, iters: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--n", type=int, default=1024 if on_cpu else 8192)
    parser.add_argument("--iters", type=int, default=5 if on_cpu else 50)
    args = parser.parse_args()
    chip = hardware.detect()
    peak = chip.peak_flops_per_device
    results = {"jax": jax_tflops(args.n, args.iters), "torch": torch_tflops(args.n, args.iters)}
    print(f"bf16 {args.n}^3 matmul on {jax.devices()[0].device_kind}:")
    for name, tflops in results.items():
        share = "" if tflops is None or not peak else f" ({100 * tflops * 1e12 / peak:.0f}% of {peak / 1e12:.0f})"
        print(f"  {name:6} {'n/a' if tflops is None else f'{tflops:.1f} TFLOP/s'}{share}")
    print(json.dumps({"n": args.n, "device_kind": jax.devices()[0].device_kind, "peak_flops": peak,
                      "tflops": results, "jax_version": jax.__version__}))


if __name__ == "__main__":
    main()
