#!/bin/bash
# One pass of the GPU checks, in the order that matters when GPU time is short: the CUDA tests of the
# static engine and the attention kernel; the rollout benchmark on the Qwen2.5-3B shape (64 rows with HF
# generate on a dynamic and on a compiled static cache and the scoring pass, then 256 rows); decode
# attention alone; a soft decode-step profile; the decode products alone; then the Llama-3.2-3B shape if
# time is left. Each benchmark appends its tables to benchmarks/RESULTS.md.
#
#     bash benchmarks/cuda_check.sh [seconds]     # default 390: stops starting new parts after that
#     SKIP_TESTS=1 bash benchmarks/cuda_check.sh   # the benchmarks only
set -o pipefail
export PYTHONUNBUFFERED=1
budget=${1:-390}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
cd "$(dirname "$0")/.."
[ -z "$SKIP_TESTS" ] && timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py \
    tests/test_engine.py -k cuda 2>&1 | tail -4
echo "tests: $(( $(date +%s) - t0 )) s"
timeout 300 python3 benchmarks/rollout.py --device cuda --shapes qwen2.5-3b --batch 64,256 --hf-static --score \
    --repeats 2 2>&1 | grep -v '^{"env"' | tail -18
echo "rollouts: $(( $(date +%s) - t0 )) s"
[ "$(left)" -gt 40 ] && timeout 40 python3 benchmarks/attention.py --rows 64 2>&1 | tail -12
[ "$(left)" -gt 50 ] && timeout 50 python3 benchmarks/profile_step.py --shape qwen2.5-3b --rows 64 --mode soft \
    --top 16 2>&1 | grep -v -i warn | tail -34
[ "$(left)" -gt 40 ] && timeout 40 python3 benchmarks/gemm.py 2>&1 | tail -24
[ "$(left)" -gt 70 ] && timeout "$(left)" python3 benchmarks/rollout.py --device cuda --shapes llama-3.2-3b \
    --batch 64 --skip-hf-dynamic --repeats 2 2>&1 | grep -v '^{"env"' | tail -8
echo "done: $(( $(date +%s) - t0 )) s"
