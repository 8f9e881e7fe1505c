"""Which errors of a flash_attn wheel reach Python as exceptions, and which kill the process.

Each case runs in a child process: a SIGSEGV there is reported, not suffered. Usage on a GPU machine:
    python3 gpu/probe_fa2_errors.py            # the flash_attn importable here
"""

from __future__ import annotations

import subprocess
import sys

CASE = r"""
import sys, torch
from flash_attn import flash_attn_varlen_func, flash_attn_func
kind, d = sys.argv[1], int(sys.argv[2])
dt = torch.bfloat16 if kind != "fp16" else torch.float16
t = lambda *s: torch.randn(*s, device="cuda", dtype=dt)
if kind == "dense":
    out = flash_attn_func(t(1, 32, 2, d), t(1, 32, 2, d), t(1, 32, 2, d), causal=True)
else:
    cu = torch.tensor([0, 16, 32], device="cuda", dtype=torch.int32)
    out = flash_attn_varlen_func(t(32, 2, d), t(32, 2, d), t(32, 2, d), cu, cu, 16, 16, causal=True)
torch.cuda.synchronize()
print("ok", tuple(out.shape))
"""

CASES = [("varlen", 64), ("varlen", 128), ("dense", 128), ("varlen", 264), ("fp16", 64), ("varlen", 96)]

for kind, d in CASES:
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, kind, str(d)],
                          capture_output=True, text=True, timeout=120)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    said = [line for line in tail if "Error" in line or line.startswith(("ok", "Fatal"))]
    last = said[-1] if said else (tail[-1] if tail else "")
    print(f"{kind:6} d={d:<4} rc={proc.returncode:<4} {last[:220]}")
