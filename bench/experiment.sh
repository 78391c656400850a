#!/usr/bin/env bash
# The compiled step (whole UNet, and its blocks) against today's defaults and the reference, in one run
# (SD1.5 512 batch 1 and 16); one JSON line per row, `warmup_s` of a compiled row is mostly its compile.
# Usage: bench/experiment.sh OUT.jsonl   (about 9 minutes on an H200, most of it compiling)
set -u
out=${1:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 300 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
unet="--set performance.compile=on"
blocks="--set performance.compile=on --set performance.compile_scope=blocks"
for b in 16 1; do
  row bench/reference.py --model full:sd15 --batch $b
  row bench/ours.py --batch $b
  row bench/ours.py --batch $b $unet
done
row bench/ours.py --batch 16 $blocks
