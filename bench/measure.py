"""What a server costs: CPU seconds of all its processes, and their peak memory (PSS).

CPU comes from a cgroup made for the server (cgroup v2 `cpu.stat`, or v1 `cpuacct.usage`):
a cgroup counts every process started in it, including the ones that have exited and been
reaped (tftp-hpa's per-transfer children, inetd's per-request servers). Where no cgroup
can be made, the fallback sums /proc/PID/stat utime+stime+cutime+cstime over the server's
process tree: reaped children count through their parent's cutime/cstime; a process that
double-forks and exits is then missed, which the report says.

Memory: the sum of Pss over the group's processes from /proc/PID/smaps_rollup, sampled by
a thread while the storm runs; the peak sample is reported.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_TICK = os.sysconf("SC_CLK_TCK")


def _v2_root() -> Path | None:
    for cand in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (cand / "cgroup.procs").exists() and (cand / "cgroup.controllers").exists():
            return cand
    return None


def _v1_cpuacct() -> Path | None:
    for cand in (CGROUP_ROOT / "cpuacct", CGROUP_ROOT / "cpu,cpuacct"):
        if (cand / "cpuacct.usage").exists():
            return cand
    return None


class ProcessGroup:
    """The set of processes one server runs as, and their CPU time.

    Call `adopt_self()` in the child before exec (a Popen preexec_fn): the server and all
    it forks then land in the group.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path: Path | None = None
        self.kind = "proc"
        self.root_pid: int | None = None
        root = _v2_root()
        if root is not None:
            p = root / name
            try:
                p.mkdir(exist_ok=True)
                if (p / "cpu.stat").exists():
                    self.path, self.kind = p, "cgroup2"
                else:
                    p.rmdir()
            except OSError:
                pass
        if self.path is None:
            root = _v1_cpuacct()
            if root is not None:
                p = root / name
                try:
                    p.mkdir(exist_ok=True)
                    self.path, self.kind = p, "cgroup1-cpuacct"
                except OSError:
                    pass

    def adopt_self(self) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        if self.path is not None:
            try:
                text = (self.path / "cgroup.procs").read_text()
            except OSError:
                return []
            return [int(x) for x in text.split()]
        if self.root_pid is None:
            return []
        return _tree(self.root_pid)

    def _cpu_stat(self, key: str) -> float | None:
        """A cgroup v2 `cpu.stat` figure, in seconds."""
        assert self.path is not None
        for line in (self.path / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v) / 1e6
        return None

    def cpu_seconds(self) -> float:
        """CPU (user + system) used so far by every process that ever ran in the group."""
        if self.kind == "cgroup2":
            return self._cpu_stat("usage_usec") or 0.0
        if self.kind == "cgroup1-cpuacct":
            assert self.path is not None
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        total = 0.0
        for pid in self.pids():
            total += _proc_cpu(pid, children=True)
        return total

    def system_seconds(self) -> float | None:
        """Kernel-mode CPU of the group so far (cgroup v2 only; None elsewhere)."""
        if self.kind != "cgroup2":
            return None
        return self._cpu_stat("system_usec")

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)


def _proc_cpu(pid: int, children: bool) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state): utime is field 14, cutime 16.
    ut, st, cut, cst = (int(fields[i]) for i in (11, 12, 13, 14))
    return (ut + st + ((cut + cst) if children else 0)) / _TICK


def _tree(root: int) -> list[int]:
    """root and its descendants (by /proc/*/stat ppid)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples the summed PSS of a ProcessGroup in a thread; `peak` is the largest sum."""

    def __init__(self, group: ProcessGroup, interval_s: float = 0.2) -> None:
        self.group = group
        self.interval_s = interval_s
        self.peak = 0
        self.peak_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def sample(self) -> int:
        pids = self.group.pids()
        total = sum(pss_bytes(p) for p in pids)
        self.samples += 1
        if total > self.peak:
            self.peak = total
        self.peak_procs = max(self.peak_procs, len(pids))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            # never spend more than a quarter of the time sampling (1000 processes)
            spent = time.monotonic() - started
            self._stop.wait(max(self.interval_s, 3 * spent))

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return self.peak


def host_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds so far (all CPUs) from /proc/stat: busy, idle, steal."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    f += [0] * (8 - len(f))
    user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
    return {"busy": (user + nice + system + irq + softirq) / _TICK,
            "idle": (idle + iowait) / _TICK, "steal": steal / _TICK}


def cleanup_stale_groups(prefix: str = "tftpbench-") -> list[str]:
    """Remove empty cgroups named `tftpbench-<pid>-…` whose making process is gone."""
    removed = []
    roots = [r for r in (_v2_root(), _v1_cpuacct()) if r is not None]
    for root in roots:
        for p in root.glob(prefix + "*"):
            parts = p.name.split("-")
            if len(parts) < 3 or not parts[1].isdigit() or os.path.exists(f"/proc/{parts[1]}"):
                continue
            try:
                p.rmdir()
                removed.append(str(p))
            except OSError:
                pass
    return removed
