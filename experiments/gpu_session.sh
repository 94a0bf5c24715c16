#!/usr/bin/env bash
# Everything issue 3 needs from one GPU lease, in one command (device time is scarce).
#
# Prepare on the development machine (the GPU image has torch, triton and jax, not these):
#   echo /.whl/ >> .git/info/exclude   # (.whl/ is also in .gitignore)
#   for p in qpax clarabel qpsolvers; do python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p; done
#   python3 -m pip wheel --no-deps -w .whl qpth==0.0.18      # qpth ships an sdist only
# Then, through the device tool, with `.whl` carried:
#   bash experiments/gpu_session.sh
# Results land in $OUT (default /tmp/gpu_out): cuda tests log, qpth_cuda_acc.*, qpth_cuda_f32.*.
# (experiments/gpu_probe_session.sh: the per-phase probe of IPM variants and the kernel costs.)
source "$(dirname "$0")/gpu_env.sh"

# 1. CUDA tests (run from outside the repo root so that `dqp` is the copied package)
[ "${TESTS_S:-150}" != 0 ] && (cd /tmp && timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider --timeout=120 -m "cuda" \
    "$REPO/tests/test_fused.py" "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" "$REPO/tests/test_blocked.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -3)

# 1b. the fused kernel against the torch loop (agreement, times, per-phase cycles)
[ "${FUSED_S:-90}" != 0 ] && timeout ${FUSED_S:-90} python3 experiments/fused_check.py --out "$OUT" --reps 6 \
    --cells 128x100,1024x100,128x128 2>&1 | grep -v USDT | tail -9

# 2. the acceptance cells, float64, against qpth and qpax in the same run; dqp as shipped (the fused
#    kernel where it applies) and with the torch loop (solve_qp_batch(fused=False))
timeout ${F64_S:-400} python3 experiments/bench_qpth.py --device cuda --dtypes float64 --sizes 100,500 \
    --batches 128,1024 --methods dqp,dqp_loop,qpth,qpax --reps 5 --budget 12 --deadline $(( ${F64_S:-400} - 30 )) \
    --out "$OUT" --tag cuda_acc --no-plot 2>&1 | grep -v USDT | tail -14

# 3. float32 (gradient accuracy and time) on the n = m = 100 / 500, B = 128 cells
timeout ${F32_S:-100} python3 experiments/bench_qpth.py --device cuda --dtypes float32 --sizes 100,500 \
    --batches 128 --methods dqp,dqp_loop,qpth,qpax --reps 3 --budget 8 --deadline $(( ${F32_S:-100} - 15 )) \
    --out "$OUT" --tag cuda_f32 --no-plot 2>&1 | grep -v USDT | tail -8
