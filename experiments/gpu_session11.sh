#!/usr/bin/env bash
# Session 11, one device call: the CUDA tests, the acceptance benchmark (float64, the stage
# variants of the kernel's first IPM tolerance against qpth and qpax in the same run), then
# tail_probe's variants at B=1024 and B=128, n=m=100. Each step's *_S is its time limit (0 skips it).
source "$(dirname "$0")/gpu_env.sh"
[ "${TESTS_S:-140}" != 0 ] && (cd /tmp && timeout ${TESTS_S:-140} python3 -m pytest -q -p no:cacheprovider --timeout=100 -m "cuda" \
    "$REPO/tests/test_fused.py" "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" "$REPO/tests/test_blocked.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -3)
[ "${BENCH_S:-220}" != 0 ] && timeout ${BENCH_S:-220} python3 experiments/bench_qpth.py --device cuda --dtypes float64 \
    --sizes 100,500 --batches 128,1024 --methods ${METHODS:-dqp,dqp_stage3,dqp_stage35,qpth,qpax} --reps 9 --budget 14 \
    --deadline $(( ${BENCH_S:-220} - 10 )) --out "$OUT" --tag cuda_acc --no-plot 2>&1 | grep -v USDT | tail -12
[ "${TAIL_S:-150}" != 0 ] && timeout ${TAIL_S:-150} python3 experiments/tail_probe.py --cells ${CELLS:-1024x100,128x100} --reps 15 \
    --variants ${VARIANTS:-base,stage1e-4,stage1e-3,stages1e-3:1e-5,stages1e-3:1e-4,solve-never,factor-always,factor-never} \
    --out "$OUT/tail_probe.md" 2>&1 | grep -E "^## |^\| (base|stage|outer|factor|bwd|setup|solve)|Error|error"
true
