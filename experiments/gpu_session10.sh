#!/usr/bin/env bash
# Session 10, first device call: where the time around the fused kernel goes at B=1024, n=m=100
# (tail_probe: setup/backward graph variants; gpu_timeline: kernels per dqp:: range).
source "$(dirname "$0")/gpu_env.sh"
timeout ${TAIL_S:-200} python3 experiments/tail_probe.py --cells ${CELLS:-1024x100,128x100} --reps 15 \
    --out "$OUT/tail_probe.md" 2>&1 | grep -v USDT | grep -v "^$" | head -120
[ "${TIMELINE_S:-150}" != 0 ] && timeout ${TIMELINE_S:-150} python3 experiments/gpu_timeline.py --cells 1024x100 --reps 7 \
    --out "$OUT/timeline.md" 2>&1 | grep -v USDT | head -5
