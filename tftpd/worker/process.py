"""What a worker process needs of its host: signals and a wakeup pipe, its parent,
interface MTUs."""

from __future__ import annotations

import ctypes
import os
import signal
import socket

MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                  signal.SIGHUP, signal.SIGUSR1}

# Everything a worker may load later is loaded now, at import: after chroot (-s)
# neither modules nor shared libraries can be found. dlopen(NULL) needs no file.
_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_NET: list[int] = []  # a descriptor of /sys/class/net, opened before any chroot


class WakeupPipe:
    """A pipe that wakes a selector: from a signal handler (signal.set_wakeup_fd(w)) or
    from another thread (wake()). Each wake is one byte; drain() empties it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except OSError:  # BlockingIOError: full, so a wakeup is on its way already
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def die_with_parent() -> None:
    """A worker whose master is killed (SIGKILL, OOM) drains and exits too, instead of
    serving on as an orphan nobody supervises."""
    try:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except AttributeError:
        return
    if os.getppid() == 1:  # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def open_sysfs() -> None:
    """Keep /sys/class/net reachable after chroot (the master calls this first)."""
    if not _SYS_NET:
        try:
            _SYS_NET.append(os.open("/sys/class/net", os.O_RDONLY | os.O_DIRECTORY
                                    | os.O_CLOEXEC))
        except OSError:
            pass


class MtuCache:
    """Interface MTUs by index, from /sys/class/net (the kernel's own figure, as
    netlink reports it; pyroute2 would cost each worker ~20 MB and 0.25 s to load).
    Re-read every REFRESH seconds, so a changed MTU is noticed."""

    REFRESH = 10.0

    def __init__(self) -> None:
        self._known: dict[int, tuple[float, int | None]] = {}

    def get(self, ifindex: int, now: float) -> int | None:
        hit = self._known.get(ifindex)
        if hit is not None and hit[0] > now:
            return hit[1]
        mtu: int | None = None
        try:
            name = socket.if_indextoname(ifindex)
            if _SYS_NET:
                fd = os.open(f"{name}/mtu", os.O_RDONLY | os.O_CLOEXEC, dir_fd=_SYS_NET[0])
                try:
                    mtu = int(os.read(fd, 32))
                finally:
                    os.close(fd)
            else:
                with open(f"/sys/class/net/{name}/mtu", "rb") as f:
                    mtu = int(f.read())
        except (OSError, ValueError):
            mtu = None
        self._known[ifindex] = (now + self.REFRESH, mtu)
        return mtu


def blksize_for_mtu(mtu: int | None, family: int) -> int | None:
    """The largest blksize whose DATA datagram fits one packet (IP + UDP + 4)."""
    if mtu is None:
        return None
    overhead = 48 if family == socket.AF_INET6 else 28
    return mtu - overhead - 4
