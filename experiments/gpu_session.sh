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
# Results land in $OUT (default /tmp/gpu_out): gpu_kernels.md, cuda tests log, qpth_cuda_acc.*,
# qpth_profile_cuda.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing in .whl/ (see the header of this script)"; exit 1; }
# dqp importable without installing: solvers/ and linsolve/ are the packages dqp.solvers / dqp.linsolve
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/dqp && cp -r dqp/* /tmp/pkg/dqp/ && cp -r solvers /tmp/pkg/dqp/solvers \
    && cp -r linsolve /tmp/pkg/dqp/linsolve
export PYTHONPATH=/tmp/pkg:/tmp/site:$REPO/experiments PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

# 1. CUDA tests (run from outside the repo root so that `dqp` is the copied package)
(cd /tmp && timeout 420 python3 -m pytest -q -p no:cacheprovider --timeout=300 -m "cuda" \
    "$REPO/tests/test_ipm.py" "$REPO/tests/test_qpth.py" 2>&1 | tee "$OUT/cuda_tests.log" | tail -5)

# 2. per-kernel costs: which batched solve to use inside the IPM iteration
timeout 240 python3 experiments/gpu_kernels.py --out "$OUT/gpu_kernels.md" 2>&1 | tail -40

# 3. the acceptance cells, against qpth and qpax in the same run (float64 and float32)
timeout 600 python3 experiments/bench_qpth.py --device cuda --dtypes float64,float32 --sizes 100,500 \
    --batches 128,1024 --reps 3 --budget 20 --deadline 400 --out "$OUT" --tag cuda_acc 2>&1 | tail -30

# 4. where the time goes now
timeout 300 python3 experiments/bench_qpth.py --profile --device cuda --dtypes float64 --sizes 100,500 \
    --batches 128 --reps 3 --out "$OUT" --tag cuda 2>&1 | tail -5
