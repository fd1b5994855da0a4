#!/usr/bin/env bash
# The tenth session's GPU checks (benchmarks/results/stop26/gpu/), in one command on one CUDA GPU from the
# repository root; results under OUT_DIR (default benchmarks/results/stop26_gpu). ~6 minutes on an H200.
#
#   bash benchmarks/gpu_stop26.sh [OUT_DIR]
#
# 1. check_fused_gpu.py: the fused steps against the module path (the engine's eager step changed: it sizes trees);
# 2. bench_tree_sizing.py --eager: per-step tree sizing on eager CUDA steps (float32 greedy, outputs checked
#    identical), fixed shapes against sized ones, 2 rounds: where a verify costs about the same for any node count;
# 3. gdnspec eval on CUDA (CUDA-graph steps, which are not sized), float32 greedy with and without --adaptive, one
#    timing each: the default GPU path after this session's changes.
set -uo pipefail
O=${1:-benchmarks/results/stop26_gpu}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import gdnspec from this checkout
L="$O/log.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$L" 2>&1
python benchmarks/check_fused_gpu.py >> "$L" 2>&1
python benchmarks/bench_tree_sizing.py --device cuda --eager --drafters eagle,model,ngram --variants fixed,sized \
  --rounds 2 --out "$O/tree_sizing_cuda_eager.json" > "$O/tree_sizing_cuda_eager.txt" 2>&1
E=(python -m gdnspec eval --device cuda --drafters ngram,eagle,model --shapes chain-4,tree-4x5 --num-prompts 3 --out "$O")
"${E[@]}" --dtype float32 --repeats 1 --tag eval_f32 >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 1 --adaptive --tag eval_f32_ad >> "$L" 2>&1
echo "done: $O (log.txt)"
