# Sourced by the device-session scripts (gpu_session.sh, gpu_probe_session.sh): installs the carried
# wheels (.whl/, see gpu_session.sh's header) into /tmp/site, makes dqp importable without installing
# (solvers/ and linsolve/ are the packages dqp.solvers / dqp.linsolve) and sets OUT, REPO, PYTHONPATH.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing in .whl/ (see the header of experiments/gpu_session.sh)"; exit 1; }
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/dqp && cp -r dqp/* /tmp/pkg/dqp/ && cp -r solvers /tmp/pkg/dqp/solvers \
    && cp -r linsolve /tmp/pkg/dqp/linsolve
export PYTHONPATH=/tmp/pkg:/tmp/site:$REPO/experiments PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
