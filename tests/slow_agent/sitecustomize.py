"""Put on PYTHONPATH by tests/test_local_ray.py: the first Ray dashboard agent started with
this on its path sleeps past the raylet's fixed 15 s wait for it (as an agent importing
slowly on a busy machine does), so that Ray's first local start fails; later agents (a
marker file, SLOW_AGENT_MARKER, says one already slept) start normally."""

import os
import time

_marker = os.environ.get("SLOW_AGENT_MARKER")
try:
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = _f.read().split(b"\0")
except OSError:
    _argv = []
if _marker and any(a.endswith(b"dashboard/agent.py") for a in _argv):
    try:
        fd = os.open(_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        time.sleep(float(os.environ.get("SLOW_AGENT_SECONDS", "25")))
