#!/usr/bin/env bash
# The eighth session's final GPU measurements (benchmarks/results/stop24/final/), in one command on one CUDA GPU
# from the repository root; results under OUT_DIR (default benchmarks/results/stop24_gpu). ~5 minutes on an H200.
#
#   bash benchmarks/gpu_stop24.sh [OUT_DIR]
#
# 1. gdnspec eval on CUDA, float32, T = 0.7, with and without --adaptive (one timing each);
# 2. the same greedy, --repeats 3, with and without --adaptive;
# 3. check_sampling_gpu.py: the sampling kernels against their torch forms, repeatability, sampled vs greedy steps
#    of the 1.7B model;
# 4. EAGLE in bf16 (one timing).
set -uo pipefail
O=${1:-benchmarks/results/stop24_gpu}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
L="$O/log.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >> "$L" 2>&1
E=(python -m gdnspec eval --device cuda --drafters ngram,eagle,model --shapes chain-4,tree-4x5 --num-prompts 3 --out "$O")
"${E[@]}" --dtype float32 --repeats 1 --temperature 0.7 --tag eval_t07 >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 1 --temperature 0.7 --adaptive --tag eval_t07_ad >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 3 --tag eval_f32 >> "$L" 2>&1
"${E[@]}" --dtype float32 --repeats 3 --adaptive --tag eval_f32_ad >> "$L" 2>&1
python benchmarks/check_sampling_gpu.py --out "$O/sampling_gpu.json" >> "$L" 2>&1
python -m gdnspec eval --device cuda --drafters eagle --shapes chain-4,tree-4x5 --num-prompts 3 --out "$O" \
  --dtype bfloat16 --repeats 1 --tag eval_bf16 >> "$L" 2>&1
echo "done: $O (log.txt)"
