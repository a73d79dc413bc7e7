#!/bin/bash
# One pass of the GPU measurements of a whole RL step, in the order that matters when GPU time is short:
#   1. the CUDA tests of the static engine and the attention kernel (the engines still agree);
#   2. benchmarks/train.py on the Qwen2.5-3B shape with the paper's soft MATH config, hard, soft and fuzzy side by
#      side: 5 measured steps after the first, each phase's seconds, the rollout's share of the weight-bandwidth
#      floor, the scoring pass's share of the matmul rate, peak memory, the mismatch monitor, and a profile of one
#      more soft step (its Chrome trace under runs/step-profile, copied to $OUT when set);
#   3. what float32 CoT logits cost in a decode step (benchmarks/precision.py --decode-shape);
#   4. with time left, benchmarks/cuda_check.sh's rollout and kernel benchmarks (its tests ran in 1).
# A second call with the time left can run `bash benchmarks/cuda_check.sh` alone.
# Each benchmark appends its tables to benchmarks/RESULTS.md (copied to $OUT when set).
#
#     bash benchmarks/step_check.sh [seconds]     # default 470: stops starting new parts after that
#
# The lent GPU machine has no Math-Verify, which the training reward needs. Carry it as wheels (388 kB): here,
#     echo /.whl/ >> .git/info/exclude
#     pip download --no-deps --only-binary=:all: -d .whl math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
#         antlr4-python3-runtime==4.13.2
# then run with carry [".whl"] and the command
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
#         && bash benchmarks/step_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1
budget=${1:-470}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
cd "$(dirname "$0")/.."
save() { [ -n "$OUT" ] && cp benchmarks/RESULTS.md "$OUT/" && gzip -c runs/step-profile/trace-soft.json > "$OUT/trace-soft.json.gz" 2>/dev/null; true; }
timeout 110 python3 -m pytest -q -x -p no:cacheprovider tests/test_attention.py tests/test_engine.py -k cuda 2>&1 | tail -4
echo "tests: $(( $(date +%s) - t0 )) s"
timeout $(( $(left) - 60 )) python3 benchmarks/train.py --config configs/qwen-2.5-3b-instruct_math_soft.yaml \
    --random-shape qwen2.5-3b --modes hard,soft,fuzzy --max-steps 6 --profile runs/step-profile --profile-modes soft 2>&1 \
    | grep -v -i warn | tail -120
echo "training steps: $(( $(date +%s) - t0 )) s"
save
[ "$(left)" -gt 45 ] && timeout 45 python3 benchmarks/precision.py --decode-shape qwen2.5-3b --rows 64 --cot 128 2>&1 \
    | tail -10
save
[ "$(left)" -gt 150 ] && SKIP_TESTS=1 bash benchmarks/cuda_check.sh "$(( $(left) - 30 ))" 2>&1 | tail -60
save
echo "done: $(( $(date +%s) - t0 )) s"
