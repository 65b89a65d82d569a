"""Network namespaces for the benchmark: loopback only, named `tftpbench-<pid>-<tag>`.

Made and removed with iproute2 (`ip netns`), entered with setns(2). A namespace's name
carries the pid of the process that made it, so a later run removes the ones whose maker
is gone (a crash, a kill -9) and never touches those of a run still going.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "tftpbench-"
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"^tftpbench-(\d+)-[A-Za-z0-9_.-]+$")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True, input_text: str | None = None) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, input=input_text,
                          check=False, timeout=20)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "iproute2 (`ip`) is not installed"
    return None


def list_ours() -> list[str]:
    out = _ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines()
            if line.strip().startswith(PREFIX)]


def pids_in(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_all_in(name: str, grace_s: float = 2.0) -> None:
    """End every process inside namespace `name` (all of them were started by us there):
    SIGTERM, then SIGKILL after `grace_s`."""
    pids = pids_in(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace_s
    while pids and time.monotonic() < end:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if pids:
            time.sleep(0.05)
    for pid in pids_in(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete(name: str) -> None:
    if not name.startswith(PREFIX):
        raise ValueError(f"not a benchmark namespace: {name}")
    kill_all_in(name)
    _ip("netns", "del", name, check=False)


def cleanup_stale() -> list[str]:
    """Remove benchmark namespaces whose making process is gone; return their names."""
    removed = []
    for name in list_ours():
        m = _NAME_RE.match(name)
        if m and os.path.exists(f"/proc/{m.group(1)}"):
            continue
        delete(name)
        removed.append(name)
    return removed


def create(tag: str) -> str:
    """A new namespace with `lo` up and 127.0.0.2/8 beside 127.0.0.1 (see PEERS.md)."""
    name = f"{PREFIX}{os.getpid()}-{tag}"
    if name in list_ours():
        delete(name)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", "127.0.0.2/8", "dev", "lo")
    except NetnsError:
        _ip("netns", "del", name, check=False)
        raise
    return name


def enter(name: str) -> None:
    """Move the calling thread (use in a child process) into namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns_fd(fd, name)
    finally:
        os.close(fd)


def _setns_fd(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the calling thread inside namespace `name`, then move it back. Threads and
    processes it starts meanwhile are born inside."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns_fd(orig, "back")
    finally:
        os.close(orig)


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = create(tag)
    try:
        yield name
    finally:
        delete(name)


LOSS_TABLE = "tftpbench"


def set_loss(name: str, percent: float) -> None:
    """Drop `percent`% of the UDP packets that arrive on lo in namespace `name`, at random
    (nftables numgen; this kernel has no netem). 0 removes the rule."""
    subprocess.run(["ip", "netns", "exec", name, "nft", "delete", "table", "inet",
                    LOSS_TABLE], capture_output=True, check=False, timeout=20)
    if percent <= 0:
        return
    n = int(round(percent))
    if not 0 < n < 100 or abs(n - percent) > 1e-9:
        raise ValueError("loss is a whole percentage between 1 and 99")
    rules = (
        f"table inet {LOSS_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f'    iif "lo" meta l4proto udp numgen random mod 100 < {n} counter drop\n'
        "  }\n"
        "}\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=rules,
                          capture_output=True, text=True, check=False, timeout=20)
    if proc.returncode != 0:
        raise NetnsError(f"nft in {name}: {proc.stderr.strip()}")


def loss_dropped(name: str) -> int | None:
    """Packets the loss rule has dropped so far, or None without a rule."""
    proc = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "table", "inet",
                           LOSS_TABLE], capture_output=True, text=True, check=False,
                          timeout=20)
    m = re.search(r"counter packets (\d+)", proc.stdout)
    return int(m.group(1)) if m else None
