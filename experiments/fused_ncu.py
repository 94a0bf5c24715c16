"""One fused-IPM launch to profile (``ncu -k dqp_ipm_dual``), and the kernel source with its defines
written out for ``nvcc -Xptxas -v``. python experiments/fused_ncu.py [B] [n] [--src FILE]"""
import sys

import torch

import dqp.solvers.fused as fm
from dqp.solvers.ipm import ipm_solve

fm.NVRTC_OPTIONS = ("-lineinfo",)          # (source lines in the profiler's source view)

if "--src" in sys.argv:
    open(sys.argv[sys.argv.index("--src") + 1], "w").write(fm._source())
    sys.exit(0)
B, n = (int(a) for a in (sys.argv[1:3] if len(sys.argv) > 2 else ("128", "100")))
sys.path.insert(0, "experiments")
from fused_check import gen  # noqa: E402

Q, p, G, h, _, _ = gen(B, n, n, seed=1)
ipm_solve(Q, p, G, h, fused=True)
torch.cuda.synchronize()
r = ipm_solve(Q, p, G, h, fused=True)
torch.cuda.synchronize()
print("iterations max", int(r.iterations.max()), "mean", float(r.iterations.double().mean()))
