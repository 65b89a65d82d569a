"""The sockets the master opens before it forks: TFTP listeners, HTTP, metrics.

One SO_REUSEPORT socket per worker slot and address. The kernel hashes a client's
address and port to one socket, so a retransmitted RRQ lands on the worker already
serving it and is merged there, never served twice. The master keeps each slot's
sockets, so a replacement worker takes over the very socket (and the requests
queued on it) of the worker it replaces.

A socket inetd or systemd hands over without reuseport siblings is shared: every
worker reads it and passes each request on, through its slot's forward pair, to the
worker its client hashes to.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass, field

from tftpd.config import Address, Config, parse_address
from tftpd.worker import enable_pktinfo

log = logging.getLogger("tftpd")

# A storm of RRQs arrives faster than a worker turns its loop; every peer measured
# here lost requests to a full listen buffer at 500 clients. 8 MiB holds ~25,000
# queued RRQs. As root SO_RCVBUFFORCE passes net.core.rmem_max.
LISTEN_RCVBUF = 8 << 20


class StartupError(Exception):
    """The server cannot start; the message is for a person."""


Forward = tuple[socket.socket, socket.socket]  # (reader, writer) of one slot


@dataclass(slots=True)
class ListenSockets:
    """Every listening socket, opened as root before the workers are forked."""

    per_slot: list[list[socket.socket]]  # each worker slot's TFTP sockets
    bound: list[str] = field(default_factory=list)  # the TFTP addresses, for people
    shared: bool = False  # a listen socket read by every worker (not reuseport)
    forwards: list[Forward | None] = field(default_factory=list)  # per slot, if shared
    http_socks: list[socket.socket] = field(default_factory=list)  # --http, all workers'
    http_bound: list[str] = field(default_factory=list)
    metrics: socket.socket | None = None

    @classmethod
    def open(cls, cfg: Config, workers: int,
             inherited: list[socket.socket] | None = None) -> ListenSockets:
        """Bind every address, or take the sockets inetd or systemd handed us."""
        opened = cls([[] for _ in range(workers)])
        if inherited:
            for sock in inherited:
                opened._adopt(sock)
        else:
            addresses = cfg.addresses or (Address(socket.AF_INET, "0.0.0.0", 69),)
            for addr in addresses:
                port = _claim_port(addr)
                for sockets in opened.per_slot:
                    sockets.append(_listen_socket(addr, port))
                opened.bound.append(str(Address(addr.family, addr.host, port)))
        opened.forwards = [None] * workers
        if opened.shared and workers > 1:
            # A socket every worker reads: each request goes on to the worker its
            # client hashes to, so a repeated RRQ still meets its live transfer.
            opened.forwards = [_forward_pair() for _ in range(workers)]
        if cfg.metrics:
            opened.metrics = _metrics_socket(cfg.metrics)
        for addr in cfg.http:
            opened._add_http(_http_socket(addr))
        return opened

    def _add_http(self, sock: socket.socket) -> None:
        """A listening TCP socket for HTTP: every worker accepts from it."""
        self.http_socks.append(sock)
        host, port = sock.getsockname()[:2]
        self.http_bound.append(str(Address(sock.family, host, port)))

    def _adopt(self, sock: socket.socket) -> None:
        if sock.type == socket.SOCK_STREAM and sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            _require_http()
            self._add_http(sock)  # systemd's ListenStream=: served over HTTP
            return
        if sock.type != socket.SOCK_DGRAM:
            raise StartupError(f"inherited socket {sock.fileno()} is not a datagram socket")
        family, host, port = sock.family, *sock.getsockname()[:2]
        where = Address(family, host, port)
        _size_rcvbuf(sock)
        enable_pktinfo(sock)
        siblings = [sock]
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            # systemd's ReusePort=yes: one socket per worker, as when we bind.
            v6only = family == socket.AF_INET6 and bool(
                sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            try:
                siblings += [_listen_socket(where, port, v6only)
                             for _ in self.per_slot[1:]]
            except StartupError as err:
                log.warning("%s: cannot add reuseport sockets (%s); sharing one", where, err)
                for extra in siblings[1:]:
                    extra.close()
                siblings = [sock]
        if len(siblings) == len(self.per_slot):
            for sockets, s in zip(self.per_slot, siblings, strict=True):
                sockets.append(s)
        else:
            self.shared = True
            for sockets in self.per_slot:
                sockets.append(sock)
        self.bound.append(str(where))


def _forward_pair() -> Forward:
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (r, w):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    w.setblocking(False)
    return r, w


def _metrics_socket(text: str) -> socket.socket:
    addr = parse_address(text)
    sock = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(16)
    except OSError as err:
        sock.close()
        raise StartupError(f"--metrics {text}: {err.strerror}") from None
    return sock


def http_missing() -> str | None:
    """Why HTTP cannot be served here (h11 parses it; a plain Python has none), or None."""
    try:
        import tftpd.http  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def _require_http() -> None:
    """Say so at the start, not in a worker's traceback."""
    missing = http_missing()
    if missing is not None:
        raise StartupError(f"--http needs the h11 package (pip install h11): {missing}")


def _http_socket(addr: Address) -> socket.socket:
    _require_http()
    from tftpd.http import listen_socket

    try:
        return listen_socket(addr)
    except OSError as err:
        raise StartupError(f"--http {addr}: {err.strerror}") from None


def _claim_port(addr: Address) -> int:
    """Check the port is free, and pick one for port 0.

    SO_REUSEPORT would let our sockets join those of another server of the same
    user on the same port, each then getting a share of the requests. A plain bind
    first fails with EADDRINUSE if anything holds the port, reuseport or not.
    """
    probe = socket.socket(addr.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if addr.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((addr.host, addr.port))
        return probe.getsockname()[1]
    except OSError as err:
        raise _bind_error(addr, addr.port, err) from None
    finally:
        probe.close()


def _bind_error(addr: Address, port: int, err: OSError) -> StartupError:
    where = str(Address(addr.family, addr.host, port))
    if err.errno == errno.EADDRINUSE:
        return StartupError(f"{where}: address already in use (another TFTP server, "
                            "such as tftpd-hpa or inetd, may hold the port)")
    if err.errno == errno.EACCES:
        return StartupError(f"{where}: permission denied (ports below 1024 need root "
                            "or CAP_NET_BIND_SERVICE)")
    if err.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{where}: no interface has this address")
    return StartupError(f"{where}: {err.strerror}")


def _listen_socket(addr: Address, port: int, v6only: bool = True) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        _size_rcvbuf(sock)
        sock.bind((addr.host, port))
        enable_pktinfo(sock)  # every listener: destination address and interface
    except OSError as err:
        sock.close()
        raise _bind_error(addr, port, err) from None
    return sock


def _size_rcvbuf(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, LISTEN_RCVBUF)  # SO_RCVBUFFORCE
    except OSError:
        # Unprivileged: capped at net.core.rmem_max; say so once if that is small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if got < LISTEN_RCVBUF:
            log.warning("listen buffer is %d bytes (net.core.rmem_max); a storm may "
                        "overflow it: raise the sysctl or start as root", got)
