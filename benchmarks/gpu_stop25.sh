#!/usr/bin/env bash
# The ninth session's final GPU measurements (benchmarks/results/stop25/final/), in one command on one CUDA GPU
# from the repository root; results under OUT_DIR (default benchmarks/results/stop25_gpu). ~7 minutes on an H200.
#
#   bash benchmarks/gpu_stop25.sh [OUT_DIR]
#
# 1. check_fused_gpu.py: the fused steps against the module path (float32 greedy identity, bf16 errors, PDL bitwise,
#    tree solve / index / builder kernels, the drafters' in-kernel state gather);
# 2. bench_draft.py --bundle --skip-1.7b: the bundle's decode and speculative step times and kernel counts, with each
#    step's kernel timeline (kernels/);
# 3. gdnspec eval on CUDA, float32 greedy, --repeats 3, with and without --adaptive;
# 4. the same at T = 0.7 (one timing each); 5. EAGLE in bf16 (one timing).
set -uo pipefail
O=${1:-benchmarks/results/stop25_gpu}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import gdnspec from this checkout
L="$O/log.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$L" 2>&1
python benchmarks/check_fused_gpu.py >> "$L" 2>&1
python benchmarks/bench_draft.py --bundle --skip-1.7b --out "$O/draft_bundle.json" --kernel-names "$O/kernels" \
  > "$O/draft_bundle.txt" 2>&1
E=(python -m gdnspec eval --device cuda --drafters ngram,eagle,model --shapes chain-4,tree-4x5 --num-prompts 3 --out "$O")
"${E[@]}" --dtype float32 --repeats 3 --tag eval_f32 >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 3 --adaptive --tag eval_f32_ad >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 1 --temperature 0.7 --tag eval_t07 >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 1 --temperature 0.7 --adaptive --tag eval_t07_ad >> "$L" 2>&1
python -m gdnspec eval --device cuda --drafters eagle --shapes chain-4,tree-4x5 --num-prompts 3 --out "$O" \
  --dtype bfloat16 --repeats 1 --tag eval_bf16 >> "$L" 2>&1
echo "done: $O (log.txt)"
