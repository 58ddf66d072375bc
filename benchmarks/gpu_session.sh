#!/usr/bin/env bash
# One device call on a lent GPU, sized for the 8 minutes a session can afford: correctness on CUDA first, then the
# headline numbers. Everything lands under $OUT (at most 8 files come back from a device call):
#
#   tests.log       the whole test suite on CUDA, no interpreter (pytest-xdist, 8 workers)
#   demo.json       the Split-Digits demo on CUDA
#   headline.json   benchmarks/headline.py, rewritten after every case (a timeout keeps what was measured)
#   host_profile.txt  benchmarks/host_profile.py: the host time of each layer of a packed call, and a cProfile
#   tiles.json      benchmarks/tiles.py: per-task latency with the tile map
#   mixed.json      benchmarks/mixed.py: mixed-task batches in one launch against splitting by task
#   graphs.json     benchmarks/graphs.py: packed ResNet-50 and BERT-base encoder at batch 1, eager and as CUDA graphs,
#                   against their dense twins, and whether torch.compile(mode="reduce-overhead") takes our ops
#   logs.txt        the GPU, driver, CUDA, torch and triton versions (device.log), then the tails of the other logs
#                   (demo, compile warm-up, headline, tiles, mixed, graphs), gathered after each stage from $LOGS
#                   (default /tmp/gpu-logs), so a call cut short still returns what they said so far
#
#   bash benchmarks/gpu_session.sh [tests] [profile] [demo] [headline] [tiles] [mixed] [graphs]   (no argument: all)
#
# Named only (not in "all", which already returns 8 files): mixed_conv, benchmarks/mixed_conv.py (mixed-task conv
# batches in one launch against one task and splitting by task) into mixed_conv.json; MIXED_CONV_BUDGET_S (60).
#
# Reports: python -c 'import sys; sys.path[:0] = ["benchmarks"]; import tiles; tiles.write_report("OUT/tiles.json")'
# (mixed likewise; headline: python benchmarks/headline_report.py OUT/headline.json).
#
# TEST_LIST names a file of pytest node ids, one per line, to run instead of the whole suite (a rerun of what failed
# or was cut). TESTS_TIMEOUT_S (default 200) bounds stage 1 (tests, demo, compiling); HEADLINE_BUDGET_S (default 110) stops the
# benchmark from starting new cases and HEADLINE_GRACE_S (default 90) kills it that much later; HEADLINE_ARGS adds
# arguments to it (and to the compile warm-up). TILES_BUDGET_S, MIXED_BUDGET_S and GRAPHS_BUDGET_S (60 each) do the same
# for their stages, each killed a minute after its budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
LOGS=${LOGS:-/tmp/gpu-logs}
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PYTHON=${PYTHON:-python3}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests profile demo headline tiles mixed graphs)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
status=0
start=$(date +%s)
stamp() { echo "[gpu_session +$(($(date +%s) - start))s] $*"; }
timed_stage() {  # NAME BUDGET_S: run benchmarks/NAME.py with that budget
    stamp "$1"
    timeout $(($2 + 60)) "$PYTHON" "benchmarks/$1.py" --out "$OUT" --budget-s "$2" >"$LOGS/$1.log" 2>&1 || status=1
    tail -30 "$LOGS/$1.log"
    gather
}
gather() {
    for log in "$LOGS"/*.log; do
        [ -f "$log" ] && { echo "==> $(basename "$log")"; tail -n 150 "$log"; }
    done >"$OUT/logs.txt" 2>/dev/null
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv
    "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} >"$LOGS/device.log" 2>&1
cat "$LOGS/device.log"

# Stage 1, CPU-heavy work side by side: the tests, the demo, and Triton compiling the benchmark's kernels.
export OMP_NUM_THREADS=1
pids=()
if want tests; then
    stamp "tests"
    test_args=(tests)
    [ -n "${TEST_LIST:-}" ] && mapfile -t test_args <"$TEST_LIST"
    # One result line per test (-v), so a run stopped by the time limit still says what passed and failed; SIGINT
    # first so that pytest prints its failure summary.
    timeout -s INT -k 20 "${TESTS_TIMEOUT_S:-200}" "$PYTHON" -m pytest "${test_args[@]}" -v -n "${TEST_WORKERS:-12}" \
        -p no:cacheprovider -p no:benchmark --timeout 150 --durations=20 -rfE >"$OUT/tests.log" 2>&1 &
    pids+=($!)
fi
if want headline; then
    # Fill Triton's on-disk cache (compiles, autotuning) so that the timed run below only times.
    for shard in 0 1 2; do
        timeout "${TESTS_TIMEOUT_S:-200}" "$PYTHON" benchmarks/headline.py --out /tmp/warm --warm --shard "$shard/3" \
            ${HEADLINE_ARGS:-} >>"$LOGS/warm.log" 2>&1 &
        pids+=($!)
    done
fi
# The tile-map, mixed-batch and whole-model stages compile their own kernel variants (mixed tiles take tens of
# seconds each; the models' untuned layers one each): compiled here too, once per case, untimed.
for stage in tiles mixed mixed_conv graphs; do
    if want "$stage"; then
        timeout "${TESTS_TIMEOUT_S:-200}" "$PYTHON" "benchmarks/$stage.py" --json "/tmp/warm/$stage.json" --warm \
            >>"$LOGS/warm.log" 2>&1 &
        pids+=($!)
    fi
done
if want demo; then
    stamp "demo"
    timeout "${TESTS_TIMEOUT_S:-200}" "$PYTHON" -m packnet demo --out /tmp/packnet-demo --json "$OUT/demo.json" \
        >"$LOGS/demo.log" 2>&1 &
    pids+=($!)
fi
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
if want tests; then
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-220 | head -60
    tail -3 "$OUT/tests.log"
fi
want demo && tail -15 "$LOGS/demo.log"
gather

# Stage 2, timing alone on the machine: the host path of one call, then the headline benchmark.
if want profile; then
    stamp "host profile"
    timeout 60 "$PYTHON" benchmarks/host_profile.py --out "$OUT" >/dev/null 2>"$LOGS/host_profile.log" || status=1
    head -6 "$OUT/host_profile.txt"
fi
if want headline; then
    stamp "headline"
    # shellcheck disable=SC2086
    timeout $((${HEADLINE_BUDGET_S:-110} + ${HEADLINE_GRACE_S:-90})) "$PYTHON" benchmarks/headline.py --out "$OUT" \
        --budget-s "${HEADLINE_BUDGET_S:-110}" ${HEADLINE_ARGS:-} >"$LOGS/headline.log" 2>&1 || status=1
    tail -60 "$LOGS/headline.log"
    gather
fi
# The tile map's per-task latencies (block-structured and unstructured packs, BSR peer), then mixed-task batches:
# each script starts no new case after its budget and is killed a minute later; its JSON lands in $OUT.
if want tiles; then
    timed_stage tiles "${TILES_BUDGET_S:-60}"
fi
if want mixed; then
    timed_stage mixed "${MIXED_BUDGET_S:-60}"
fi
if want mixed_conv; then
    timed_stage mixed_conv "${MIXED_CONV_BUDGET_S:-60}"
fi
# Whole models at batch 1, eager and as CUDA graphs (issue 26): host-bound eager latency against the dense twins,
# graph replays against the kernels' sum.
if want graphs; then
    timed_stage graphs "${GRAPHS_BUDGET_S:-60}"
fi
gather
stamp "done (status $status)"
exit $status
