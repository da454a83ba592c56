"""``copyengine bench --busy K``: K CPU-bound processes beside the bench for the whole run,
so that anyone can see what a busy host does to each configuration (the series' reviewers
asked that threaded copy never be slower than one thread on a busy system).

The load is K child processes of this Python spinning in a loop; they are started before
the first measurement, and always killed at the end (normal exit, error, Ctrl-C), with a
bounded wait. Each checks its parent every second and exits if it has gone, so that not
even a SIGKILL of the bench leaves one behind."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

_SPIN = """
import os, time
parent = {parent}
t = time.monotonic()
while True:
    for _ in range(200000):
        pass
    if time.monotonic() - t > 1.0:
        t = time.monotonic()
        if os.getppid() != parent:
            break
"""


@contextmanager
def busy(k: int):
    """Run the block with ``k`` CPU-bound processes beside it. Yields their pids."""
    if k < 0:
        raise ValueError(f"--busy must be 0 or more, not {k}")
    procs = []
    try:
        for _ in range(k):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN.format(parent=os.getpid())],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
