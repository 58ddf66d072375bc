#!/usr/bin/env bash
# One device call on a lent GPU, sized for the 8 minutes a session can afford: correctness on CUDA first, then the
# headline numbers. Everything lands under $OUT (at most 8 files come back from a device call):
#
#   device.txt      GPU, driver, CUDA, torch and triton versions
#   tests.log       the whole test suite on CUDA, no interpreter (pytest-xdist, 8 workers)
#   demo.log/.json  the Split-Digits demo on CUDA
#   warm.log        Triton compiling/autotuning the benchmark's kernels in 3 processes while the tests run
#   headline.json   benchmarks/headline.py, rewritten after every case (a timeout keeps what was measured)
#   headline.log    its one-line-per-case summary
#
#   bash benchmarks/gpu_session.sh [tests] [demo] [headline]     (no argument: all three)
#
# HEADLINE_BUDGET_S (default 170) stops the benchmark from starting new cases; HEADLINE_ARGS adds arguments to it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PYTHON=${PYTHON:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests demo headline)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
status=0
start=$(date +%s)
stamp() { echo "[gpu_session +$(($(date +%s) - start))s] $*"; }

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

pids=()
if want tests; then
    stamp "tests"
    timeout 200 "$PYTHON" -m pytest -q tests -n 8 -p no:cacheprovider --timeout 150 --durations=15 -rfE \
        >"$OUT/tests.log" 2>&1 &
    pids+=($!)
fi
if want headline; then
    # Fill Triton's on-disk cache (compiles, autotuning) on idle CPU cores while the tests run.
    for shard in 0 1 2; do
        timeout 200 "$PYTHON" benchmarks/headline.py --out /tmp/warm --warm --shard "$shard/3" >>"$OUT/warm.log" 2>&1 &
        pids+=($!)
    done
fi
if want demo; then
    stamp "demo"
    timeout 200 "$PYTHON" -m packnet demo --out /tmp/packnet-demo --json "$OUT/demo.json" >"$OUT/demo.log" 2>&1 &
    pids+=($!)
fi
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
want tests && tail -25 "$OUT/tests.log"
want demo && tail -15 "$OUT/demo.log"

if want headline; then
    stamp "headline"
    # shellcheck disable=SC2086
    timeout $((${HEADLINE_BUDGET_S:-170} + 90)) "$PYTHON" benchmarks/headline.py --out "$OUT" \
        --budget-s "${HEADLINE_BUDGET_S:-170}" ${HEADLINE_ARGS:-} >"$OUT/headline.log" 2>&1 || status=1
    tail -60 "$OUT/headline.log"
fi
stamp "done (status $status)"
exit $status
