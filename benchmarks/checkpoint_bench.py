"""Checkpoint save/restore throughput and the training stall of an asynchronous save.

    python benchmarks/checkpoint_bench.py --model 1b --what params [--dir /local/disk/tmp] [--repeats 2]
    python benchmarks/checkpoint_bench.py --model 350m --what state

`--what params` saves the parameters alone (fp32), `--what state` the whole train state (params plus
AdamW's two moments: 3x the bytes). Every array is filled with random numbers: zeros (a fresh
optimizer state) would compress and flatter the numbers. Reported per repeat:

    stall_s    time until Checkpointer.save() returns: the training loop is blocked that long
               (orbax's synchronous part, which waits for the fingerprints; on accelerators also
               the device-to-host copy)
    save_s     time until the checkpoint is committed (save() + background write + rename)
    restore_s  time to restore onto the devices, fingerprints verified
    fingerprint_s  the fingerprint computation alone (part of stall_s and restore_s; --no-verify,
                   i.e. checkpoint.verify=false, skips it)

Restores read through the page cache unless it can be dropped (needs root and a writable
/proc/sys/vm/drop_caches); the output says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from anychip.config import load_config
from anychip.train import checkpoint
from anychip.train.step import abstract_state, build_trainer


def random_like(abstract: Any, seed: int = 0) -> Any:
    """Random arrays shaped and sharded like `abstract`, created on the devices (no host copy)."""
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    arrays = []
    for key, leaf in zip(keys, leaves):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            make = jax.jit(lambda k, s=leaf: jax.random.normal(k, s.shape, s.dtype),
                           out_shardings=leaf.sharding)
        else:
            make = jax.jit(lambda k, s=leaf: jnp.zeros(s.shape, s.dtype), out_shardings=leaf.sharding)
        arrays.append(make(key))
    return jax.tree.unflatten(treedef, arrays)


def fingerprints(state: Any) -> Any:
    return jax.block_until_ready(checkpoint.fingerprint_array(state))


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def bench(model: str, what: str, directory: Path, repeats: int, verify: bool) -> dict[str, Any]:
    trainer = build_trainer(load_config(None, [f"model={model}"]))
    target: Any = abstract_state(trainer)
    if what == "params":
        target = target.params
    state = random_like(target)
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    rows = []
    for step in range(1, repeats + 1):
        ckpt = checkpoint.Checkpointer(directory, keep=1, verify=verify)
        fingerprint_s = timed(fingerprints, state)[0] if verify else 0.0
        stall_s, _ = timed(ckpt.save, step, state, {"bench": True})
        rest_s, ok = timed(ckpt.wait)
        assert ok
        ckpt.close()
        cold = drop_page_cache()
        ckpt = checkpoint.Checkpointer(directory, keep=1, verify=verify)
        restore_s, (restored, _) = timed(ckpt.restore, step, target)
        jax.block_until_ready(restored)
        ckpt.close()
        del restored
        save_s = stall_s + rest_s
        rows.append({"stall_s": stall_s, "save_s": save_s, "restore_s": restore_s,
                     "fingerprint_s": fingerprint_s,
                     "save_GBps": n_bytes / save_s / 1e9, "restore_GBps": n_bytes / restore_s / 1e9,
                     "restore_from": "disk" if cold else "page cache"})
    return {"model": model, "what": what, "verify": verify, "GB": n_bytes / 1e9,
            "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "dir": str(directory), "repeats": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="350m")
    parser.add_argument("--what", choices=["params", "state"], default="state")
    parser.add_argument("--dir", help="where to write (default: a temporary dir under /tmp)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-verify", action="store_true", help="checkpoint.verify=false: no fingerprints")
    args = parser.parse_args()
    parent = Path(args.dir or tempfile.gettempdir())
    directory = Path(tempfile.mkdtemp(prefix="anychip-ckpt-bench-", dir=parent))
    try:
        result = bench(args.model, args.what, directory, args.repeats, verify=not args.no_verify)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{result['model']} {result['what']}: {result['GB']:.2f} GB on {result['devices']} "
          f"{result['platform']} device(s), {result['dir']}, "
          f"fingerprints {'on' if result['verify'] else 'off'}")
    print(f"{'':4}{'stall s':>9}{'save s':>9}{'save GB/s':>11}{'restore s':>11}{'restore GB/s':>14}"
          f"{'fingerprint s':>15}  restore from")
    for i, r in enumerate(result["repeats"], 1):
        print(f"{i:<4}{r['stall_s']:>9.2f}{r['save_s']:>9.2f}{r['save_GBps']:>11.2f}{r['restore_s']:>11.2f}"
              f"{r['restore_GBps']:>14.2f}{r['fingerprint_s']:>15.2f}  {r['restore_from']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
