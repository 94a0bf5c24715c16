#!/usr/bin/env bash
# Session 11, device calls: the CUDA tests, then tail_probe's variants (the kernel's first-stage
# tolerance, the outer products) at the acceptance cells; optionally the acceptance benchmark with
# the stage variants against qpth and qpax (BENCH_S > 0).
source "$(dirname "$0")/gpu_env.sh"
[ "${TESTS_S:-150}" != 0 ] && (cd /tmp && timeout ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider --timeout=100 -m "cuda" \
    "$REPO/tests/test_fused.py" "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" "$REPO/tests/test_blocked.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -3)
[ "${TAIL_S:-200}" != 0 ] && timeout ${TAIL_S:-200} python3 experiments/tail_probe.py --cells ${CELLS:-1024x100,128x100,128x500} --reps 15 \
    --variants ${VARIANTS:-base,stage1e-4,stage1e-3,outer-mul,factor-always,factor-never,solve-never} \
    --out "$OUT/tail_probe.md" 2>&1 | grep -E "^## |^\| (base|stage|outer|factor|bwd|setup)|Error|error"
[ "${BENCH_S:-0}" != 0 ] && timeout ${BENCH_S} python3 experiments/bench_qpth.py --device cuda --dtypes float64 \
    --sizes 100,500 --batches 128,1024 --methods ${METHODS:-dqp,dqp_stage4,dqp_stage3,qpth,qpax} --reps 9 --budget 14 \
    --deadline $(( ${BENCH_S} - 10 )) --out "$OUT" --tag cuda_acc --no-plot 2>&1 | grep -v USDT | tail -12
true
