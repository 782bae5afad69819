#!/usr/bin/env bash
# GPU check, one command for a lent GPU machine (no network; python3 with torch+CUDA, pytest,
# pytest-xdist, pytest-timeout, ninja): build for sm_90 with a compiler whose C++ runtime is torch's
# (setup.py picks it and says which), smoke-check the build in a subprocess (an error message with a
# number must raise, not crash), run every test, CPU and CUDA, with pytest-xdist (a crash fails one
# test, the rest still run), the CUDA tests again with the persistent kernels forced
# (RNNEXT_CUDA_PATH=persistent), benchmark fp32/bf16/fp16 against torch.nn (per-step and persistent),
# and print one summary line last. Where the host CPU has AMX (there the CPU's 16-bit GEMMs run packed,
# cpu/packed.h; no CPU the sessions built on had it), the tests ran that path too, and a bf16 CPU benchmark
# follows (at most 3.5 minutes more). At most 8 files in $OUT. Sized for < 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PY="${PYTHON:-python3}"
WORKERS="${WORKERS:-8}"
BENCH=$(mktemp -d)  # the benchmark's csv/png stay here: only its .md tables go to $OUT
rcs=()
failed=0

step() {  # name, timeout seconds, log file, command...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  echo "== $name: $*" >> "$log"
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  pkill -9 -f "execnet|xdist" 2>/dev/null  # workers left by a timed-out run would hold the GPU
  rcs+=("$name rc=$rc $((SECONDS - t0))s")
  tail -n 15 "$log"
  [ "$rc" -eq 0 ] || failed=1
  return $rc
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{ echo "commit $commit"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "CXX=${CXX:-} CC=${CC:-}"
  amx=$(grep -m1 -ow amx_bf16 /proc/cpuinfo)
  echo "host CPU: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2-), $(nproc) cores, AMX: ${amx:-no}"; } \
  > "$OUT/build.log" 2>&1
cat "$OUT/build.log"

if step build 300 "$OUT/build.log" "$PY" setup.py build_ext --inplace; then
  compiler=$(grep -o "C++ compiler [^:]*" "$OUT/build.log" | tail -n 1 | cut -d' ' -f3)
  {
    "$PY" tools/toolchain.py
    so=$(ls rnnext/_C*.so | head -n 1)
    echo "libstdc++ code defined inside $so (a private copy of the stream code crashed once):"
    nm -DC --defined-only "$so" 2>/dev/null | grep -E " (W|T) std::" | grep -E "basic_ostream|_M_insert|locale" | head -n 20
  } > "$OUT/smoke.log" 2>&1
  step smoke 120 "$OUT/smoke.log" "$PY" tools/smoke.py
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" --timeout 240 -o timeout_method=thread -ra)
  step tests 300 "$OUT/tests.log" "${PYTEST[@]}" tests
  # the persistent kernels have never run: benchmark them only if their tests passed (a hang costs minutes)
  persistent=()
  step tests_persistent 200 "$OUT/tests.log" env RNNEXT_CUDA_PATH=persistent "${PYTEST[@]}" -k "cuda or CUDA" tests \
    || persistent=(--no-persistent)
  # fp32: every cell (the layer-normalised ones and zoneout against Python loops too); 16-bit: vs torch.nn
  for dtype in float32 bfloat16 float16; do
    cells=lstm,gru,rnn limit=120
    [ "$dtype" = float32 ] && cells=lstm,gru,rnn,lnlstm,lngru,zlstm limit=200
    step "bench_$dtype" "$limit" "$OUT/bench.log" "$PY" benchmarks/bench.py --device cuda --dtype "$dtype" --quick \
      --no-reference --cells "$cells" "${persistent[@]}" --out "$BENCH"
    cp "$BENCH/cuda-$dtype.md" "$OUT/" 2>/dev/null
  done
  if grep -qw amx_bf16 /proc/cpuinfo; then  # which path the CPU's bf16 GEMMs took, then the benchmark, into bench.log
    step cpu_path 60 "$OUT/bench.log" "$PY" -c \
      "import torch, rnnext; print('cpu_gemm_path(bfloat16):', torch.ops.rnnext.cpu_gemm_path(torch.bfloat16))"
    step bench_cpu_bfloat16 150 "$OUT/bench.log" "$PY" benchmarks/bench.py --device cpu --dtype bfloat16 --quick \
      --no-reference --no-memory --cells lstm,gru,rnn --out "$BENCH"
    cat "$BENCH/cpu-bfloat16.md" >> "$OUT/bench.log" 2>/dev/null
  fi
fi

# Totals over both test runs (pytest's last line of each). pytest-xdist reports a worker killed by a
# signal as "worker 'gwN' crashed while running 'test'".
total() { grep -E " in [0-9.]+s" "$OUT/tests.log" 2>/dev/null | grep -Eo "[0-9]+ $1" | awk '{s+=$1} END {print s+0}'; }
passed=$(total passed)
nfailed=$(total failed)
crashed=$(grep -o "crashed while running '[^']*'" "$OUT/tests.log" 2>/dev/null | sort -u | wc -l)
smoke=$(grep -Eo "smoke [a-z]+: [A-Za-z]+( \([A-Z]+\))?" "$OUT/smoke.log" 2>/dev/null | tr '\n' ' ')
{
  echo; echo "== gpu_check summary =="
  head -n 4 "$OUT/build.log"
  grep "^host CPU" "$OUT/build.log"
  grep -h "^cpu_gemm_path(bfloat16):" "$OUT/bench.log" 2>/dev/null
  printf '%s\n' "${rcs[@]}"
  grep -E "(passed|failed).* in [0-9.]+s" "$OUT/tests.log" 2>/dev/null
  grep -o "crashed while running '[^']*'" "$OUT/tests.log" 2>/dev/null | sort -u
  grep -h "geometric-mean\|peak memory" "$OUT"/cuda-*.md 2>/dev/null
  [ -f "$BENCH/cpu-bfloat16.md" ] && grep -h "geometric-mean" "$BENCH/cpu-bfloat16.md" | sed 's/^/cpu bf16: /'
  echo "gpu_check: passed=${passed:-0} failed=${nfailed:-0} crashed=${crashed:-0} ${smoke}compiler=${compiler:-none} commit=$commit"
} | tee "$OUT/summary.txt"
exit $failed
