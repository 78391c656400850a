#!/usr/bin/env bash
# The next questions of the compiled step, each in one call of the device tool (one JSON line per row;
# a compiled row's `warmup_s` is mostly its compile; about 8-9 minutes each on a fresh H200):
#   bench/experiment.sh kernel OUT.jsonl   does keeping the fused LoRA kernel under the compiler beat the
#                                          plain adapter path (the trainer's choice)? SD1.5 batch 16
#   bench/experiment.sh combo OUT.jsonl    does inductor's horizontal fusion (combo_kernels) cut the
#                                          batch-1 step's thousands of small kernels? SD1.5 batch 1
#   bench/experiment.sh copy OUT.jsonl     the adapters' working copy (performance.adapter_copy) and the
#                                          grouped attention projections (fused_projections), each against
#                                          its absence, at SD1.5 batch 1, graphed; then compiled
#   bench/experiment.sh nowait OUT.jsonl   the reference and our batch-1 step, default and compiled
#                                          (bench/data/nowait-h200.jsonl)
#   bench/experiment.sh cl16 OUT.jsonl     with GroupNorm keeping channels-last (performance.nhwc_norms), does
#                                          channels-last now win at SD1.5 batch 16? (defaults: contiguous)
#   bench/experiment.sh clauto OUT.jsonl   channels-last by default wherever GroupNorm keeps the layout: SD1.5
#                                          batch 16 and SDXL batch 4 against channels_last=off, SD1.5 batch 1
#   bench/experiment.sh geglu OUT.jsonl    the fused GEGLU kernels (performance.fused_geglu) against diffusers'
#                                          GEGLU: SD1.5 batch 16 and 1, and a lone preview, runs interleaved
#   bench/experiment.sh lean OUT.jsonl     the lean ResNet blocks (performance.lean_resnets) against diffusers' block:
#                                          SD1.5 batch 16 and 1 interleaved, with the batch-1 reference
#   bench/experiment.sh after OUT.jsonl    this stop's defaults: the 3,000-sample job, a lone preview with and
#                                          without the lean blocks, SDXL batch 4 and SD1.5 batch 1 with references
#   bench/experiment.sh recheck OUT.jsonl  what this stop's defaults left unmeasured: the gradient-checkpointing peaks,
#                                          SD1.5 batch 16 with its reference, and (files beside OUT) the
#                                          convolution layouts and the eager batch-16 profile by operator
#   bench/experiment.sh compiled OUT.jsonl the compiled step with this stop's defaults (compile = on), batch 1 and
#                                          16, with the batch-1 reference (about 8 minutes)
#   bench/experiment.sh grouped OUT.jsonl  the grouped projections' autograd function against the previous commit's
#                                          tree (unpacked in .prev), SD1.5 batch 16 and 1, interleaved, twice
#   bench/experiment.sh norms OUT.jsonl    the GroupNorm kernels reading whole pixels and the LayerNorm kernels
#                                          against the previous commit's tree (unpacked in .prev), SD1.5 batch
#                                          16 and 1, interleaved; and (beside OUT) bench/norms.py at SD1.5 16, 1, SDXL 4
#   bench/experiment.sh stop OUT.jsonl     a stop's figures in one call: the 3,000-sample job, a lone preview, SDXL
#                                          batch 4 and SD1.5 batch 1 and 16, each with its reference, and
#                                          the gradient-checkpointing peaks (SD1.5 and SDXL batch 1)
#   bench/experiment.sh prebuild OUT.jsonl the 3,000-sample job on an empty Triton cache with and without the
#                                          step's kernels built ahead in parallel (performance.prebuild_kernels), then
#                                          on a warm cache with and without, interleaved, three times (about 6 minutes)
#   bench/experiment.sh attnsplit OUT.jsonl flash attention padding SD1.5's head size 40 only to 48 (bench/attention_split.py)
#                                          against cuDNN's and flash's, at SD1.5's shapes; cuDNN at head 40, 48 and 64;
#                                          then SD1.5 batch 16 with and without it in the real step (ours.py --split-attention 40)
#   bench/experiment.sh limits16 OUT.jsonl  what limits SD1.5 batch 16 on this card: each GroupNorm shape on its own (beside
#                                          OUT: -norms.jsonl), the eager step's profile by operator (-profile-b16.txt), and
#                                          the compiled step with this code's kernels
#   bench/experiment.sh tuned OUT.jsonl    performance.attention=tuned (the fastest kernel per attention shape) against
#                                          cudnn (the default on Hopper), interleaved, at batch 16; the 50-step fast =
#                                          eager check and the tuned attention's GPU tests; then batch 1
#   bench/experiment.sh leantf OUT.jsonl   the lean transformer blocks (performance.lean_transformers: residual sums inside
#                                          the LayerNorm kernels) against diffusers' block, SD1.5 batch 16 twice and 1,
#                                          interleaved; then their GPU tests and the 50-step fast = eager check
#   bench/experiment.sh residual OUT.jsonl the ResNet blocks' first GroupNorm summing the shortcut's gradient in its
#                                          kernel against the previous commit's tree (unpacked in .prev), SD1.5 batch 16,
#                                          interleaved, twice; the lean blocks' GPU tests and the 50-step fast = eager check;
#                                          (beside OUT) the eager batch-16 profile with the matrix products by shape
#   bench/experiment.sh lowrank OUT.jsonl  performance.low_rank_kernel (the add kernel, the LoRA product kernel)
#                                          against cuBLAS: their GPU tests, the products alone (bench/lora_gemm.py),
#                                          SD1.5 batch 16 with each mode; lowrank2: more rows, and the profile
#   bench/experiment.sh gemmdefault OUT.jsonl  low_rank_kernel=gemm against off, to decide the default: batch 16,
#                                          a first job on an empty kernel cache, the GPU tests, the products
#                                          (host time too), batch 1 and batch 16 without CUDA graphs
#   bench/experiment.sh auto OUT.jsonl     low_rank_kernel=auto (the default) against off: the bf16 equality test,
#                                          SD1.5 batch 16, SDXL batch 4 (interleaved), batch 1 with checkpointing
#   bench/experiment.sh probes OUT.jsonl   what SD1.5 batch 16 would gain, interleaved twice: cuDNN's convolution
#                                          timing (performance.cudnn_benchmark), cuDNN attention's backward with a
#                                          workspace for its 4,096-token layers (CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT),
#                                          and the step without the adapters' weight-gradient products (a bound)
#   bench/experiment.sh sidegrads OUT.jsonl the adapters' weight gradients on a second stream (performance.weight_grad_stream,
#                                          auto = on in graphed steps) against off: its GPU tests and the 50-step
#                                          bf16 equality test, SD1.5 batch 16 interleaved twice, batch 1, SDXL batch 4
#   bench/experiment.sh attnlimit OUT.jsonl what limits cuDNN's attention at 4,096 tokens (bench/attention_limit.py: its
#                                          time by head count and size), then SD1.5 batch 16 with its head-40 attention
#                                          zero-padded to 48 (ours.py --pad-attention 40:48) against the plain step, twice
#   bench/experiment.sh attnpipes OUT      Nsight Compute's pipe counters of cuDNN's attention kernels (forward, backward) at
#                                          batch 16, 4,096 tokens, 8 heads of 40, 16 and 64 (beside OUT: -pipes-8x40.csv ...)
#   bench/experiment.sh preview OUT.jsonl  a lone preview with and without the working copy (which also
#                                          brings the grouped adapters assembled once per preview), interleaved
# Where the compiled batch-1 step's time goes, and where channels-last loses time when compiled:
#   python3 bench/profile_step.py --batch 1 --set performance.compile=on --out F
#   python3 bench/profile_step.py --batch 16 --set performance.compile=on --set performance.channels_last=on --out F
set -u
which=${1:?kernel, combo, copy, nowait, cl16, clauto, geglu, lean, after, recheck, compiled, grouped, norms, stop, prebuild, attnsplit, limits16, tuned, leantf, residual, lowrank, lowrank2, gemmdefault, auto, probes, sidegrads, attnlimit, attnpipes or preview}
out=${2:-bench/experiment.jsonl}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
need_prev() {  # the tree to compare against, unpacked in .prev
  [ -d .prev/lora_core ] || { echo "unpack the tree to compare against: git archive REV lora_core bench | tar -x -C .prev" >&2; exit 2; }
  [ -e .prev/assets ] || ln -s ../assets .prev/assets
}
old() { (cd .prev && PYTHONPATH=$(pwd):${PYTHONPATH} timeout 300 python3 bench/ours.py "$@" 2>>"${out%.jsonl}.log" \
         | grep '^{' | sed 's/^{/{"tree": "previous", /' >>"$out"); }
