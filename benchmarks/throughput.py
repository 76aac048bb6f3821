"""anychip vs transformers training throughput at the same shape, in one invocation on one device.

Runs the transformers peer (benchmarks/hf_peer.py) and `anychip bench` one after the other in
separate processes (so neither framework's allocator holds memory the other needs), then prints
both and the ratio. MFU uses the same FLOPs-per-token formula (anychip.metrics) for both.

    python benchmarks/throughput.py --model 1b --batch-size 8 --seq-len 2048 [key=value ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from shape_args import shape_parser

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra anychip overrides, e.g. train.remat=dots")
    args = parser.parse_args()
    shape = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    peer = None if args.skip_peer else run_json([sys.executable, str(HERE / "hf_peer.py"), "--model", args.model,
                                                 *shape])
    with tempfile.TemporaryDirectory() as tmp:
        record_path = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "anychip.cli", "bench", f"model={args.model}",
                        f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                        *args.overrides,
                        "--steps", str(args.steps), "--json", str(record_path)], check=True)
        ours = json.loads(record_path.read_text())
    print(f"\n{'':14}{'tokens/s':>12}{'step ms':>10}{'MFU':>8}")
    rows = [("anychip", ours)] + ([("transformers", peer)] if peer else [])
    for name, r in rows:
        mfu = ours["mfu"] and ours["mfu"] * r["tokens_per_s"] / ours["tokens_per_s"]
        print(f"{name:14}{r['tokens_per_s']:>12,.0f}{1000 * r['step_time_s']:>10.1f}"
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>8}")
    if peer:
        print(f"ratio anychip / transformers: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x")
    print(json.dumps({"anychip": ours, "transformers": peer}))


if __name__ == "__main__":
    main()
