#!/usr/bin/env bash
# The GPU checks of the open issues, in one call of the device tool: CUDA correctness first, then timings.
#
#   device run:  bash bench/gpu_suite.sh            (results in $OUT, then copy them to bench/results/)
#   here:        bash bench/gpu_suite.sh --dry-run  (same steps on the CPU, tests collected, not run)
#
# The device machine has torch, torchvision, triton, pytest, pytest-benchmark and ninja in its image, no network
# and no DALI (its wheel is over the carry limit): the package is installed from this tree without its
# dependencies, and the DALI tests skip themselves.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PY:-python3}
dry_run=${1:-}

if ! $PY -m pip install --quiet --no-deps --no-build-isolation -e . ; then
  # An image whose setuptools is too old for pyproject.toml: lay the package out by hand (this is a copy).
  ln -sfn ../kernels fastpretrain/kernels && ln -sfn ../csrc fastpretrain/csrc
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF' | tee "$OUT/gpu-env.txt"
import torch, torchvision, triton
print("torch", torch.__version__, "torchvision", torchvision.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

status=0
if [ "$dry_run" = "--dry-run" ]; then
  TRITON_INTERPRET=1 $PY -m pytest tests/test_loss.py tests/test_loss_triton.py tests/test_data_loaders.py \
    tests/test_data_decode.py tests/test_data_jpeg.py bench/test_bench_loss.py \
    "bench/test_bench_data.py::test_gpu_loader_images_per_second" --collect-only -q | tail -n 1 || status=1
  exit $status
fi

# 1. Correctness on CUDA: the loss backends (Triton on CUDA tensors), the loaders' GPU decode path.
$PY -m pytest tests/test_loss.py tests/test_loss_triton.py tests/test_data_loaders.py tests/test_data_decode.py \
  tests/test_data_jpeg.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" | tail -n 5 || status=1
# 2. Timings: fused loss vs eager / torch.compile / copy bandwidth; the loader decoding on the GPU (torchvision's
#    nvJPEG; DALI where installed) vs the ImageFolder baseline and nvJPEG's decode-only rate, batches of 256.
# The data benchmark's GPU case only: its CPU cases are this project's 2-core measurements.
$PY -m pytest bench/test_bench_loss.py "bench/test_bench_data.py::test_gpu_loader_images_per_second" --benchmark-only \
  -q -s -p no:cacheprovider --benchmark-json="$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.txt" | tail -n 5 || status=1
exit $status
