#!/usr/bin/env bash
# GPU checks of the Triton kernels, for a lent GPU machine. Run from the repo root with $OUT set
# to an output folder; about 3-5 minutes on an H200 (kernel compiles dominate the tests), and
# under 9 by the timeouts of its steps (240 + 90 + 60 + 150 s).
#   1. tests/triton_cases.py compiled on CUDA: every kernel against its torch reference
#      -> $OUT/kernel_tests.txt (the check fails if they fail)
#   2. one prefill and one decode step of the engine on Triton vs torch kernels, on a
#      tokenizer-free tiny Llama (gpu_bench.py --check-only; the check fails if they disagree)
#      -> $OUT/backend_check.{json,txt}; and the engine's greedy tokens on Triton vs torch on the
#      default model (its fixture needs the model's tokenizer, which may be absent there:
#      reported, not fatal) -> $OUT/engine_test.txt
#   3. micro-benchmarks on Llama-2-7B shapes -> $OUT/gpu_micro.{json,md,txt}
# `gpu_check.sh --dry-run` runs the same steps on the CPU through the Triton interpreter, with
# tiny benchmark shapes, to check the script itself.
set -u
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ "${1:-}" = "--dry-run" ]; then
  export TRITON_INTERPRET=1
  micro_args=(--dry-run)
else
  unset TRITON_INTERPRET  # compiled kernels on CUDA tensors
  micro_args=()
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
fi

source benchmarks/checkout_path.sh  # this checkout's pagedlora, not installed
export PYTHONPATH="$PWD/benchmarks:$PYTHONPATH"  # gpu_bench.py's workload.py (PYTHONSAFEPATH)
"$PY" -c "import pagedlora.kernels.triton_lora" || exit 1

status=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --durations=10 tests/triton_cases.py \
  -k "not engine" 2>&1 | tee "$OUT/kernel_tests.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 90 "$PY" benchmarks/gpu_bench.py --check-only ${micro_args[@]+"${micro_args[@]}"} \
  --out "$OUT" --work-dir "${TMPDIR:-/tmp}/pagedlora-gpu-check" > "$OUT/backend_check.txt" 2>&1 \
  || status=1
tail -1 "$OUT/backend_check.txt"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/triton_cases.py -k engine 2>&1 \
  | tail -40 > "$OUT/engine_test.txt"
tail -1 "$OUT/engine_test.txt"
timeout 150 "$PY" benchmarks/gpu_micro.py ${micro_args[@]+"${micro_args[@]}"} --out "$OUT" > "$OUT/gpu_micro.txt" 2>&1 \
  || status=1
tail -60 "$OUT/gpu_micro.txt"
exit $status
