#!/usr/bin/env bash
# One command for the day a GPU machine is lent: does distconv work on it, and how fast?
#
#   bash scripts/gpu_check.sh                  # everything, under gpu_check/<UTC time>/
#   bash scripts/gpu_check.sh --dry-run        # print what would run, run nothing
#   bash scripts/gpu_check.sh --out DIR --extra gpu13 --no-install
#
# Steps (each with its own time limit; the whole is under 10 minutes):
#   env       nvidia-smi; Python, NumPy, CuPy, CUDA, cuDNN, MPI versions, git commit
#   install   pip install -e ".[EXTRA,mpich,test]" (EXTRA: gpu = CUDA 12.x, gpu13 = CUDA
#             13.x; --system-mpi leaves out mpich; --no-install on a machine without
#             network, with the packages already in the venv)
#   tests     tests/test_kernels.py, which holds the GPU tests (every CUDA kernel against
#             its NumPy twin on the device, cuDNN dispatch); GPU cases skipped because
#             CuPy sees no GPU count as a failure here
#   bench     scripts/bench_conv.py --backend cupy twice: distconv's im2col + cuBLAS
#             kernels, then DISTCONV_CUDNN=1 (cuDNN); compared shape by shape (fails
#             if cuDNN was not used: pip install nvidia-cudnn-cu12 gives CuPy one)
#   train     scripts/train.py for 20 steps on 1 GPU (float64, --profile), and the same
#             on NumPy; the losses must agree to 1e-8
# Everything goes under OUT: one log per step, the JSON results, summary.tsv (step, exit
# code, seconds, log) and a PASS/FAIL line. Exit code 0 only if every step passed.
# Uses the python on PATH (run it inside the venv you want to test); runs from any
# directory.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
INSTALL=1
EXTRA="gpu"
MPI_EXTRA="mpich"       # --system-mpi: keep the site's MPI (mpi4py built against it)
OUT=""
PY="${PYTHON:-python}"
BUDGET_S=580            # whole run; each step also has its own limit below

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    echo "options: --dry-run  --out DIR  --extra gpu|gpu13  --no-install  --system-mpi" \
         " --python PY"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --no-install) INSTALL=0 ;;
        --system-mpi) MPI_EXTRA="" ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --extra) EXTRA="${2:?--extra needs gpu or gpu13}"; shift ;;
        --python) PY="${2:?--python needs an interpreter}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$EXTRA" in
    gpu|gpu13) ;;
    *) echo "gpu_check.sh: --extra must be gpu or gpu13, got '$EXTRA'" >&2; exit 2 ;;
esac
OUT="${OUT:-$REPO/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
START=$SECONDS
FAILED=()

