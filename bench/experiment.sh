#!/usr/bin/env bash
# Switches not yet on by default, each against today's defaults and the reference, in one run (SD1.5 512
# batch 1 and 16, SDXL 1024 batch 4); one JSON line per row. Usage: bench/experiment.sh OUT.jsonl
set -u
out=${1:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 300 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
half="--set performance.half_norms=true"
blocks="--set performance.compile=on --set performance.compile_scope=blocks"
for b in 1 16; do
  row bench/reference.py --model full:sd15 --batch $b
  row bench/ours.py --batch $b
  row bench/ours.py --batch $b $half
done
row bench/reference.py --model full:sdxl --batch 4 --warmup 5 --steps 10
row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 $half
row bench/ours.py --batch 1 $blocks  # warmup_s in its row is the compile time
