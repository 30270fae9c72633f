#!/usr/bin/env bash
# Runs on the lent GPU machine, in two calls on the same warm machine (the carried files cannot
# travel together), diffusers first (short, and the reference every ratio needs), then candela
# with the device time left (its results are written as they come: a call cut short keeps them):
#   run(command="bash tools/bench/gpu/run.sh diffusers", carry=[".gpu/wheels"], timeout_s=300)
#   run(command="bash tools/bench/gpu/run.sh candela",   carry=[".gpu/bin"],    timeout_s=≤540)
# and, where that call was cut short with device time left, at once a third for what it did not
# reach (the late candidates and the large image):
#   run(command="bash tools/bench/gpu/run.sh late",      carry=[".gpu/bin"],    timeout_s=the rest)
# then here: python3 tools/bench/gpu/compare.py <files_at of the candela call> <of the diffusers
# call> [<of the late call>]
# Measured on an H200 (session 25): a machine start ~33 s, the diffusers call 157 s, the candela
# call 358 s (everything below, the candidates included); the second call must follow at once
# (the machine idles out after 30 s). 15 device minutes hold both calls and one short third.
# Session 26 added runs (cuDNN attention on four models, FP8 and GGUF rows that session 25 never
# reached, graph steps on four models, SD 1.5's trace) and left out three of session 25's
# comparisons; session 27 the goal combinations and the convolution API per shape, and left the
# attention kernels' whole-model runs to the race's log: the candela call is estimated at ~550 s
# of work, in order of importance, so the late candidates and the
# large image may be cut (a call cut short keeps what came first).
# Under $OUT: candela.jsonl / diffusers.jsonl (one JSON object per model, the fields of
# `candela bench --json-out`, profiles included), <side>.log, kernels-<dtype>.jsonl and
# kernels-torch-<dtype>.jsonl, graphs.jsonl. Same models, shapes and dtypes on both sides:
#   SD 1.5 f16 512² batch 2 · SDXL f16 1024² batch 2 · SD3.5 Large f16 1024² batch 2 ·
#   FLUX.1-dev bf16 1024² batch 1 (512 T5 tokens); random weights from benches/<model>.
set -uo pipefail
side=${1:?candela or diffusers}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${STEPS:-4}
REPEATS=${REPEATS:-5}
# Op-level tables (--kernels) in these dtypes (KERNEL_DTYPES= to leave them out).
KERNEL_DTYPES=${KERNEL_DTYPES-"f16 bf16"}
# Per-module times after the timed runs (both sides; PROFILE= to leave them out).
PROFILE=${PROFILE---profile}
MODELS=${MODELS:-"sd15:f16 sdxl:f16 sd35-large:f16 flux-dev:bf16"}
# Candidates not yet the default, each run in the whole models too (candela side only;
# CANDIDATES= to leave them out): one bench flag each, optionally @model,model (only those),
# one step, labelled "<model> (<flag>)", in order of importance (a call cut short keeps the
# first ones). The Hopper kernels take head sizes 64 and 128 only (SD 1.5's are 40, 80 and 160).
DIT_AND_SDXL=sdxl,sd35-large,flux-dev
# --attention-kernel=fastest: per attention shape, the fastest of every kernel that runs it and
# cuDNN's fused attention through the graph API (session 26; the kernel PyTorch's SDPA ran in
# session 25's traces at ~half our Hopper kernel's time), each checked against the default kernel
# on the shape's first call (session 27); every model (SD 1.5's head sizes 40/80/160 too, which
# our Hopper kernels do not take). The log's "attention raced" lines give every entrant's time
# per shape: the 128-key Hopper kernels, `hopper` at FLUX's head size and cuDNN, which session 26
# timed as whole-model candidates each, are among them.
# --quantize=fp8: FP8 weight storage (memory, and the products on FP8 tensor cores; SDXL's UNet
# takes it for its transformer blocks). Never timed: session 25's run found candle's F8E4M3
# casts broken on CUDA (our kernels since).
# --quantize=q8_0 / q4k on FLUX-dev: GGML blocks, the products a GGUF transformer file's layers
# run — widened to the activations' dtype for one GEMM since session 25 (candle's quantized
# kernels ran 3.3x / 3.5x the dense step).
# (--attention-kernel=hopper-k128 / hopper-128-k128 / hopper@flux-dev as whole-model candidates
# are left to CANDIDATES_LATE by hand: the race times them per shape.)
# Session 25's own comparisons (--attention-kernel=tiled / hopper-128, --conv-engine=legacy:
# the former defaults and a measured candidate) are left out to keep the call within its limit;
# add them to CANDIDATES_LATE to run them again.
# --switch-off=deferred-bias,qk-norm,upsample,group-norm,strided-gemm,layer-norm: the default run
# without the fusions (biases folded into their consumers, the q/k kernel and copy-free joins,
# the one-pass upsampling, the sliced GroupNorm statistics, the strided GEMM over narrowed views,
# our LayerNorm kernel in the UNets and CLIP).
# --conv-engine=fastest@sd15,sdxl: per convolution shape, the cuDNN API (graph or legacy) whose
# plan ran it faster when first met — the default on cards other than 9.x since session 27; on
# Hopper, whether a per-shape choice beats the graph API's default.
# Combinations for #9's second goals (flags joined by +; --cuda-graph adds the forward replayed as
# one CUDA graph, "replayed step ms" in compare.py): FLUX-dev <= 80 ms a step with FP8 (flux-fast's
# level: FP8 products, the fastest attention, graphs), SD 1.5 <= 10 ms a CFG step (stable-fast's).
GOAL_COMBINATIONS=${GOAL_COMBINATIONS-"--quantize=fp8+--attention-kernel=fastest+--cuda-graph@flux-dev --attention-kernel=fastest+--cuda-graph@sd15"}
# Two tiers: CANDIDATES right after the end-to-end runs, CANDIDATES_LATE after the CUDA-graph
# experiment and the kernel traces (the call's order: parity, op tables, models, end to end,
# CANDIDATES, graphs, traces, CANDIDATES_LATE, large images).
CANDIDATES=${CANDIDATES-"--attention-kernel=fastest --quantize=fp8@$DIT_AND_SDXL --quantize=q8_0@flux-dev $GOAL_COMBINATIONS"}
CANDIDATES_LATE=${CANDIDATES_LATE-"--conv-engine=fastest@sd15,sdxl --quantize=q4k@flux-dev --switch-off=deferred-bias,qk-norm,upsample,group-norm,strided-gemm,layer-norm"}
# End to end at the step counts issue #9 names, both sides (E2E= to leave out): model:dtype:steps,
# labelled "<model> (N steps)".
E2E=${E2E-"sdxl:f16:30 flux-dev:bf16:28"}
# Large images (candela side only; LARGE= to leave out): model:dtype:side, with --vae-tiling,
# one step, for the peak memory (#9: SDXL at 2048² within a 24 GB card).
LARGE=${LARGE-"sdxl:f16:2048"}
# Kernel tables (TRACE_MODELS= to leave them out): what each timed part runs, kernel by kernel —
# candela under the CUPTI tracer (tools/cuda/kernel_trace.c, in a run of its own), diffusers under
# torch.profiler (after its timed forwards) — as $OUT/kernel-table-<model>-<dtype>.json per side.
TRACE_MODELS=${TRACE_MODELS-"sd15:f16 sdxl:f16 sd35-large:f16 flux-dev:bf16"}
# The CUDA-graph experiment (candela side only; GRAPH_MODELS= to leave it out): model:dtype:steps.
GRAPH_MODELS=${GRAPH_MODELS-"sd15:f16:10 sdxl:f16:10 sd35-large:f16:6 flux-dev:bf16:6"}
# For a dry run on a CPU machine: DEVICE=cpu BIN=target/release/candela-bench
# BENCHES=tests/fixtures/models MODELS="sd1-tiny:f32" bash tools/bench/gpu/run.sh candela
# (and PYTHON=tools/reference/.venv/bin/python for the diffusers side).
DEVICE=${DEVICE:-cuda}
BENCHES=${BENCHES:-benches}
PYTHON=${PYTHON:-python3}
LD_LIBRARY_PATH=$(find /opt /usr/local/nvidia -name 'lib*.so*' 2>/dev/null |
    grep -E 'libcublas|libcudnn|libcurand|libcudart|libnvrtc|libcuda\.so' | grep -v compat |
    xargs -n1 dirname | sort -u | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
# Appends the JSON object of one run (file $1) to $results as model $2.
append_result() {
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['model']=sys.argv[2]; print(json.dumps(d))" "$1" "$2" >> "$results"
}
# Runs each candidate of list $1 ("flag[+flag…][@model,model]" …) on the models it names (all by
# default).
run_candidates() {
    for candidate in $1; do
        flag=${candidate%%@*}
        IFS=+ read -r -a flags <<< "$flag"
        only=""
        [[ $candidate == *@* ]] && only=",${candidate#*@},"
        for spec in $MODELS; do
            model=${spec%%:*} dtype=${spec##*:}
            [ -n "$only" ] && [[ $only != *",$model,"* ]] && continue
            echo "== candela $model $dtype, $flag" | tee -a "$log"
            # The per-shape races' times in the log ("convolution APIs raced" is a debug line).
            CANDELA_LOG=info,candela::engine::cuda::conv=debug \
            timeout 90 "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" \
                --steps 1 --repeats "$REPEATS" "${flags[@]}" "${CANDIDATE_FLAGS[@]}" \
                --json-out /tmp/candidate.json >> "$log" 2>&1 \
                && append_result /tmp/candidate.json "$model-$dtype (${flag#--})" \
                || echo "candela $model with $flag failed (exit $?)" | tee -a "$log"
        done
    done
}
# Flags every candidate run adds (set below where a check calls for them).
CANDIDATE_FLAGS=()
log="$OUT/$side.log"
results="$OUT/$side.jsonl"
: > "$results"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"; } | tee "$log"

# The candela binary from the kit (or $BIN).
unpack_candela() {
    bin=${BIN:-/tmp/candela-bench}
    if [ -z "${BIN:-}" ]; then xz -dc .gpu/bin/candela-bench.xz > "$bin" && chmod +x "$bin" || exit 1; fi
}
# The last of the candela side: the late candidates, then large images.
run_late() {
    run_candidates "$CANDIDATES_LATE"
    for spec in $LARGE; do
        IFS=: read -r model dtype side <<< "$spec"
        echo "== candela $model $dtype ${side}², VAE tiling" | tee -a "$log"
        timeout 120 "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" \
            --width "$side" --height "$side" --vae-tiling --steps 1 --repeats 1 \
            --json-out /tmp/large.json >> "$log" 2>&1 \
            && append_result /tmp/large.json "$model-$dtype (${side}², VAE tiling)" \
            || echo "candela $model ${side}² failed (exit $?)" | tee -a "$log"
    done
}

case "$side" in
late)
    # A third call's results go under its own $OUT as candela.jsonl (compare.py's third folder).
    results="$OUT/candela.jsonl"
    : > "$results"
    unpack_candela
    run_late
    ;;
candela)
    unpack_candela
    # Correctness first: the tiny models of every family on the GPU against the CPU path.
    for dtype in f32 f16; do
        timeout 60 "$bin" --device-parity --device "$DEVICE" --dtype "$dtype" 2>&1 | tee -a "$log"
    done
    # The same in f16 with cuDNN's fused attention (candidate): whole pipelines through it.
    echo "== device parity f16, --attention-kernel cudnn" | tee -a "$log"
    timeout 60 "$bin" --device-parity --device "$DEVICE" --dtype f16 --attention-kernel cudnn 2>&1 | tee -a "$log"
    # A crash there (a signal, or the time limit) would take every run racing cuDNN's attention
    # down with it: the candidates then race our kernels only.
    if [ "${PIPESTATUS[0]}" -ge 124 ]; then
        CANDIDATE_FLAGS=(--switch-off=cudnn-attention)
        echo "cuDNN's attention crashed or hung: the candidates run with ${CANDIDATE_FLAGS[*]}" | tee -a "$log"
    fi
    # The step's ops at every family's shapes, candela then PyTorch on the same figures' shapes.
    for dtype in $KERNEL_DTYPES; do
        echo "== kernels $dtype" | tee -a "$log"
        timeout 120 "$bin" --kernels --device "$DEVICE" --dtype "$dtype" --repeats 5 \
            --json-out "$OUT/kernels-$dtype.jsonl" >> "$log" 2>&1 || echo "kernels $dtype failed (exit $?)" | tee -a "$log"
        timeout 120 "$PYTHON" tools/bench/gpu/kernels_torch.py "$OUT/kernels-$dtype.jsonl" --device "$DEVICE" \
            --dtype "$dtype" --out "$OUT/kernels-torch-$dtype.jsonl" 2>&1 | tee -a "$log"
    done
    for spec in $MODELS; do
        model=${spec%%:*} dtype=${spec##*:}
        echo "== candela $model $dtype" | tee -a "$log"
        timeout 90 "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" \
            --steps "$STEPS" --repeats "$REPEATS" $PROFILE --json-out "/tmp/$model.json" >> "$log" 2>&1 \
            && append_result "/tmp/$model.json" "$model-$dtype" \
            || echo "candela $model failed (exit $?)" | tee -a "$log"
    done
    # End to end before the candidates: a goal of #9, and the candidates' runs may meet the
    # call's time limit (they run in order of importance).
    for spec in $E2E; do
        IFS=: read -r model dtype steps <<< "$spec"
        echo "== candela $model $dtype, $steps steps" | tee -a "$log"
        timeout 120 "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" \
            --steps "$steps" --repeats 1 --json-out /tmp/e2e.json >> "$log" 2>&1 \
            && append_result /tmp/e2e.json "$model-$dtype ($steps steps)" \
            || echo "candela $model $steps steps failed (exit $?)" | tee -a "$log"
    done
    run_candidates "$CANDIDATES"
    # Experiment: the denoiser forward replayed as one CUDA graph (launch overhead gone), then a
    # generation of the spec's steps eager and again with its steps replayed as CUDA graphs
    # (captured at the first step), with the two runs' latents compared (0 expected).
    for spec in $GRAPH_MODELS; do
        IFS=: read -r model dtype steps <<< "$spec"
        echo "== candela $model $dtype, CUDA graph, $steps steps" | tee -a "$log"
        timeout 90 "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" --steps "$steps" \
            --repeats "$REPEATS" --cuda-graph --json-out "/tmp/graph-$model.json" >> "$log" 2>&1 \
            && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'model': sys.argv[2], 'denoiser_step_ms': d['denoiser_step_ms'], 'graph_ms': d.get('denoiser_step_graph_ms'), 'error': d.get('cuda_graph_error'), 'steps': d['steps'], 'end_to_end_s': d['end_to_end_s'], 'end_to_end_graph_s': d.get('end_to_end_graph_s'), 'graph_latents_max_diff': d.get('graph_latents_max_diff')}))" "/tmp/graph-$model.json" "$model" | tee -a "$OUT/graphs.jsonl" \
            || echo "candela $model graph run failed (exit $?)" | tee -a "$log"
    done
    for spec in $TRACE_MODELS; do
        model=${spec%%:*} dtype=${spec##*:}
        echo "== candela $model $dtype, kernel trace" | tee -a "$log"
        rm -f /tmp/trace.tsv
        timeout 90 env LD_PRELOAD="${TRACER:-$PWD/.gpu/bin/libkerneltrace.so}" KERNEL_TRACE_OUT=/tmp/trace.tsv \
            "$bin" --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" --steps 1 --repeats 3 >> "$log" 2>&1 \
            || echo "candela $model kernel trace failed (exit $?)" | tee -a "$log"
        # Whatever windows were written, even by a run cut short.
        [ -s /tmp/trace.tsv ] && python3 tools/bench/kernel_table.py /tmp/trace.tsv --label "candela $model-$dtype" \
            --out "$OUT/kernel-table-$model-$dtype.json" 2>&1 | tee -a "$log"
    done
    run_late
    ;;
diffusers)
    site=/tmp/site
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl >> "$log" 2>&1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    "$PYTHON" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"
    for spec in $MODELS; do
        model=${spec%%:*} dtype=${spec##*:}
        echo "== diffusers $model $dtype" | tee -a "$log"
        trace=()
        [[ " $TRACE_MODELS " == *" $spec "* ]] && trace=(--kernel-trace "$OUT/kernel-table-$model-$dtype.json")
        timeout 90 "$PYTHON" tools/bench/bench_diffusers.py --configs "$BENCHES/$model" --device "$DEVICE" --dtype "$dtype" \
            --steps "$STEPS" --repeats "$REPEATS" $PROFILE "${trace[@]}" --out "/tmp/$model.json" >> "$log" 2>&1 \
            && append_result "/tmp/$model.json" "$model-$dtype" \
            || echo "diffusers $model failed (exit $?)" | tee -a "$log"
    done
    for spec in $E2E; do
        IFS=: read -r model dtype steps <<< "$spec"
        echo "== diffusers $model $dtype, $steps steps" | tee -a "$log"
        timeout 120 "$PYTHON" tools/bench/bench_diffusers.py --configs "$BENCHES/$model" --device "$DEVICE" \
            --dtype "$dtype" --steps "$steps" --repeats 1 --out /tmp/e2e.json >> "$log" 2>&1 \
            && append_result /tmp/e2e.json "$model-$dtype ($steps steps)" \
            || echo "diffusers $model $steps steps failed (exit $?)" | tee -a "$log"
    done
    ;;
*)
    echo "usage: run.sh candela|diffusers|late" >&2
    exit 2
    ;;
esac
tail -n 40 "$log"
# Kernels the device self-check switched off or replaced, and shapes the graph-API convolution fell back on.
grep -h "switched off\|runs instead\|graph-API convolution unavailable" "$log" | sort | uniq -c | head -20
cat "$results"
