#!/usr/bin/env bash
# Does keeping the fused LoRA kernel under the compiler beat the plain adapter path (the trainer's choice)?
# The compiled SD1.5 batch-16 step both ways and the reference, in one run; one JSON line per row,
# `warmup_s` of a compiled row is mostly its compile.
# Usage: bench/experiment.sh OUT.jsonl   (about 8 minutes on a fresh H200, most of it compiling)
# Where channels-last loses time when compiled, in a second call:
#   python3 bench/profile_step.py --batch 16 --set performance.compile=on --set performance.channels_last=on --out F
set -u
out=${1:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 240 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
row bench/reference.py --model full:sd15 --batch 16
row bench/ours.py --batch 16 --set performance.compile=on
row bench/ours.py --batch 16 --set performance.compile=on --keep-kernel
