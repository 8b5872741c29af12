#!/usr/bin/env bash
# Re-measure issue #16's GPU figures on a lent CUDA device in one short run (under 10 minutes in all).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root; $OUT defaults to ./gpu_check_out
#
# Needs torch (+ torchvision) with CUDA; no PyAV, tensorly, typer or onnx (none is imported on these paths).
# Each step has its own time cap and the whole script a deadline (GPU_CHECK_BUDGET_S, default 540 s), so a
# slow step costs its own rows only. Writes into $OUT:
#   env.txt                     torch / CUDA / GPU versions, nvidia-smi
#   overhead.{log,json}         bench_overhead.py --device cuda: µs per call, DecomposedConv3d vs nn.Conv3d
#   memory.{log,json}           bench_train_memory.py --device cuda --batch 8: report vs max_memory_allocated
#   inference_fp32.{log,json}   bench_inference.py --device cuda, batches 1/8/32, atoms 3x6/2x4: auto ratios
#   calibrate.{log,json}        bench_inference.py --calibrate --device cuda: fitted figures for cost.py's "cuda"
#   inference_bf16.{log,json}   the same ratios in bfloat16, if time is left
#   summary.txt                 each step's exit code and seconds
# Read the *.log tables into BENCHMARKS.md ("Inference speed per execution form" and the memory section).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
START=$(date +%s)

step() {  # step NAME CAP_SECONDS COMMAND...: run with min(CAP, time left), log its output and exit code
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then
        echo "$name: skipped (deadline)" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    local begin=$(date +%s)
    timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc $(($(date +%s) - begin)) s (cap $cap s)" | tee -a "$OUT/summary.txt"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'available', torch.cuda.is_available()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
    "$PYTHON" -c "import torchvision; print('torchvision', torchvision.__version__)" || echo "torchvision MISSING: r3d_18 rows cannot run"
    "$PYTHON" -c "import onnxruntime; print('onnxruntime', onnxruntime.__version__)" || true
    nvidia-smi || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step overhead 60 "$PYTHON" benchmarks/bench_overhead.py --device cuda --rounds 41 --json "$OUT/overhead.json"
step memory 150 "$PYTHON" benchmarks/bench_train_memory.py --device cuda --batch 8 --skip-finetune --meta-batches "" \
    --json "$OUT/memory.json"
step inference_fp32 240 "$PYTHON" benchmarks/bench_inference.py --device cuda --batches 1,8,32 --atoms 3x6,2x4 \
    --runs 20 --repeats 5 --forms fused,temporal_first,spatial_first --json "$OUT/inference_fp32.json"
step calibrate 90 "$PYTHON" benchmarks/bench_inference.py --device cuda --calibrate --batches 1,32 --atoms 3x6,2x4 \
    --repeats 5 --json "$OUT/calibrate.json"
step inference_bf16 120 "$PYTHON" benchmarks/bench_inference.py --device cuda --dtype bfloat16 --batches 1,8,32 \
    --atoms 3x6,2x4 --runs 20 --repeats 5 --forms fused --json "$OUT/inference_bf16.json"
echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
