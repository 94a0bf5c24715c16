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
# Results land in $OUT (default /tmp/gpu_out): cuda tests log, host_probe.txt, qpth_cuda_acc.*, qpth_cuda_f32.*
# (and n500_probe.md with N500_S=120). Next session: METHODS=dqp,dqp_1stage,qpth,qpax measures the two stages.
# (experiments/gpu_probe_session.sh: the per-phase probe of IPM variants and the kernel costs.)
source "$(dirname "$0")/gpu_env.sh"

# The defaults fit one device call (600 s, startup not counted); set a step's *_S to 0 to skip it.

# 1. CUDA tests (run from outside the repo root so that `dqp` is the copied package)
[ "${TESTS_S:-130}" != 0 ] && (cd /tmp && timeout ${TESTS_S:-130} python3 -m pytest -q -p no:cacheprovider --timeout=100 -m "cuda" \
    "$REPO/tests/test_fused.py" "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" "$REPO/tests/test_blocked.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -3)

# 1b. the fused kernel against the torch loop (agreement, times, per-phase cycles); off by default
[ "${FUSED_S:-0}" != 0 ] && timeout ${FUSED_S} python3 experiments/fused_check.py --out "$OUT" --reps 6 \
    --cells 128x100,1024x100,128x128 2>&1 | grep -v USDT | tail -9

# 1c. host vs device time of a forward+backward (and the kernel's polish), with a cProfile
[ "${HOST_S:-60}" != 0 ] && timeout ${HOST_S:-60} python3 experiments/host_probe.py --cells 128x100,1024x100 \
    --reps 30 --out "$OUT/host_probe.txt" 2>&1 | grep -v USDT | grep -A7 "^## B"

# 2. the acceptance cells, float64, against qpth and qpax in the same run (METHODS=dqp,dqp_loop,qpth,qpax
#    adds the torch loop, solve_qp_batch(fused=False); dqp_1stage: one IPM stage before the kernel's polish)
[ "${F64_S:-300}" != 0 ] && timeout ${F64_S:-300} python3 experiments/bench_qpth.py --device cuda --dtypes float64 \
    --sizes 100,500 --batches 128,1024 --methods ${METHODS:-dqp,qpth,qpax} --reps 9 --budget 14 \
    --deadline $(( ${F64_S:-300} - 10 )) --out "$OUT" --tag cuda_acc --no-plot 2>&1 | grep -v USDT | tail -9

# 2b. B=128, n=m=500: the setup, polish and backward graphed at that size or not (time, memory); off by default
[ "${N500_S:-0}" != 0 ] && timeout ${N500_S} python3 experiments/n500_probe.py --out "$OUT" 2>&1 | grep -v USDT | grep "^|"

# 3. float32 (gradient accuracy and time) on the n = m = 100, B = 128 cell
[ "${F32_S:-80}" != 0 ] && timeout ${F32_S:-80} python3 experiments/bench_qpth.py --device cuda --dtypes float32 \
    --sizes 100 --batches 128 --methods ${METHODS:-dqp,qpth,qpax} --reps 9 --budget 8 \
    --deadline $(( ${F32_S:-80} - 10 )) --out "$OUT" --tag cuda_f32 --no-plot 2>&1 | grep -v USDT | tail -5
