#!/usr/bin/env bash
# SDXL 1024 rows: ours and the reference, batch 1 and 4, and batch 1 with gradient checkpointing.
set -u
out=${1:-bench/sdxl.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 200 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
for b in 1 4; do
  row bench/reference.py --model full:sdxl --batch $b --warmup 5 --steps 10
  row bench/ours.py --model full:sdxl --batch $b --warmup 10 --steps 10
done
row bench/reference.py --model full:sdxl --batch 1 --gc --warmup 5 --steps 10
row bench/ours.py --model full:sdxl --batch 1 --gc --warmup 10 --steps 10
