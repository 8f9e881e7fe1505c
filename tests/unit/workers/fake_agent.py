"""A stand-in for torchrun that does everything wrong: its two "ranks" run in their own sessions (as
torchrun's do), and it ignores SIGTERM, so nothing but a sweep from outside can end them.

    python fake_agent.py PIDS_FILE

Writes "agent_pid rank0_pid rank1_pid" to PIDS_FILE once everything runs. No torch: the launcher
tests that use it cost a fraction of a second per process instead of a torch import.
"""

import signal
import subprocess
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
ranks = [
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    for _ in range(2)
]
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(" ".join(str(p) for p in [subprocess.os.getpid(), *(r.pid for r in ranks)]))
subprocess.os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