# run_step NAME LIMIT_S LOGFILE CMD...: run CMD with a time limit (capped by what is left
# of BUDGET_S), stdout+stderr to OUT/LOGFILE; record the exit code and seconds.
run_step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local left=$((BUDGET_S - (SECONDS - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY" -eq 1 ]; then
        printf '[dry-run] %-8s (limit %4s s) > %s:' "$name" "$limit" "$OUT/$log"
        printf ' %q' "$@"
        echo
        return 0
    fi
    if [ "$limit" -le 0 ]; then
        echo "=== $name: skipped, the ${BUDGET_S} s budget is spent" | tee -a "$OUT/summary.txt"
        printf '%s\t%s\t%s\t%s\n' "$name" "budget" 0 "$log" >> "$OUT/summary.tsv"
        FAILED+=("$name")
        return 1
    fi
    echo "=== $name (limit $limit s): $*"
    local t=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
    rc=$?
    local took=$((SECONDS - t))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$log" >> "$OUT/summary.tsv"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
        echo "=== $name: FAILED (exit code $rc, $took s); last lines of $OUT/$log:"
        tail -n 15 "$OUT/$log"
    else
        echo "=== $name: ok ($took s)"
    fi
    return "$rc"
}

# no_gpu_skips LOG: fail if pytest skipped GPU cases because CuPy or the GPU is missing
# (other skips, e.g. no nvcc on PATH, are reported by pytest -ra but allowed)
no_gpu_skips() {
    if grep -E "^SKIPPED.*(CuPy sees no GPU|could not import 'cupy'|No module named 'cupy')" "$1"
    then
        echo "GPU tests were skipped (see above): CuPy or the GPU is not usable" >&2
        return 1
    fi
    if ! grep -E "^tests/test_kernels.py::.*gpu|[0-9]+ passed" "$1" > /dev/null; then
        echo "no test passed" >&2
        return 1
    fi
}

cd "$REPO" || exit 2
if [ "$DRY" -eq 1 ]; then
    echo "gpu_check.sh --dry-run: would write everything under $OUT"
else
    mkdir -p "$OUT" || exit 2
    : > "$OUT/summary.tsv"
    echo "gpu_check.sh: results under $OUT"
fi

run_step nvidia_smi 15 nvidia-smi.txt nvidia-smi
run_step env 30 env.txt "$PY" scripts/gpu_check_report.py env
if [ "$INSTALL" -eq 1 ]; then
    run_step install 150 install.log "$PY" -m pip install -e ".[$EXTRA,$MPI_EXTRA,test]"
fi
NPROC=$(nproc 2>/dev/null || echo 4)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((NPROC < 4 ? NPROC : 4))}"
run_step tests 120 tests.log "$PY" -m pytest -ra -p no:cacheprovider \
    tests/test_kernels.py
if [ "$DRY" -eq 0 ] && ! no_gpu_skips "$OUT/tests.log" > "$OUT/tests_skips.txt" 2>&1; then
    FAILED+=("tests-skipped")
    echo "=== tests: FAILED: GPU cases were skipped or nothing passed, see tests_skips.txt"
fi
run_step bench_kernels 60 bench_kernels.log env DISTCONV_CUDNN=0 "$PY" scripts/bench_conv.py \
    --backend cupy --no-torch --repeats 5 --json "$OUT/bench_conv_kernels.json"
run_step bench_cudnn 60 bench_cudnn.log env DISTCONV_CUDNN=1 "$PY" scripts/bench_conv.py \
    --backend cupy --no-torch --repeats 5 --json "$OUT/bench_conv_cudnn.json"
run_step bench_compare 15 bench_compare.txt "$PY" scripts/gpu_check_report.py bench \
    "$OUT/bench_conv_kernels.json" "$OUT/bench_conv_cudnn.json" \
    --cudnn-log "$OUT/bench_cudnn.log"
run_step data 30 data.log "$PY" scripts/make_dataset.py digits --out "$OUT/data"
TRAIN_ARGS=(--width 16 --batch-size 64 --epochs 1 --max-steps 20 --log-every 1
            --dtype float64 --strategy sample --data "$OUT/data/digits_train.h5"
            --test-data "$OUT/data/digits_test.h5")
run_step train_gpu 45 train_gpu.log "$PY" scripts/train.py --backend cupy --profile \
    --out "$OUT/train_gpu" "${TRAIN_ARGS[@]}"
run_step train_cpu 45 train_cpu.log "$PY" scripts/train.py --backend numpy \
    --out "$OUT/train_cpu" "${TRAIN_ARGS[@]}"
run_step train_compare 15 train_compare.txt "$PY" scripts/gpu_check_report.py train \
    "$OUT/train_gpu/metrics.jsonl" "$OUT/train_cpu/metrics.jsonl" --rtol 1e-8

if [ "$DRY" -eq 1 ]; then
    exit 0
fi
took=$((SECONDS - START))
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "PASS: every step passed in $took s; results under $OUT" | tee "$OUT/summary.txt"
    exit 0
fi
echo "FAIL: ${FAILED[*]} (in $took s); results under $OUT" | tee "$OUT/summary.txt"
exit 1
