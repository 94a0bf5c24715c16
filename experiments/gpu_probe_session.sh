#!/usr/bin/env bash
# One device call: the layer probe (variants of the IPM's GPU path), kernel costs, CUDA tests.
# Prepare the wheels as in experiments/gpu_session.sh, then through the device tool, `.whl` carried:
#   bash experiments/gpu_probe_session.sh
# Knobs (environment): PROBE_ARGS (gpu_probe.py options), PROBE_S; KERNELS_S (0: no kernel table),
# KERNEL_ARGS (e.g. "--blocked 32,64 --shapes 128x500"), KERNEL_LIBS; TESTS_S (0: no tests).
source "$(dirname "$0")/gpu_env.sh"

timeout ${PROBE_S:-260} python3 experiments/gpu_probe.py --device cuda --out "$OUT/probe.md" ${PROBE_ARGS:-} 2>&1 \
    | grep -v USDT | tee "$OUT/probe_log.txt" | grep -E "^\||Error|error" | head -40
if [ "${KERNELS_S:-0}" != 0 ]; then
    timeout ${KERNELS_S} python3 experiments/gpu_kernels.py --dtypes float64 --libs ${KERNEL_LIBS:-default} --reps 5 \
        ${KERNEL_ARGS:-} --out "$OUT/gpu_kernels.md" 2>&1 | tail -40
fi
[ "${TESTS_S:-200}" != 0 ] && (cd /tmp && timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider --timeout=150 -m "cuda" -x \
    "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" "$REPO/tests/test_blocked.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -8)
