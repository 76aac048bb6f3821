"""The planner's memory model against the target chips' own compilers: compile the train step of a matrix of
configs (models tiny to afm-3b, seq 2048-8192, remat none/dots/full, data/fsdp/tensor meshes) for TPU v5e,
v5p, v6e and H100/H200 (`anychip check --compile`, on this CPU-only machine), and put the compiled peak per
device beside the planner's estimate. Needs the aot extra.

    python benchmarks/compile_matrix.py --out benchmarks/compile_matrix.jsonl   # appends one JSON line per row
    python benchmarks/compile_matrix.py --table benchmarks/compile_matrix.jsonl # the markdown table
    python benchmarks/compile_matrix.py --quick ...                             # the default suite's rows

Rows already in --out are skipped, so an interrupted run resumes.
"""

import argparse
import json
import sys
from pathlib import Path

from anychip.check.compile import Target, compile_step, parse_target, planner_estimate
from anychip.check.portability import for_platform
from anychip.config import Config, load_config
from anychip.model.attention import kernel_for

# (target, overrides). Batches are global sequences; every mesh axis is named so the row says its layout.
MATRIX = [
    ("tpu-v5e:4", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=4 compute.attention=xla"),
    ("tpu-v5e:8", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=8 compute.attention=xla"),
    ("tpu-v5p:8", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.data=8 mesh.fsdp=1 compute.attention=xla"),
    ("tpu-v5p:8", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=8 compute.attention=xla"),
    ("tpu-v5p:8", "model=1b train.seq_len=4096 train.batch_size=16 compute.remat=dots mesh.fsdp=4 mesh.tensor=2 compute.attention=xla"),
    ("tpu-v6e:8", "model=1b train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=8 compute.attention=xla"),
    ("tpu-v6e:4", "model=350m model.max_seq_len=8192 train.seq_len=8192 train.batch_size=4 compute.remat=none mesh.fsdp=4 compute.attention=xla"),
    # TPU's own attention=auto: the Pallas splash kernel.
    ("tpu-v5e:4", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=4"),
    ("tpu-v5e:1", ("model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=256 compute.remat=none "
                   "mesh.fsdp=1")),
    ("tpu-v5e:8", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=8"),
    ("tpu-v6e:4", ("model=125m model.max_seq_len=4096 train.seq_len=4096 train.batch_size=8 compute.remat=dots "
                   "mesh.fsdp=2 mesh.tensor=2")),
    ("h100:1", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=1"),
    ("h100:8", "model=350m train.seq_len=2048 train.batch_size=16 compute.remat=dots mesh.fsdp=8"),
    ("h100:8", "model=1b train.seq_len=4096 train.batch_size=16 compute.remat=none mesh.data=2 mesh.fsdp=4"),
    ("h100:8", "model=afm-3b train.seq_len=4096 train.batch_size=16 compute.remat=full mesh.fsdp=4 mesh.tensor=2"),
    ("h200:8", "model=afm-3b train.seq_len=8192 train.batch_size=8 compute.remat=dots mesh.fsdp=8"),
    ("h200:8", ("model=1b model.max_seq_len=8192 train.seq_len=8192 train.batch_size=16 compute.remat=full "
                "mesh.data=2 mesh.fsdp=2 mesh.tensor=2")),
    ("h100:8", ("model=350m model.max_seq_len=8192 train.seq_len=8192 train.batch_size=8 compute.remat=dots "
                "mesh.data=2 mesh.fsdp=2 mesh.tensor=2")),
    ("h200:1", "model=1b train.seq_len=2048 train.batch_size=8 compute.remat=none mesh.fsdp=1"),
    ("h200:1", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=1"),
]
# Rows the planner cannot meet within ±15%, and why (benchmarks/RESULTS.md): tiny's head_dim 16 fills an eighth
# of each 128-lane TPU tile, and at 8 x 2048 libtpu keeps tiny's whole working set off HBM.
OUT_OF_REACH = {
    ("tpu-v5e:4", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=4"),
    ("tpu-v5e:1", ("model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=256 compute.remat=none "
                   "mesh.fsdp=1")),
}
# The default suite's few small ones (tests/test_compile.py): one per compiler, seconds each.
QUICK = [
    ("tpu-v5e:4", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=4"),
    ("h200:1", "model=tiny model.max_seq_len=2048 train.seq_len=2048 train.batch_size=8 mesh.fsdp=1"),
]
COMMON = ["compute.compile_cache_dir=null"]


def row(target: str, overrides: str) -> dict:
    cfg = load_config(None, overrides.split() + COMMON)
    target_ = parse_target(target)
    report = compile_step(cfg, target_).as_json()
    return {"overrides": overrides, **report, "attention": attention_kernel(cfg, target_),
            "ratio": report["planner_peak_bytes"] / report["peak_bytes"]}


def attention_kernel(cfg: Config, target: Target) -> str:
    """The attention kernel the compiled step ran on `target` (splash, cudnn, xla or blockwise)."""
    c = for_platform(cfg, target.platform).compute
    return kernel_for(c.attention, c.dtype)


def run(matrix: list, out: Path, only: str = "") -> None:
    """Compile the rows not yet in `out` (re-read before each row, so several processes can share it)."""
    for target, overrides in matrix:
        if only and not target.startswith(tuple(only.split(","))):
            continue
        lines = out.read_text().splitlines() if out.exists() else []
        if (target, overrides) in {(r["target"], r["overrides"]) for r in map(json.loads, lines)}:
            continue
        r = row(target, overrides)
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{target} {overrides}: compiled {r['peak_bytes'] / 2**30:.2f} GiB, planner "
              f"{r['planner_peak_bytes'] / 2**30:.2f} GiB ({r['ratio']:.2f}) {r['error']}", flush=True)


def table(path: Path) -> str:
    """Compiled peaks as recorded; the planner column re-evaluated with the current memory model (the
    recorded one, from before any refit, beside it). A row libtpu refused shows the need it reported."""
    head = ("| target | config | mesh d×f×t | attention | compiled peak GiB | planner GiB | planner/compiled |"
            " as recorded | fits | compile s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines, within, n = [head], 0, 0
    for r in map(json.loads, path.read_text().splitlines()):
        m = r["mesh"]
        planner = planner_estimate(load_config(None, r["overrides"].split() + COMMON), parse_target(r["target"]), m)
        cfg = " ".join(o.split("=", 1)[1] if o.startswith("model=") else o.split(".", 1)[1]
                       for o in r["overrides"].split() if not o.startswith(("mesh.", "model.max_seq", "compute.att")))
        ratio = planner / r["peak_bytes"]
        n, within = n + 1, within + (abs(ratio - 1) <= 0.15)
        fits = "yes" if r["fits"] else "no (libtpu: RESOURCE_EXHAUSTED)" if r["error"] else "no"
        lines.append(f"| {r['target']} | {cfg} | {m['data']}×{m['fsdp']}×{m['tensor']} | {r['attention']} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {planner / 2**30:.2f} | {ratio:.2f} | "
                     f"{r['ratio']:.2f} | {fits} | {r['compile_s']:.0f} |")
    return "\n".join(lines) + f"\n\n{within} of {n} rows within ±15%."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="append rows to this JSON-lines file")
    p.add_argument("--table", type=Path, help="print the markdown table of this JSON-lines file")
    p.add_argument("--quick", action="store_true", help="only the default suite's rows")
    p.add_argument("--only", default="", help="only targets starting with these comma-separated prefixes")
    args = p.parse_args()
    if args.table:
        print(table(args.table))
    elif args.out:
        run(QUICK if args.quick else MATRIX, args.out, args.only)
    else:
        p.print_help()
        sys.exit(2)


if __name__ == "__main__":
    main()