row() { timeout 300 python3 "$@" 2>>"${out%.jsonl}.log" | grep '^{' >>"$out" || echo "{\"failed\": \"$*\"}" >>"$out"; }
case $which in
  kernel)
    row bench/reference.py --model full:sd15 --batch 16
    row bench/ours.py --batch 16 --set performance.compile=on
    row bench/ours.py --batch 16 --set performance.compile=on --keep-kernel ;;
  combo)
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1 --warmup 10 --set performance.compile=on
    row bench/ours.py --batch 1 --warmup 10 --set performance.compile=on --inductor combo_kernels=true ;;
  copy)
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1
    row bench/ours.py --batch 1 --set performance.adapter_copy=false
    row bench/ours.py --batch 1 --set performance.fused_projections=false
    row bench/ours.py --batch 1 --warmup 10 --set performance.compile=on ;;
  nowait)
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1
    row bench/ours.py --batch 1 --warmup 10 --set performance.compile=on ;;
  cl16)
    row bench/reference.py --model full:sd15 --batch 16
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.channels_last=on ;;
  clauto)
    row bench/reference.py --model full:sd15 --batch 16
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.channels_last=off
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 --set performance.channels_last=off
    row bench/reference.py --model full:sdxl --batch 4 --warmup 5 --steps 10 ;;
  geglu)
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.fused_geglu=false
    row bench/ours.py --batch 1
    row bench/ours.py --batch 1 --set performance.fused_geglu=false
    row bench/preview_lone.py --grouped --nhwc-norms --geglu --rows unmerged_channels_last
    row bench/preview_lone.py --grouped --nhwc-norms --rows unmerged_channels_last
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.fused_geglu=false ;;
  leantf)
    for _ in 1 2; do
      row bench/ours.py --batch 16; row bench/ours.py --batch 16 --set performance.lean_transformers=false
    done
    row bench/ours.py --batch 1; row bench/ours.py --batch 1 --set performance.lean_transformers=false
    timeout 400 python3 -m pytest -q -m gpu tests/test_lean_transformer.py tests/test_layer_norm.py \
      "tests/test_fast_step.py::test_fast_step_tracks_plain_eager_step_bf16_sd15[cudnn]" >"${out%.jsonl}-tests.txt" 2>&1 ;;
  lowrank)
    for mode in gemm off; do row bench/ours.py --batch 16 --set performance.low_rank_kernel=$mode; done
    timeout 150 python3 -m pytest -q -m gpu tests/test_lora_gemm.py tests/test_low_rank.py >"${out%.jsonl}-tests.txt" 2>&1
    timeout 120 python3 bench/lora_gemm.py >"${out%.jsonl}-products.jsonl" 2>>"${out%.jsonl}.log" ;;
  lowrank2)
    for mode in off gemm add off gemm; do row bench/ours.py --batch 16 --set performance.low_rank_kernel=$mode; done
    timeout 200 python3 bench/profile_step.py --batch 16 --ops --shapes --set performance.cuda_graphs=off \
      --set performance.channels_last=on --set performance.low_rank_kernel=gemm \
      --out "${out%.jsonl}-profile-b16.txt" >>"${out%.jsonl}.log" 2>&1 ;;
  gemmdefault)  # low_rank_kernel=gemm against off, to decide the default: batch 16, a first job with gemm (on
                # an empty kernel cache of its own), the GPU tests, the products, batch 1, batch 16 ungraphed
    for mode in gemm off gemm off; do row bench/ours.py --batch 16 --set performance.low_rank_kernel=$mode; done
    TRITON_CACHE_DIR=$(mktemp -d) row bench/job.py --set performance.low_rank_kernel=gemm
    timeout 200 python3 -m pytest -q -m gpu tests/test_lora_gemm.py tests/test_low_rank.py \
      "tests/test_fast_step.py::test_fast_step_tracks_plain_eager_step_bf16_sd15[cudnn]" >"${out%.jsonl}-tests.txt" 2>&1
    timeout 100 python3 bench/lora_gemm.py >"${out%.jsonl}-products.jsonl" 2>>"${out%.jsonl}.log"
    for mode in gemm off; do row bench/ours.py --batch 1 --set performance.low_rank_kernel=$mode; done
    for mode in gemm off; do row bench/ours.py --batch 16 --set performance.cuda_graphs=off --set performance.low_rank_kernel=$mode; done ;;
  auto)  # the default (auto: gemm in a graphed step) against off
    timeout 120 python3 -m pytest -q -m gpu \
      "tests/test_fast_step.py::test_fast_step_tracks_plain_eager_step_bf16_sd15[cudnn]" >"${out%.jsonl}-tests.txt" 2>&1
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.low_rank_kernel=off
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 --set performance.low_rank_kernel=off
    row bench/ours.py --batch 1 --gc
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 --set performance.low_rank_kernel=off ;;
  probes)
    for _ in 1 2; do
      row bench/ours.py --batch 16
      row bench/ours.py --batch 16 --set performance.cudnn_benchmark=true
      CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT=8589934592 row bench/ours.py --batch 16
      row bench/ours.py --batch 16 --no-weight-grads
    done ;;
  attnlimit)
    timeout 120 python3 bench/attention_limit.py >>"$out" 2>>"${out%.jsonl}.log"
    for _ in 1 2; do row bench/ours.py --batch 16; row bench/ours.py --batch 16 --pad-attention 40:48; done ;;
  attnpipes)
    for shape in "8 40" "8 16" "8 64"; do
      timeout 150 ncu -k regex:'flash_(f|b)prop' --launch-skip 2 --launch-count 2 --csv \
        --metrics 'gpu__time_duration.sum,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active$,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active$,sm__throughput.avg.pct_of_peak_sustained_elapsed' \
        python3 bench/attention_limit.py --once $shape >"${out%.jsonl}-pipes-${shape// /x}.csv" 2>>"${out%.jsonl}.log"
    done ;;
  sidegrads)
    timeout 200 python3 -m pytest -q -m gpu tests/test_weight_grads.py \
      "tests/test_fast_step.py::test_fast_step_tracks_plain_eager_step_bf16_sd15[cudnn]" >"${out%.jsonl}-tests.txt" 2>&1
    for _ in 1 2; do
      row bench/ours.py --batch 16; row bench/ours.py --batch 16 --set performance.weight_grad_stream=off
    done
    row bench/ours.py --batch 1; row bench/ours.py --batch 1 --set performance.weight_grad_stream=off
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10 --set performance.weight_grad_stream=off ;;
  residual)
    need_prev
    for _ in 1 2; do row bench/ours.py --batch 16; old --batch 16; done
    timeout 300 python3 -m pytest -q -m gpu tests/test_lean_resnet.py tests/test_lean_transformer.py \
      "tests/test_fast_step.py::test_fast_step_tracks_plain_eager_step_bf16_sd15[cudnn]" >"${out%.jsonl}-tests.txt" 2>&1
    timeout 240 python3 bench/profile_step.py --batch 16 --ops --shapes --set performance.cuda_graphs=off \
      --set performance.channels_last=on --out "${out%.jsonl}-profile-b16.txt" >>"${out%.jsonl}.log" 2>&1 ;;
  lean)
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.lean_resnets=false
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1
    row bench/ours.py --batch 1 --set performance.lean_resnets=false
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.lean_resnets=false ;;
  after)
    row bench/job.py
    row bench/preview_lone.py --grouped --nhwc-norms --geglu --lean --rows unmerged_channels_last
    row bench/preview_lone.py --grouped --nhwc-norms --geglu --rows unmerged_channels_last
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/reference.py --model full:sdxl --batch 4 --warmup 5 --steps 10
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1 ;;
  recheck)
    row bench/ours.py --batch 1 --gc
    row bench/ours.py --model full:sdxl --batch 1 --gc --warmup 10 --steps 10
    row bench/reference.py --model full:sd15 --batch 16
    row bench/ours.py --batch 16
    timeout 200 python3 bench/layouts.py --batch 16 --stacks >"${out%.jsonl}-layouts.jsonl" 2>>"${out%.jsonl}.log"
    timeout 300 python3 bench/profile_step.py --batch 16 --ops --set performance.cuda_graphs=off \
      --set performance.channels_last=on --out "${out%.jsonl}-profile-b16.txt" >>"${out%.jsonl}.log" 2>&1 ;;
  compiled)
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1 --warmup 10 --set performance.compile=on
    row bench/ours.py --batch 16 --set performance.compile=on ;;
  grouped)
    need_prev
    for _ in 1 2; do
      row bench/ours.py --batch 16; old --batch 16; row bench/ours.py --batch 1; old --batch 1
    done ;;
  norms)
    need_prev
    row bench/ours.py --batch 16; old --batch 16; row bench/ours.py --batch 1; old --batch 1
    row bench/ours.py --batch 16; old --batch 16
    for args in "--batch 16" "--batch 1" "--model full:sdxl --batch 4"; do
      timeout 150 python3 bench/norms.py $args --old .prev/lora_core/nhwc_norm.py >>"${out%.jsonl}-kernels.jsonl" 2>>"${out%.jsonl}.log"
    done ;;
  stop)
    row bench/job.py
    row bench/preview_lone.py --grouped --nhwc-norms --geglu --lean --layer-norm --rows unmerged_channels_last
    row bench/ours.py --model full:sdxl --batch 4 --warmup 10 --steps 10
    row bench/reference.py --model full:sdxl --batch 4 --warmup 5 --steps 10
    row bench/reference.py --model full:sd15 --batch 1
    row bench/ours.py --batch 1
    row bench/reference.py --model full:sd15 --batch 16
    row bench/ours.py --batch 16
    row bench/ours.py --batch 1 --gc
    row bench/ours.py --model full:sdxl --batch 1 --gc --warmup 10 --steps 10 ;;
  limits16)
    timeout 200 python3 bench/norms.py --batch 16 --each >"${out%.jsonl}-norms.jsonl" 2>>"${out%.jsonl}.log"
    timeout 240 python3 bench/profile_step.py --batch 16 --ops --set performance.cuda_graphs=off \
      --set performance.channels_last=on --out "${out%.jsonl}-profile-b16.txt" >>"${out%.jsonl}.log" 2>&1
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --set performance.compile=on ;;
  attnsplit)
    timeout 300 python3 bench/attention_split.py 2>>"${out%.jsonl}.log" | grep '^{' >>"$out"
    row bench/ours.py --batch 16
    row bench/ours.py --batch 16 --split-attention 40 ;;
  tuned)
    for a in cudnn tuned cudnn tuned; do row bench/ours.py --batch 16 --set performance.attention=$a; done
    timeout 120 python3 -m pytest -q -m gpu tests/test_fast_step.py -k "attend or eager" >"${out%.jsonl}-tests.txt" 2>&1
    for a in tuned cudnn; do row bench/ours.py --batch 1 --set performance.attention=$a; done ;;
  prebuild)
    for flag in true false; do  # each job on an empty Triton cache, as on a machine's first run
      TRITON_CACHE_DIR=$(mktemp -d) row bench/job.py --set performance.prebuild_kernels=$flag
    done
    warm=$(mktemp -d)  # then on a warm cache, where the dry runs are all the switch costs (one job fills it)
    TRITON_CACHE_DIR=$warm timeout 300 python3 bench/job.py >/dev/null 2>>"${out%.jsonl}.log"
    for flag in true false true false true false; do
      TRITON_CACHE_DIR=$warm row bench/job.py --set performance.prebuild_kernels=$flag
    done ;;
  preview)
    for _ in 1 2; do
      row bench/preview_lone.py --grouped --nhwc-norms --rows unmerged_channels_last
      row bench/preview_lone.py --grouped --nhwc-norms --rows unmerged_channels_last --no-copy
    done ;;
  *) echo "unknown experiment: $which (kernel, combo, copy, nowait, cl16, clauto, geglu, lean, after, recheck, compiled, grouped, norms, stop, prebuild, attnsplit, limits16, tuned, leantf, residual, lowrank, lowrank2, gemmdefault, attnlimit, attnpipes or preview)" >&2; exit 2 ;;
esac
