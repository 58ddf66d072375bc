#!/usr/bin/env bash
# One device call on a lent GPU: the whole test suite on CUDA (no interpreter), then the benchmark suite, then the
# demo. Everything lands under $OUT (at most 8 files come back from a device call, so logs are kept few).
#
#   bash benchmarks/gpu_session.sh [all|tests|bench|demo]
#
# Budget: one device call is limited to 10 minutes and pytest-benchmark writes its JSON only when the session ends,
# so run the stages in separate calls: `... tests demo` (~4 min), then `... bench` (up to ~9 min; set
# PACKNET_BENCH_REP_MS=20 to shorten it, or PACKNET_BENCH_QUICK=1 for a smoke run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
status=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} >"$OUT/device.txt" 2>&1

want() { [[ " ${stages[*]} " == *" all "* || " ${stages[*]} " == *" $1 "* ]]; }

if want tests; then
    timeout 300 python -m pytest -q tests -x --durations=15 2>&1 | tee "$OUT/tests.log" || status=1
fi
if want bench; then
    timeout 560 python -m packnet bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
if want demo; then
    timeout 120 python -m packnet demo --out /tmp/packnet-demo --json "$OUT/demo.json" 2>&1 | tail -40 \
        | tee "$OUT/demo.log" || status=1
fi
exit $status
