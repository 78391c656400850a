#!/usr/bin/env bash
# Our graphed step, memory with parking, the whole job and preview speed (SD1.5); one JSON line per row.
# Usage: bench/fast.sh OUT.jsonl [compile]
set -u
out=${1:-bench/fast.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 300 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
row bench/ours.py --batch 1
row bench/ours.py --batch 4
row bench/ours.py --batch 16
row bench/ours.py --batch 1 --gc
row bench/preview.py
row bench/job.py --batch 16
if [ "${2:-}" = compile ]; then
  row bench/ours.py --batch 1 --set performance.compile=on
  row bench/ours.py --batch 16 --set performance.compile=on
fi
