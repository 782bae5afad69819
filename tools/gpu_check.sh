#!/usr/bin/env bash
# GPU check, one command for a lent GPU machine (no network; python3 with torch+CUDA, pytest, ninja):
# build for sm_90 with all cores, run the whole test suite (the CUDA cases run here), a short GPU
# benchmark, and print a summary last. Logs and result tables (8 files) go to $OUT when it is set. Sized for
# < 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY="${PYTHON:-python3}"
MACHINE=$(mktemp)  # not in $OUT: at most 8 files come back from a lent machine
summary=()
failed=0

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  (%s)' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log")")
  tail -n 25 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || failed=1
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null; } > "$MACHINE" 2>&1
cat "$MACHINE"

if step build 300 "$PY" setup.py build_ext --inplace; then
  step tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests
  # rnnext vs cuDNN vs reference at (100,64,512,512) and (1024,16,768,768); tables land in $OUT
  step bench_fp32 150 "$PY" benchmarks/bench.py --device cuda --dtype float32 --quick --out "$OUT"
  step bench_bf16 150 "$PY" benchmarks/bench.py --device cuda --dtype bfloat16 --quick --out "$OUT"
fi

echo; echo "== gpu_check summary =="; cat "$MACHINE"
printf '%s\n' "${summary[@]}"
grep -E "passed|failed" "$OUT/tests.log" 2>/dev/null | tail -n 1
grep -h "geometric-mean\|peak memory" "$OUT"/cuda-*.md 2>/dev/null
exit $failed
