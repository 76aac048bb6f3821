"""A training process for the fault-tolerance tests (a helper, not a test module).

    python tests/fault_helper.py [--dump-restored STEP PATH [--no-train]] [--dump-at STEP PATH] key=value ...

Trains like `anychip train` (exit code 75 or 128+signal after SIGTERM/SIGINT, 2 on a UserError), and
also: prints "STEP n" after every step, so that tests can time their signals; writes
RUN_DIR/final_params.npz when training completes. --dump-restored first restores checkpoint STEP of
the run onto this process's devices and writes its params to PATH (and with --no-train, stops
there); --dump-at writes the params after
step STEP of training to PATH.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
# The tests restart this process dozens of times: cache every compile, not only those over 1 s.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def flat_params(params: Any) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(x) for path, x in flat}


def dump_restored(cfg: Any, step: int, out: str) -> None:
    from anychip.train.run_dir import RunDir
    from anychip.train.step import abstract_state, build_trainer

    ckpt = RunDir(cfg.run_dir).checkpointer(cfg.checkpoint)
    state, _ = ckpt.restore(step, abstract_state(build_trainer(cfg)))
    np.savez(out, **flat_params(state.params))
    ckpt.close()


def reporter(dump_at: tuple[int, str] | None) -> Any:
    def report(step: int, state: Any) -> None:
        if dump_at is not None and step == dump_at[0]:
            np.savez(dump_at[1], **flat_params(state.params))
        print(f"STEP {step}", flush=True)

    return report


def main(argv: list[str]) -> int:
    from anychip.config import load_config
    from anychip.errors import UserError
    from anychip.train.loop import train
    from anychip.train.preemption import Preempted

    options: dict[str, tuple[int, str]] = {}
    while argv[:1] in (["--dump-restored"], ["--dump-at"]):
        options[argv[0]], argv = (int(argv[1]), argv[2]), argv[3:]
    no_train = argv[:1] == ["--no-train"]
    argv = argv[no_train:]
    cfg = load_config(None, argv)
    if cfg.compute.compile_cache_dir:  # before the first compile: JAX reads the setting once
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.compute.compile_cache_dir).expanduser()))
    try:
        if "--dump-restored" in options:
            dump_restored(cfg, *options["--dump-restored"])
            if no_train:
                return 0
        result = train(cfg, log=lambda m: print(m, flush=True), callbacks=[reporter(options.get("--dump-at"))])
    except Preempted as e:
        print(f"anychip: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except UserError as e:
        print(f"anychip: error: {e}", file=sys.stderr, flush=True)
        return 2
    np.savez(Path(cfg.run_dir) / "final_params.npz", **flat_params(result.params))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
