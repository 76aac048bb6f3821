"""Helper of test_multiprocess.py (run with 8 CPU devices): the same run in one process, then the largest
difference between its final parameters and those of the multi-process run. Prints one JSON line.

usage: python multiprocess_reference.py DATA_DIR REF_RUN_DIR MULTIPROCESS_RUN_DIR [key=value ...]
"""

import json
import sys

import jax
import numpy as np

from anychip.config import load_config
from anychip.train.loop import train
from anychip.train.run_dir import load_run


def main(data: str, ref_dir: str, mp_dir: str, *overrides: str) -> None:
    cfg = load_config(None, [*overrides, f"data.path={data}", f"run_dir={ref_dir}"])
    result = train(cfg, log=lambda _: None)
    _, mp_params, _ = load_run(mp_dir)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), result.params,
                         mp_params)
    print(json.dumps({"devices": jax.device_count(), "max_param_diff": max(jax.tree.leaves(diffs))}))


if __name__ == "__main__":
    main(*sys.argv[1:])
