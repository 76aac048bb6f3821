"""anychip vs transformers training throughput at the same shape, in one invocation on one device.

Runs the transformers peer (benchmarks/hf_peer.py), then `anychip bench` once per variant, each in its
own process (so no framework's allocator holds memory the next one needs), and prints every row with
its ratio to the peer. MFU uses the same FLOPs-per-token formula (anychip.metrics) for all.

    python benchmarks/throughput.py --model 1b --batch-size 8 --seq-len 2048 [key=value ...]

A variant is a quoted list of anychip overrides; items that start with --xla go to XLA_FLAGS of that
run only, so flags are compared against the same run's baseline:

    python benchmarks/throughput.py --model 350m --batch-size 16 --seq-len 2048 \\
        --variant "compute.remat=dots" --variant "compute.remat=none compute.loss_chunk=256" \\
        --variant "compute.remat=dots --xla_gpu_enable_triton_gemm=false"

On a shared machine, `--repeats N` runs the peer and every variant N times, interleaved (peer, variants,
peer, variants, ...), and reports each one's median tokens/s, the median of the per-round ratios to the
peer, and the load average: other jobs then slow both sides alike. `--cpus 0` pins every run to those
cores (taskset): with one thread per framework, a descheduled thread stalls no barrier of the other
threads, which otherwise slows an OpenMP framework far more than XLA's pool on an oversubscribed machine.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from shape_args import shape_parser

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pinned(args) -> list[str]:
    """taskset, and one OpenMP thread per pinned core: torch sizes its pool by the machine's cores, not
    the affinity mask, and two threads on one core thrash at every barrier (62 tokens/s at demo)."""
    if not args.cpus:
        return []
    return ["env", f"OMP_NUM_THREADS={len(cpu_list(args.cpus))}",
            "taskset", "-c", args.cpus]


def cpu_list(spec: str) -> list[int]:
    """'0,2-3' → [0, 2, 3]."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def run_variant(args, variant: list[str], tmp: Path) -> dict:
    """One `anychip bench` run; its XLA flags (the --xla items) are added to this process's XLA_FLAGS."""
    flags = [v for v in variant if v.startswith("--xla")]
    overrides = [v for v in variant if not v.startswith("--xla")]
    env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()}
    record_path = tmp / "bench.json"
    subprocess.run([*pinned(args), sys.executable, "-m", "anychip.cli", "bench", f"model={args.model}",
                    f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", *overrides,
                    "--steps", str(args.steps), "--json", str(record_path)], check=True, env=env)
    return {**json.loads(record_path.read_text()), "variant": " ".join(variant), "xla_flags": flags}


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the peer's compute: bf16 autocast (the issue's setup) or fp32 (benchmarks/hf_peer.py)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the peer and every variant")
    parser.add_argument("--cpus", help="taskset core list for every run, e.g. 0 (default: no pinning)")
    parser.add_argument("--variant", action="append", type=shlex.split,
                        help="quoted overrides and --xla flags for one anychip run (repeatable)")
    parser.add_argument("overrides", nargs="*", help="overrides of the single anychip run when no --variant")
    args = parser.parse_args()
    shape = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    variants = args.variant or [args.overrides]
    peers, rounds, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            if not args.skip_peer:
                peers.append(run_json([*pinned(args), sys.executable, str(HERE / "hf_peer.py"), "--model", args.model, *shape,
                                       "--dtype", args.peer_dtype]))
                print(f"transformers: {peers[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
            rounds.append([run_variant(args, variant, Path(tmp)) for variant in variants])
            loads.append(os.getloadavg()[0])
    ours = [{**runs[0], "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
             "step_time_s": median([r["step_time_s"] for r in runs]),
             "ratios": [r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(runs, peers)],
             "all_tokens_per_s": [r["tokens_per_s"] for r in runs]} for runs in zip(*rounds)]
    peer = None if not peers else {**peers[0], "tokens_per_s": median([p["tokens_per_s"] for p in peers]),
                                   "step_time_s": median([p["step_time_s"] for p in peers]),
                                   "all_tokens_per_s": [p["tokens_per_s"] for p in peers]}
    peak_flops = next((r["tokens_per_s"] / r["mfu"] for r in ours if r["mfu"]), None)  # same chip, same formula
    print(f"\n{'run':44}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}{'peak GiB':>10}{'vs peer':>9}")
    rows = [(f"anychip {r['variant']}".strip(), r) for r in ours] + ([("transformers", peer)] if peer else [])
    for name, r in rows:
        mfu = "n/a" if peak_flops is None else f"{100 * r['tokens_per_s'] / peak_flops:.1f}%"
        mem = "n/a" if not r.get("peak_memory_bytes") else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        ratio = f"{median(r['ratios']):.2f}x" if r.get("ratios") else "-"  # median of the rounds' ratios
        print(f"{name[:43]:44}{r['tokens_per_s']:>12,.0f}{1000 * r['step_time_s']:>10.1f}{mfu:>8}{mem:>10}{ratio:>9}")
    print(f"rounds: {args.repeats}; 1-minute load average after each: {', '.join(f'{x:.1f}' for x in loads)}")
    print(json.dumps({"anychip": ours, "transformers": peer, "load_average": loads}))

if __name__ == "__main__":
    main()
