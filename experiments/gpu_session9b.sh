#!/usr/bin/env bash
# Session 9's second device call: dqp_chol_block with the register-tile inverse (tri_inverse_lower):
# the CUDA tests of the blocked path and the kernel (failures listed), the kernels' device times,
# and the B=128, n=m=500 cell against the library's diagonal blocks, qpth and qpax.
source "$(dirname "$0")/gpu_env.sh"
(cd /tmp && timeout 170 python3 -m pytest -q -rf -p no:cacheprovider --timeout=100 -m cuda \
    "$REPO/tests/test_blocked.py" "$REPO/tests/test_fused.py" "$REPO/tests/test_ipm.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -8)
timeout 90 python3 experiments/gpu_kernels.py --blocked 64,128 --libs default --dtypes float64 \
    --shapes 128x100,128x200,128x500,1024x500 --inner 10 --reps 5 --out "$OUT/gpu_blocked_session9b.md" \
    2>&1 | grep -v USDT | grep "kernel diagonal\|chol_block\|cholesky_ex\|^| op"
timeout 170 python3 experiments/bench_qpth.py --device cuda --dtypes float64 --sizes 500 --batches 128 \
    --methods dqp,dqp_libdiag,qpth,qpax --reps 9 --budget 14 --deadline 160 --out "$OUT" --tag cuda_n500b --no-plot \
    2>&1 | grep -v USDT | tail -6
