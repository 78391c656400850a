#!/usr/bin/env bash
# The fused LoRA kernel against the plain path, with the reference in the same run; one JSON line per row.
# Usage: bench/fused.sh OUT.jsonl
set -u
out=${1:-bench/fused.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 240 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
plain="--set performance.fused_lora=false"
row bench/reference.py --model full:sd15 --batch 1
row bench/ours.py --batch 1
row bench/ours.py --batch 1 $plain
row bench/reference.py --model full:sd15 --batch 16
row bench/ours.py --batch 16
row bench/ours.py --batch 16 $plain
row bench/reference.py --model full:sdxl --batch 4 --warmup 5 --steps 10
row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 $plain
row bench/preview.py
row bench/preview.py --plain
