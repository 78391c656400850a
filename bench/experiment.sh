#!/usr/bin/env bash
# Variants of our step (compile, CUDA graphs, channels-last) on SD1.5; one JSON line per row.
set -u
out=${1:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
row() { timeout 240 python3 bench/ours.py "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
off="--set performance.compile=off --set performance.cuda_graphs=off"
row --batch 16 $off --set performance.channels_last=off
row --batch 1 --set performance.compile=on --set performance.cuda_graphs=on --set performance.channels_last=off
row --batch 16 --set performance.compile=on --set performance.cuda_graphs=off --set performance.channels_last=off
row --batch 1 --set performance.compile=on --set performance.cuda_graphs=off --set performance.channels_last=off
row --batch 4 --set performance.compile=on --set performance.cuda_graphs=on --set performance.channels_last=off
