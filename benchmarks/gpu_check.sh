#!/usr/bin/env bash
# The GPU check of issue 3, prepared to run in one call of the `device` tool (its
# machines have torch, Triton, pytest and hypothesis; flwr is not needed):
#
#   bash benchmarks/gpu_check.sh        # from the repo root; OUT=folder for the results
#
# 1. the kernel tests with their tensors on the GPU and the Triton kernels compiled
#    (BONSAI_TEST_DEVICE=cuda, TRITON_INTERPRET=0): each kernel against its reference;
# 2. benchmarks/kernels.py --device cuda --sweep-launch: step times, ratios, bandwidth,
#    agreement with torch.optim and the BLOCK/num_warps sweep, as JSON;
# 3. benchmarks/train_step.py --device cuda: epochs of local training, fused masked
#    optimizer against torch's optimizer plus a mask multiply, as JSON.
# Writes $OUT/gpu-tests.log, $OUT/kernels-cuda.{log,json} and $OUT/train-cuda.{log,json};
# copy the JSON to benchmarks/results/ (each record names the card).
set -uo pipefail
OUT=${OUT:-/tmp/bonsai-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 BONSAI_TEST_DEVICE=cuda
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())" || exit 1
# pytest-xdist and pytest-timeout where installed (the device image has both): the
# Triton compiles of the option grid spread over the cores; a hang costs one test
extra=()
python3 -c "import xdist" 2>/dev/null && extra+=(-n "${TEST_WORKERS:-8}")
python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
echo "gpu_check: tests start $(date +%T)"
timeout "${TEST_SECONDS:-150}" python3 -m pytest -q -p no:cacheprovider "${extra[@]}" \
  tests/test_kernels_optim.py tests/test_kernels_compress.py 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check: benchmark start $(date +%T)"
timeout "${BENCH_SECONDS:-240}" python3 benchmarks/kernels.py --device cuda --sweep-launch \
  --out "$OUT/kernels-cuda.json" 2>&1 | tee "$OUT/kernels-cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: training benchmark start $(date +%T)"
timeout "${TRAIN_SECONDS:-180}" python3 benchmarks/train_step.py --device cuda \
  --widths 16 64 128 --out "$OUT/train-cuda.json" 2>&1 | tee "$OUT/train-cuda.log"
train_rc=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_rc, kernel benchmark exit $bench_rc," \
  "training benchmark exit $train_rc, end $(date +%T)"
exit $(( tests_rc != 0 || bench_rc != 0 || train_rc != 0 ))
