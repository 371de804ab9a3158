"""CPU time and memory of every process of a system under test, grouped by role.

A system is a root process and everything under it: the baseline is one process; the Ray
forwarder is its driver plus what `ray.init()` started under it (gcs_server, raylet, the
dashboard and its agents, workers with the shard and producer actors). The sampler walks
the tree each time it samples, so processes that appear during the run are counted too.
CPU is user + system time between `mark_start()` and `mark_end()`; a process first seen
after the start counts from zero, one that died counts up to its last sample. Memory is the
peak RSS seen over all samples (sampling can miss a short spike).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

try:
    import psutil
except ImportError:  # ray[default] ships psutil inside ray/thirdparty_files
    importlib.import_module("ray")  # puts its third-party dir on sys.path
    psutil = importlib.import_module("psutil")


#: Ray worker titles (set by Ray: `ray::ShardActor.run`) -> role.
_WORKER_TITLES = (
    ("ray::ShardActor", "shard actor"),
    ("ray::ProducerActor", "producer actor"),
    ("ray::IDLE", "idle worker"),
)
#: Programs (binary name, or the tail of a Python script's path) -> role.
_PROGRAMS = (
    ("raylet", "raylet"),
    ("gcs_server", "gcs_server"),
    ("dashboard/dashboard.py", "dashboard"),
    ("dashboard/agent.py", "dashboard agent"),
    ("runtime_env/agent/main.py", "runtime env agent"),
    ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "monitor"),
    ("workers/default_worker.py", "idle worker"),
)
#: Roles looked at again on each sample (a worker becomes an actor, a title is set).
_PROVISIONAL = frozenset({"", "idle worker", "worker", "other"})


def ray_role(argv: list[str]) -> str | None:
    """The role of a process of a local Ray from its command line; None if it is not one
    of Ray's own programs (a helper, which then takes its parent's role)."""
    if not argv:
        return None
    head = argv[0].strip()
    if head.startswith("ray::"):
        for title, role in _WORKER_TITLES:
            if head.startswith(title):
                return role
        return "worker"
    if head.startswith("ray-dashboard-"):  # the dashboard's module processes
        return "dashboard"
    program = head if not head.rsplit("/", 1)[-1].startswith("python") else ""
    if not program:  # python [-u|-B ...] script.py ...: the first argument not an option
        program = next((a for a in argv[1:] if not a.startswith("-")), "")
    for tail, role in _PROGRAMS:
        if program.endswith(tail):
            return role
    return None


@dataclass
class ProcessUsage:
    pid: int
    role: str
    cmdline: str
    cpu_start: float = 0.0  # cpu seconds at mark_start (0 if it started later)
    cpu_last: float = 0.0
    cpu_end: float | None = None
    peak_rss: int = 0
    #: Proportional set size: each shared page (Ray's and Python's libraries, mapped by
    #: every Ray process) counted once over the processes that map it; 0 where unreadable.
    peak_pss: int = 0
    in_window: bool = False  # alive at some point between mark_start() and mark_end()

    @property
    def cpu_seconds(self) -> float:
        end = self.cpu_last if self.cpu_end is None else self.cpu_end
        return max(0.0, end - self.cpu_start)


#: Read PSS on every this-many-th sample (see ProcessSampler.sample).
PSS_EVERY = 5


class ProcessSampler:
    """Samples the tree under `root` (its own role is `root_role`)."""

    def __init__(self, root: int, root_role: str, *, classify=ray_role) -> None:
        self.root = root
        self._root_role = root_role
        self._classify = classify
        self._procs: dict[int, psutil.Process] = {}
        self.usage: dict[int, ProcessUsage] = {}
        self._started = False
        self._ended = False
        self._samples = 0

    def sample(self, *, pss: bool = False) -> None:
        # PSS reads /proc/PID/smaps_rollup, which walks the process's mappings under its
        # mm lock: every PSS_EVERY-th sample only (once a second at the bench's 0.2 s),
        # and at the window's start and end.
        read_pss = pss or self._samples % PSS_EVERY == 0
        self._samples += 1
        try:
            root = psutil.Process(self.root)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in tree:
            known = self._procs.get(proc.pid)
            if known is None or known.create_time() != proc.create_time():
                self._procs[proc.pid] = known = proc
            try:
                with known.oneshot():
                    if known.status() == psutil.STATUS_ZOMBIE:
                        continue  # exited, not yet reaped by its parent
                    times = known.cpu_times()
                    rss = known.memory_info().rss
                    pss_now = _pss(known) if read_pss else 0
                    argv = known.cmdline() or [known.name()]
                    parent = known.ppid()
            except psutil.Error:
                continue
            cpu = times.user + times.system
            usage = self.usage.get(proc.pid)
            if usage is None:
                usage = self.usage[proc.pid] = ProcessUsage(proc.pid, "", "")
            if usage.role in _PROVISIONAL:
                usage.role = self._role(proc.pid, argv, parent)
                usage.cmdline = " ".join(a for a in argv if a)
            if not self._ended:
                usage.cpu_last = cpu
                usage.in_window = usage.in_window or self._started
            usage.peak_rss = max(usage.peak_rss, rss)
            usage.peak_pss = max(usage.peak_pss, pss_now)

    def _role(self, pid: int, argv: list[str], parent: int) -> str:
        if pid == self.root:
            return self._root_role
        role = self._classify(argv)
        if role is None and parent in self.usage:  # a helper of its parent (forkservers)
            role = self.usage[parent].role
        return role or "other"

    def mark_start(self) -> None:
        self._started = True
        self.sample(pss=True)
        for usage in self.usage.values():
            usage.cpu_start = usage.cpu_last

    def in_window(self) -> list[ProcessUsage]:
        """The processes that took part in the measured run (not those that had already
        exited, such as the remains of a failed start)."""
        return [u for u in self.usage.values() if u.in_window]

    def mark_end(self) -> None:
        self.sample(pss=True)
        for usage in self.usage.values():
            usage.cpu_end = usage.cpu_last
        self._ended = True

    def pids(self) -> list[int]:
        return list(self._procs)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this system still alive (same pid and start time as sampled)."""
        alive = []
        for proc in self._procs.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive


def _pss(proc: psutil.Process) -> int:
    """The process's PSS in bytes (Linux `smaps_rollup`), or 0 where the platform or the
    permissions do not tell."""
    try:
        return int(getattr(proc.memory_full_info(), "pss", 0))
    except (psutil.Error, OSError):
        return 0


def terminate(procs: list[psutil.Process], grace: float = 5.0, timeout: float = 10.0) -> int:
    """Stop processes this bench started (and only those) that did not exit within
    `grace` seconds by themselves: TERM, then KILL. Returns how many had to be stopped."""
    _, procs = psutil.wait_procs(procs, timeout=grace)
    if not procs:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)
