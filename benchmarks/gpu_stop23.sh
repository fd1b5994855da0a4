#!/usr/bin/env bash
# The GPU measurements the seventh session (stop 23) could not make (no device time): run on one CUDA GPU from the
# repository root, results under OUT_DIR (default benchmarks/results/stop23_gpu). Takes ~6-8 minutes on an H200.
#
#   bash benchmarks/gpu_stop23.sh [OUT_DIR]
#
# 1. the tree-builder kernels against the torch builder on CUDA (check_fused_gpu.py --only-tree-build);
# 2. the bundle's speculative steps with the torch builder (GDNSPEC_TREE_BUILD=0) and the kernels (=1), twice,
#    alternating (bench_draft.py --bundle --skip-1.7b; the first =1 run writes each stage's kernel names);
# 3. gdnspec eval on CUDA, float32, with and without --adaptive (the graph path's fall-back to plain steps).
set -uo pipefail
OUT_DIR=${1:-benchmarks/results/stop23_gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
log="$OUT_DIR/log.txt"
run() { echo "== $*" >> "$log"; "$@" >> "$log" 2>&1; echo "rc=$?" >> "$log"; }
nvidia-smi --query-gpu=name --format=csv,noheader >> "$log" 2>&1
run python benchmarks/check_fused_gpu.py --only-tree-build
for pass in a b; do
  GDNSPEC_TREE_BUILD=0 run python benchmarks/bench_draft.py --bundle --skip-1.7b --out "$OUT_DIR/draft_bundle_tb0_$pass.json"
  if [ "$pass" = a ]; then
    run python benchmarks/bench_draft.py --bundle --skip-1.7b --kernel-names "$OUT_DIR/kernels" --out "$OUT_DIR/draft_bundle_tb1_$pass.json"
  else
    run python benchmarks/bench_draft.py --bundle --skip-1.7b --out "$OUT_DIR/draft_bundle_tb1_$pass.json"
  fi
done
EVAL=(python -m gdnspec eval --device cuda --dtype float32 --drafters ngram,eagle,model --shapes chain-4,tree-4x5
      --num-prompts 3 --repeats 1 --out "$OUT_DIR")
run "${EVAL[@]}" --tag eval_cuda_float32
run "${EVAL[@]}" --adaptive --tag eval_cuda_float32_adaptive
echo "done: $OUT_DIR (log.txt)"
