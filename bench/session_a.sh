#!/usr/bin/env bash
# GPU checks of the grouped projections, the working copy and the wait-free step, then SD1.5 batch 1:
#   bash bench/session_a.sh OUT_DIR
set -u
out=${1:?output folder}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
timeout 240 python3 -m pytest -q -x -rA tests/test_fast_step.py -k "never_wait or tracks_plain_eager_step_bf16_sd15" \
  tests/test_working_copy.py tests/test_fused_projections.py 2>&1 | grep -E "PASSED|FAILED|Error|assert|passed|failed" | head -40
row() { timeout "$1" python3 "${@:2}" 2>>"$out/session-a.log" | grep '^{' >>"$out/b1-h200.jsonl" || echo "{\"failed\": \"${*:2}\"}" >>"$out/b1-h200.jsonl"; }
row 90 bench/reference.py --model full:sd15 --batch 1
row 90 bench/ours.py --batch 1
row 220 bench/ours.py --batch 1 --warmup 10 --set performance.compile=on
cat "$out/b1-h200.jsonl"
