#!/usr/bin/env bash
# Step benchmark on one GPU: ours and the reference recipe, same settings, one process per row.
# Usage: bench/run.sh OUT.jsonl [quick]
set -u
out=${1:-bench/results.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 300 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
for b in 1 4 16; do
  row bench/reference.py --model full:sd15 --batch $b
  row bench/ours.py --model full:sd15 --batch $b
done
row bench/reference.py --model full:sd15 --batch 1 --gc
row bench/ours.py --model full:sd15 --batch 1 --gc
row bench/ours.py --model full:sd15 --batch 1 --te
row bench/ours.py --model full:sd15 --batch 4 --te
if [ "${2:-}" != quick ]; then
  for b in 1 4; do
    row bench/reference.py --model full:sdxl --batch $b --warmup 5 --steps 10
    row bench/ours.py --model full:sdxl --batch $b --warmup 10 --steps 10
  done
  row bench/reference.py --model full:sdxl --batch 1 --gc --warmup 5 --steps 10
  row bench/ours.py --model full:sdxl --batch 1 --gc --warmup 10 --steps 10
fi
