#!/usr/bin/env bash
# pagedlora on S-LoRA's settings S1 (rank 8) and S2 (ranks 64/32/16/8) with n = 5, 100, 1000
# adapters on a Llama-2-7B-shaped model of random fp16 weights (nothing is downloaded): offline
# throughput and online SLO attainment (TTFT <= 6 s), per benchmarks/gpu_bench.py's docstring.
# For a lent GPU machine (an H200: about 6 minutes, under 8 by the driver's 440 s budget and
# this script's 470 s timeout); run from anywhere:
#   OUT=/some/folder benchmarks/gpu_bench.sh    # -> $OUT/gpu_bench.{json,md,txt}
# $OUT defaults to ./gpu_bench_out. The model (13.5 GB) and the adapter files (about 1.1 GB) go
# to --work-dir (default $TMPDIR/pagedlora-gpu-bench, else /tmp/...) and are reused by later
# invocations. Other options pass through to the driver (--num-requests, --rate, --pool-gb,
# --num-adapters, --budget-s).
# `gpu_bench.sh --dry-run` runs the same flow on the CPU (a tiny Llama, 8 requests per run,
# torch kernels; the Triton-vs-torch check through the Triton interpreter) to check the script
# itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_bench_out}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python || command -v python3)}
case " $* " in
  *" --dry-run "*) export TRITON_INTERPRET=1 ;;  # the backend check's Triton on the CPU
  *) unset TRITON_INTERPRET  # compiled kernels on CUDA tensors
     "$PY" -c "import sys, torch; torch.cuda.is_available() or sys.exit(
'gpu_bench: torch %s (CUDA build %s) sees no CUDA device; use --dry-run on a CPU'
% (torch.__version__, torch.version.cuda))" || exit 1 ;;
esac
source benchmarks/checkout_path.sh  # this checkout's pagedlora, not installed
export PYTHONPATH="$PWD/benchmarks:$PYTHONPATH"  # workload.py (PYTHONSAFEPATH drops it)
timeout 470 "$PY" benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.txt"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "gpu_bench: stopped at 470 s; $OUT/gpu_bench.json has the runs done"
exit "$status"
