#!/usr/bin/env bash
# GPU checks of the Triton kernels, for a lent GPU machine. Run from the repo root with $OUT set
# to an output folder; about 3-5 minutes on an H200 (kernel compiles dominate the tests), and
# under 8 by the timeouts of its three steps (240 + 60 + 150 s).
#   1. tests/triton_cases.py compiled on CUDA: every kernel against its torch reference
#      -> $OUT/kernel_tests.txt (the check fails if they fail)
#   2. the engine's greedy tokens on Triton vs torch (its fixture needs the default model's
#      tokenizer, which may be absent there: reported, not fatal) -> $OUT/engine_test.txt
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
"$PY" -c "import pagedlora.kernels.triton_lora" || exit 1

status=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider --durations=10 tests/triton_cases.py \
  -k "not engine" 2>&1 | tee "$OUT/kernel_tests.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/triton_cases.py -k engine 2>&1 \
  | tail -40 > "$OUT/engine_test.txt"
tail -1 "$OUT/engine_test.txt"
timeout 150 "$PY" benchmarks/gpu_micro.py ${micro_args[@]+"${micro_args[@]}"} --out "$OUT" > "$OUT/gpu_micro.txt" 2>&1 \
  || status=1
tail -60 "$OUT/gpu_micro.txt"
exit $status
