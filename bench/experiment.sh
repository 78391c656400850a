#!/usr/bin/env bash
# Next questions for the compiled SD1.5 batch-16 step, in one run: does keeping the fused LoRA kernel under
# the compiler beat the plain adapter path (the trainer's choice), and where does channels-last lose time
# when compiled (a profile)? One JSON line per row; `warmup_s` of a compiled row is mostly its compile.
# Usage: bench/experiment.sh OUT.jsonl   (about 8 minutes on a fresh H200, most of it compiling)
set -u
out=${1:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 200 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
row bench/reference.py --model full:sd15 --batch 16
row bench/ours.py --batch 16 --warmup 10 --set performance.compile=on --keep-kernel
timeout 200 python3 bench/profile_step.py --batch 16 --set performance.compile=on \
  --set performance.channels_last=on --out "${out%.jsonl}-profile-b16-compiled-cl.txt" 2>>"${out%.jsonl}.log"
