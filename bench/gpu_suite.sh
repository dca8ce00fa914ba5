#!/usr/bin/env bash
# The GPU checks of the open issues in one call of the device tool, within about 8 minutes of one H200: a preflight,
# the CUDA tests (first, --maxfail), the C++ tests where the extension builds, then bench/test_bench_gpu.py's
# measurements, each against its baseline in the same call, into $OUT/YYYY-MM-DD-<gpu>.json (bench/summarize.py)
# and a table printed last.
#
#   on the GPU machine:  bash bench/gpu_suite.sh 2>&1 | tee $OUT/suite.txt
#                        results in $OUT (default bench/results/, committed on purpose when a GPU run made them)
#   here (CI):           bash bench/gpu_suite.sh --dry-run
#                        every step on this CPU, one tiny case each ($OUT: a temporary folder unless set)
#
# The GPU machine has torch, torchvision, triton, pytest, pytest-benchmark and ninja, and no network, DALI or WordNet:
# the package is installed from this tree without its dependencies (pip install -e . --no-index; where pip cannot,
# e.g. a setuptools older than pyproject.toml asks for, it is put on PYTHONPATH from a folder of links outside the
# tree), the DALI tests skip themselves, and the benchmarks' corpus is written without WordNet. The C++ extensions
# build in the background while the CUDA tests run. FASTPRETRAIN_GPU_BUDGET_S (460) bounds the whole suite: the
# tests are stopped at a third of it, and the benchmarks leave out, saying so, what would end past it. The suite
# fails if a step failed or if it left untracked files. Its files in $OUT (the device tool brings back 8 at most):
# preflight.txt (install, preflight, builds), gpu-tests.txt, gpu-bench.txt, gpu-bench.json and the results file.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PY:-}" ]; then PY=python3; [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python; fi
case "${1:-run}" in
  run) dry=0 ;;
  --dry-run) dry=1 ;;
  *) echo "usage: bash bench/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
started=$(date +%s)
budget=${FASTPRETRAIN_GPU_BUDGET_S:-460}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "${OUT:-}" ]; then
  if [ $dry = 1 ]; then OUT=$(mktemp -d); else OUT=bench/results; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
