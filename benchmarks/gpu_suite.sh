#!/usr/bin/env bash
# The issue-5 measurements on one GPU, in parts that each fit one 10-minute device call:
#
#   bash benchmarks/gpu_suite.sh ceiling|350m|1b|afm-3b [OUT_DIR]
#
# `smoke` runs the same steps on the tiny model: a check of this script on any machine, CPU included.
# Each model part runs the transformers peer once, then anychip variants (remat, fused loss, one XLA
# flag A/B) in separate processes, then one profiled anychip run (device time by kind, top kernels).
# Tables go to stdout and OUT_DIR/<part>.txt; JSON records and the profile summary to OUT_DIR.
set -euo pipefail
part=${1:?usage: gpu_suite.sh ceiling|smoke|350m|1b|afm-3b [OUT_DIR]}
out=$(realpath -m "${2:-bench-out}")
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}  # the device image has python3 only
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
cd "$repo/benchmarks"

model_part() {  # model batch seq peer-flag variant...
  local model=$1 batch=$2 seq=$3 peer=$4; shift 4
  local variants=()
  for v in "$@"; do variants+=(--variant "$v"); done
  "$py" throughput.py --model "$model" --batch-size "$batch" --seq-len "$seq" $peer "${variants[@]}" \
    | tee "$out/$model.txt"
  "$py" -m anychip.cli bench "model=$model" "train.batch_size=$batch" "train.seq_len=$seq" $1 \
    --steps 5 --json "$out/$model-profiled.json" --profile "$out/trace-$model" | tee -a "$out/$model.txt"
}

case $part in
  ceiling) "$py" matmul_ceiling.py | tee "$out/ceiling.txt" ;;
  smoke) model_part tiny 4 64 "" "compute.remat=dots" "compute.remat=none compute.loss_chunk=16" ;;
  350m) model_part 350m 16 2048 "" "compute.remat=dots" "compute.remat=dots compute.loss_chunk=512" \
          "compute.remat=none compute.loss_chunk=512" "compute.remat=dots --xla_gpu_enable_triton_gemm=false" ;;
  1b) model_part 1b 8 2048 "" "compute.remat=dots" "compute.remat=dots compute.loss_chunk=512" \
        "compute.remat=none compute.loss_chunk=512" ;;
  afm-3b) model_part afm-3b 4 4096 --skip-peer "compute.remat=dots" "compute.remat=dots compute.loss_chunk=512" \
            "compute.remat=full compute.loss_chunk=512" ;;
  *) echo "unknown part: $part (ceiling, 350m, 1b or afm-3b)" >&2; exit 2 ;;
esac
