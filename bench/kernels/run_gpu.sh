#!/usr/bin/env bash
# GPU checks for the fused classification kernels, in one go on a CUDA box:
#   1. the kernel tests, compiled (TRITON_INTERPRET=0, tensors on the GPU, autotuning on);
#   2. the benchmark (fused vs eager loop vs torch.compile, against measured copy bandwidth).
# Results land in the folder given as $1, else $OUT, else bench/kernels/results.
#
#   bash bench/kernels/run_gpu.sh [OUT_DIR]        (PYTHON=/path/to/python to pick the interpreter)
set -uo pipefail

cd "$(dirname "$0")/../.."
out_dir="${1:-${OUT:-bench/kernels/results}}"
python="${PYTHON:-python3}"
mkdir -p "$out_dir"

"$python" - <<'PY' || { echo "no CUDA device visible to torch: these checks need a GPU" >&2; exit 2; }
import torch, triton
assert torch.cuda.is_available()
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv \
    > "$out_dir/nvidia_smi.csv" 2>&1 || true

export TRITON_INTERPRET=0
unset APPLIANCE_KERNEL

status=0
"$python" -m pytest tests/kernels -q -p no:cacheprovider --junitxml="$out_dir/kernel_tests.xml" \
    2>&1 | tee "$out_dir/kernel_tests.log" || status=1
"$python" bench/kernels/bench_fused_topk.py --json-out "$out_dir/bench_fused_topk.json" \
    2>&1 | tee "$out_dir/bench_fused_topk.log" || status=1

echo "results in $out_dir (exit $status)"
exit "$status"