out_in_tree=${OUT#"$ROOT"/}; [ "$out_in_tree" = "$OUT" ] && out_in_tree=/  # a path no status line holds
untracked() { git status --porcelain --untracked-files=all 2>/dev/null | grep '^??' | grep -vF "?? $out_in_tree/" | sort; }
untracked_before=$(untracked)
had_egg_info=0; [ -e fastpretrain.egg-info ] && had_egg_info=1
# The tests that need the C++ loss extension, by name (tests/test_loss.py marks them with no marker).
CPP_TESTS="cpp or registered_backend_agrees or extension_is_built_once"
declare -A took rc
step() {  # step NAME COMMAND...: run it, keep its status and seconds
  local name=$1 t0; shift
  t0=$(date +%s)
  "$@"; rc[$name]=$?
  took[$name]=$(( $(date +%s) - t0 ))
}
pytest_in() {  # pytest_in SECONDS ARGS...: pytest, stopped (its summary printed) at SECONDS; a dry run only collects
  local seconds=$1; shift
  if [ $dry = 1 ]; then  # CI has just run these tests: check that the selection collects
    "$PY" -m pytest "$@" -q -p no:cacheprovider --collect-only | tail -n 1
    return "${PIPESTATUS[0]}"
  fi
  timeout -s INT -k 20 "$seconds" "$PY" -m pytest "$@" -q -p no:cacheprovider --maxfail=10
}

install_package() {
  # --no-build-isolation: setuptools from the image, no index to fetch it from. Already importable from this tree
  # (an editable install: this machine's .venv), it is left as it is; a dry run checks pip's command (--dry-run).
  local flags=(--no-index --disable-pip-version-check --no-deps --no-build-isolation --quiet -e .)
  if [ $dry = 1 ]; then
    "$PY" -m pip install "${flags[@]}" --dry-run || echo "install: pip would fail here"
  fi
  if installed; then
    echo "install: fastpretrain already installed from this tree"
    return 0
  fi
  if [ $dry = 0 ] && "$PY" -m pip install "${flags[@]}"; then
    echo "install: pip install -e . (no index)"
    return 0
  fi
  # The package as pyproject.toml installs it (kernels/ and csrc/ under it), as links from outside the tree.
  mkdir "$tmp/site" "$tmp/site/fastpretrain"
  for entry in fastpretrain/*; do ln -s "$ROOT/$entry" "$tmp/site/fastpretrain/"; done
  ln -s "$ROOT/kernels" "$tmp/site/fastpretrain/kernels"
  ln -s "$ROOT/csrc" "$tmp/site/fastpretrain/csrc"
  # PYTHONSAFEPATH (Python 3.11+): the tree's own fastpretrain/, first on sys.path from this folder, would win.
  export PYTHONPATH=$tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
  echo "install: fastpretrain from links in $tmp/site"
  installed
}

installed() {  # fastpretrain with its kernels/ (pyproject.toml maps them under it) importable from here
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fastpretrain.kernels') is None)" 2>/dev/null
}

preflight() {
  echo "== preflight $(date -u +%FT%TZ), $(uname -m), $(nproc) cores"
  if command -v g++ >/dev/null; then echo "g++: $(g++ --version | head -n 1)"; else echo "g++: missing (no C++ extensions)"; fi
  "$PY" - <<'EOF'
import os, sysconfig
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"Python.h: {header} {'found' if os.path.exists(header) else 'MISSING (no C++ extensions)'}")
EOF
  if echo '#include <jpeglib.h>' | g++ -E -x c++ - >/dev/null 2>&1; then echo "jpeglib.h: found"
  else echo "jpeglib.h: missing (no region decode: the CPU workers decode whole pictures)"; fi
  echo "/dev/shm: $(df -h /dev/shm 2>/dev/null | tail -n 1 | awk '{print $4 " free of " $2}')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,temperature.gpu,power.draw \
      || nvidia-smi -q -d CLOCK
  else
    echo "nvidia-smi: missing"
  fi
  "$PY" - <<'EOF'
import platform, torch, torchvision, triton
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}, "
      f"device {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA)'}")
EOF
}

declare -A builds
start_builds() {  # each C++ extension on its own (one can fail alone), in the background
  local kind
  for kind in xent jpeg; do
    timeout 240 "$PY" -c "from fastpretrain.cpp_extension import load_extension; load_extension('$kind')" \
      >"$tmp/build-$kind.txt" 2>&1 &
    builds[$kind]=$!
  done
}

finish_builds() {  # their outcome, into preflight.txt; xent_built for the C++ tests
  local kind status
  for kind in xent jpeg; do
    wait "${builds[$kind]}"; status=$?
    { echo "== C++ extension $kind: $([ $status = 0 ] && echo built || echo "cannot be built (exit $status)")"
      cat "$tmp/build-$kind.txt"; } >>"$OUT/preflight.txt"
    echo "C++ extension $kind: $([ $status = 0 ] && echo built || echo "cannot be built: $(tail -n 1 "$tmp/build-$kind.txt")")"
    [ "$kind" = xent ] && xent_built=$status
  done
}

cuda_tests() {
  # The files with CUDA tests, the CUDA-only ones first (test_loss.py is mostly CPU tests); the loaders' CPU tests are
  # CI's (the slow ones). The C++ tests wait for their extension (cpp_tests).
  pytest_in $(( budget / 3 )) tests/test_gpu_input.py tests/test_loss_triton.py tests/test_data_loaders.py \
    tests/test_loss.py -k "not ($CPP_TESTS) and (not test_data_loaders or cuda)" 2>&1 | tee "$OUT/gpu-tests.txt"
  return "${PIPESTATUS[0]}"
}

cpp_tests() {
  finish_builds
  if [ "$xent_built" != 0 ]; then
    echo "C++ tests left out: the extension cannot be built here (preflight.txt says why)"
    return 0
  fi
  pytest_in 60 tests/test_loss.py -k "$CPP_TESTS" 2>&1 | tee -a "$OUT/gpu-tests.txt"
  return "${PIPESTATUS[0]}"
}

benchmarks() {
  local deadline=$(( started + budget - 30 ))  # 30 s for the summary
  local left=$(( deadline - $(date +%s) ))
  FASTPRETRAIN_GPU_DEADLINE=$deadline FASTPRETRAIN_GPU_DRY_RUN=$dry PYTHONUNBUFFERED=1 \
    timeout -s INT -k 30 "$(( left > 60 ? left : 60 ))" "$PY" -m pytest bench/test_bench_gpu.py --benchmark-only -q \
    -s -p no:cacheprovider --durations=0 --benchmark-json="$OUT/gpu-bench.json" >"$OUT/gpu-bench.txt" 2>&1
  local status=$?
  if [ $status = 0 ]; then grep -E "^SKIPPED|passed" "$OUT/gpu-bench.txt" | tail -n 30
  else tail -n 60 "$OUT/gpu-bench.txt"; fi
  return $status
}

summary() {
  local results
  results=$("$PY" bench/summarize.py "$OUT/gpu-bench.json" --results "$OUT" | sed -n 's/^wrote //p')
  [ -n "$results" ] || return 1
  "$PY" - "$results" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from summarize import describe_machine, notes, text_table
body = json.loads(open(sys.argv[1]).read())
floors = {row["benchmark"]: row["floor"] for row in body["rows"] if row.get("floor") is not None}
print(f"\n== {sys.argv[1]}: {describe_machine(body['machine'])}")
print("\n".join(text_table(body["rows"], floors) + [f"{name}: {note}" for name, note in notes(body["rows"])]))
EOF
}

step install install_package >"$tmp/install.txt" 2>&1  # not in a pipeline: its PYTHONPATH is for the steps after it
tee -a "$OUT/preflight.txt" <"$tmp/install.txt"
preflight 2>&1 | tee -a "$OUT/preflight.txt"
[ $dry = 1 ] && export TRITON_INTERPRET=1
start_builds
step tests cuda_tests
step cpp_tests cpp_tests
step benchmarks benchmarks
step summary summary

[ $had_egg_info = 0 ] && rm -rf fastpretrain.egg-info  # pip's build leftover (git-ignored, and not ours to keep)
status=0
for name in install tests cpp_tests benchmarks summary; do
  echo "step $name: exit ${rc[$name]:-?} after ${took[$name]:-?} s"
  [ "${rc[$name]:-1}" = 0 ] || status=1
done
left=$(comm -13 <(echo "$untracked_before") <(untracked))
if [ -n "$left" ]; then echo "the suite left untracked files:"; echo "$left"; status=1; fi
echo "gpu_suite: $([ $dry = 1 ] && echo 'dry run ' )$([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - started )) s; results in $OUT"
exit $status
