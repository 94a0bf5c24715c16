#!/usr/bin/env bash
# Session 9's device call: the blocked factorization's diagonal blocks by the fused source's kernel
# (dqp.solvers.fused.chol_block, ipm.BLOCK_DIAG) against the library's, on CUDA, in one run:
# the CUDA tests, the kernels' device times (gpu_kernels.py --blocked), the n = m = 500 cells
# (dqp vs dqp_libdiag vs qpth, qpax), and profiles of B=1024 n=100 and B=128 n=500.
source "$(dirname "$0")/gpu_env.sh"
TESTS_S=110 F64_S=0 F32_S=0 HOST_S=0 bash "$(dirname "$0")/gpu_session.sh"
timeout 120 python3 experiments/gpu_kernels.py --blocked 64,128 --libs default --dtypes float64 \
    --shapes 128x100,1024x100,128x200,128x500,1024x500 --inner 10 --reps 5 --out "$OUT/gpu_blocked_session9.md" \
    2>&1 | grep -v USDT | tail -30
timeout 200 python3 experiments/bench_qpth.py --device cuda --dtypes float64 --sizes 500 --batches 128,1024 \
    --methods dqp,dqp_libdiag,qpth,qpax --reps 9 --budget 14 --deadline 190 --out "$OUT" --tag cuda_n500 --no-plot \
    2>&1 | grep -v USDT | tail -8
timeout 100 python3 experiments/kernel_probe.py --skip occupancy,setup --profile-cells 1024x100,128x500 --top 22 \
    --out "$OUT" 2>&1 | grep -v USDT | tail -70
rm -f "$OUT"/trace_*.json
