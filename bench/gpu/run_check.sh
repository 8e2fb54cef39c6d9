#!/usr/bin/env bash
# The exllamav2 GPU check, one command from the repository root on a GPU machine without network:
#
#     bash bench/gpu/run_check.sh "$OUT"
#
# Installs the wheels carried in .whl/, builds exllamav2's CUDA extension for sm_90 while a random
# Llama-2-7B-shaped FP16 model is written, then runs check.py, which writes $OUT/gpu-report.json,
# $OUT/summary.txt and $OUT/gateway.log. Everything printed also goes to $OUT/check.log.
# GPU_CHECK_BUDGET_S (default 480) bounds the whole run; steps that no longer fit are reported as skipped.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu/run_check.sh OUT_DIR}
cd "$(dirname "$0")/../.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/check.log") 2>&1

START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((START + BUDGET_S))
WORK=/tmp/gpu-check
MODEL_DIR=$WORK/llama-2-7b-random
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
# One build directory for this script, check.py and the gateway it starts.
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
mkdir -p "$WORK"

log() { echo "[$(date +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

# A report even when set-up fails, so the output folder always says what happened.
fail() {
    log "FAILED: $1"
    python3 - "$OUT/gpu-report.json" "$1" "${2:-}" <<'PY'
import json, sys
path, stage, detail = sys.argv[1:4]
json.dump({"status": "error", "failed_during": stage, "detail": detail[-4000:]}, open(path, "w"), indent=2)
PY
    exit 1
}

log "budget ${BUDGET_S}s; GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -3)"
python3 -c 'import sys, torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' \
    || fail "python3 has no torch with a visible CUDA GPU"
command -v nvcc >/dev/null || fail "nvcc is not on PATH (exllamav2 builds its extension with it)"
command -v ninja >/dev/null || python3 -c 'import ninja' 2>/dev/null || fail "ninja is missing"
log "nvcc: $(nvcc --version | tail -1)"

ls .whl/*.whl >/dev/null 2>&1 || fail "no wheels in .whl/ (run bench/gpu/fetch_wheels.sh where PyPI is reachable, and carry .whl)"
t=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$WORK/pip.log" 2>&1 || fail "installing the carried wheels" "$(tail -20 "$WORK/pip.log")"
export PYTHONPATH=/tmp/site:$PWD
WHEELS_S=$(($(date +%s) - t))
log "installed $(ls .whl/*.whl | wc -l) wheels in ${WHEELS_S}s"

# The model is written (one CPU core, disk) while the extension compiles (the other cores). A rerun
# on the same machine reuses both.
python3 -c "
import sys, time
from pathlib import Path
from gateway.devtools.tiny_model import write_tiny_model
out, done = Path(sys.argv[1]), Path(sys.argv[1]) / '.complete'
started = time.monotonic()
if not done.is_file():
    write_tiny_model(out, size='7b', seed=0, formats=('hf',))
    done.write_text('')
(out.parent / 'model.seconds').write_text(str(round(time.monotonic() - started)))
" "$MODEL_DIR" > "$WORK/model.log" 2>&1 &
MODEL_PID=$!

BUILD_LIMIT=$((DEADLINE - $(date +%s) - 120))
[ "$BUILD_LIMIT" -gt 60 ] || fail "GPU_CHECK_BUDGET_S=$BUDGET_S leaves no time to build the extension"
log "building exllamav2's CUDA extension (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, at most ${BUILD_LIMIT}s)"
t=$(date +%s)
timeout "$BUILD_LIMIT" python3 -c 'import exllamav2.ext' > "$WORK/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$(($(date +%s) - t))
if [ $BUILD_RC -ne 0 ]; then
    kill "$MODEL_PID" 2>/dev/null
    fail "building exllamav2's extension (exit $BUILD_RC after ${BUILD_S}s)" "$(tail -40 "$WORK/build.log")"
fi
log "extension built in ${BUILD_S}s"

wait "$MODEL_PID" || fail "writing the random 7B model" "$(tail -20 "$WORK/model.log")"
MODEL_S=$(cat "$WORK/model.seconds")
log "7B model written in ${MODEL_S}s: $(du -sh "$MODEL_DIR" | cut -f1) in $MODEL_DIR"

echo "{\"wheel_install_s\": $WHEELS_S, \"extension_build_s\": $BUILD_S, \"model_write_s\": $MODEL_S}" > "$WORK/timings.json"
CHECK_LIMIT=$((DEADLINE - $(date +%s) + 30))
[ "$CHECK_LIMIT" -gt 30 ] || fail "the set-up used the whole budget of ${BUDGET_S}s"
timeout "$CHECK_LIMIT" python3 bench/gpu/check.py --out "$OUT" --model-dir "$MODEL_DIR" \
    --work "$WORK" --deadline "$DEADLINE" --timings "$WORK/timings.json"
RC=$?
log "check.py exited with $RC after $(($(date +%s) - START))s in all"
exit $RC
