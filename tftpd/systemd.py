"""systemd socket activation and notification, without libsystemd.

Both are small protocols: LISTEN_PID/LISTEN_FDS name descriptors 3.. that the
service inherits (sd_listen_fds(3)); NOTIFY_SOCKET names a datagram socket that
takes "READY=1"-style lines (sd_notify(3)).
"""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed us (LISTEN_FDS), or [] when not socket-activated."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    if unset:
        # Children (our workers) must not take these for their own.
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        out.append(socket.socket(fileno=fd))
    return out


def inetd_socket() -> socket.socket | None:
    """The UDP socket inetd hands us on standard input in `wait` mode, if any."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return None
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        return None
    os.set_inheritable(sock.fileno(), False)
    # inetd hands the socket as standard input, output and error alike: all three
    # become /dev/null (a print would otherwise be a datagram with no address), and
    # the socket lives on in our own descriptor.
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    return sock


class Notifier:
    """sd_notify(): a no-op unless NOTIFY_SOCKET is set."""

    def __init__(self) -> None:
        path = os.environ.pop("NOTIFY_SOCKET", "")
        self.addr: str | bytes | None = None
        if path.startswith("@"):
            self.addr = b"\0" + path[1:].encode()  # an abstract socket
        elif path.startswith("/"):
            self.addr = path
        self.sock: socket.socket | None = None
        if self.addr is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, *lines: str) -> None:
        if self.sock is None or self.addr is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.addr)
        except OSError:
            pass  # the manager went away; nothing to tell

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")
