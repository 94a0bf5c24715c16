#!/usr/bin/env bash
# Nsight Compute on one fused-IPM launch (B=128, n=m=100): stall reasons per source line.
# Through the device tool with `.whl` carried: bash experiments/ncu_session.sh
# Results in $OUT: details.txt (sections), source.csv (per-instruction metrics, CUDA+SASS).
source "$(dirname "$0")/gpu_env.sh"
timeout ${NCU_S:-300} ncu --clock-control none -k regex:dqp_ipm_dual -s 1 -c 1 --set full --import-source yes \
    -o "$OUT/k" -f python3 experiments/fused_ncu.py ${NCU_B:-128} ${NCU_N:-100} 2>&1 | grep -v USDT | tail -5
ncu --import "$OUT/k.ncu-rep" --page details > "$OUT/details.txt" 2>&1
ncu --import "$OUT/k.ncu-rep" --page source --csv --print-source cuda,sass > "$OUT/source.csv" 2>"$OUT/source.err" \
    || ncu --import "$OUT/k.ncu-rep" --page source --csv > "$OUT/source.csv" 2>>"$OUT/source.err"
ls -la "$OUT"; head -c 600 "$OUT/source.err"
grep -A40 "Warp State Statistics" "$OUT/details.txt" | head -60
