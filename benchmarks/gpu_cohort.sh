#!/usr/bin/env bash
# The GPU check of issue 14 (client cohorts), prepared to run in one call of the `device`
# tool (its machines have torch, Triton, pytest, pytest-xdist, numpy and pyyaml; Flower,
# Ray and scikit-learn are not needed):
#
#   bash benchmarks/gpu_cohort.sh        # from the repo root; OUT=folder for the results
#
# 1. the stacked optimizer kernel tests and the cohort optimizer tests with their tensors
#    on the GPU and the Triton kernels compiled (BONSAI_TEST_DEVICE=cuda,
#    TRITON_INTERPRET=0): stacked kernel vs the single-client kernel row by row
#    (bitwise), vs the reference (SGD_ULPS / 1e-5), CohortSGD/CohortAdamW rows vs
#    MaskedSGD/MaskedAdamW (bitwise); plus the single-client kernel tests, whose kernels
#    now share their per-entry code with the stacked ones;
# 2. benchmarks/cohort.py --device cuda: clients per second of the cohort trainer for
#    cnn and resnet8 (3x32x32, 32 examples per client, batch 16) at cohort sizes 1, 8,
#    64, 256, vectorised vs one client at a time (torch's SGD + mask, and our fused
#    MaskedSGD), with the largest state difference between the paths, as JSON.
# Writes $OUT/gpu-cohort-tests.log, $OUT/cohort-cuda.{log,json}; copy the JSON to
# benchmarks/results/ (each record names the card). About 3-6 minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/bonsai-gpu-cohort}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 BONSAI_TEST_DEVICE=cuda
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name())" || exit 1
extra=()
python3 -c "import xdist" 2>/dev/null && extra+=(-n "${TEST_WORKERS:-8}")
python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)
echo "gpu_cohort: tests start $(date +%T)"
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider "${extra[@]}" \
  tests/test_kernels_cohort.py tests/test_cohort_optim.py tests/test_kernels_optim.py \
  2>&1 | tee "$OUT/gpu-cohort-tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_cohort: benchmark start $(date +%T)"
timeout "${BENCH_SECONDS:-300}" python3 benchmarks/cohort.py --device cuda \
  --models cnn resnet8 --cohorts 1 8 64 256 --examples 32 --repeats 3 \
  --out "$OUT/cohort-cuda.json" 2>&1 | tee "$OUT/cohort-cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_cohort: tests exit $tests_rc, benchmark exit $bench_rc, end $(date +%T)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
