"""The worker's UDP sockets other than the listen sockets: one pool.

A transfer gets a socket of its own, on a port no one could guess (a new socket bound
to a random port, the kernel's choice or ours within --port-range), closed when the
transfer ends. A port is never handed on to the next client: one who learned it could
spoof that client's ACKs. With C's pump, spares are kept bound, per local address, for
the transfers C starts itself; and each listener has one error socket for the answers
that start no transfer.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from tftpd import logs
from tftpd.datapath import Pump, pktinfo_cmsg
from tftpd.worker.intake import Listener

log = logging.getLogger("tftpd")

# New sockets kept ready, per local address, for the transfers C starts (each bound to a
# random port, each used once): C starts no more than this many between two turns.
SPARE_SOCKETS = 32
MAX_LOCALS = 64  # local addresses given spares


class SocketPool:
    def __init__(self, port_range: tuple[int, int] | None, noise: logs.Throttle) -> None:
        self.port_range = port_range
        self.noise = noise
        self.pump: Pump | None = None  # set when the worker waits in C
        self._error_socks: dict[int, socket.socket] = {}
        # The local addresses transfers are served from (packed: (family, text)),
        # each kept SPARE_SOCKETS new sockets for C to start transfers from.
        self._locals: dict[bytes, tuple[int, str]] = {}
        self.spares_used = False  # since they were last topped up

    def transfer_socket(self, family: int, local: str) -> socket.socket:
        """A socket for one transfer, on a port of its own."""
        if self.pump is not None:  # C starts transfers from the same spares
            packed = socket.inet_pton(family, local)
            if packed not in self._locals and len(self._locals) < MAX_LOCALS:
                self._locals[packed] = (family, local)
            self.spares_used = True
            sock = self.pump.take_spare(packed)
            if sock is not None:
                return sock
        return self.new_socket(family, local)

    def new_socket(self, family: int, local: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            if self.port_range is None:
                sock.bind((local, 0))
            else:
                self._bind_in_range(sock, local)
        except BaseException:
            sock.close()
            raise
        return sock

    def fill_spares(self) -> None:
        """Top up the spare sockets of each local address for the transfers C may
        start before the next turn (if any were taken since the last top-up)."""
        if not self.spares_used or self.pump is None:
            return
        self.spares_used = False
        have = self.pump.spare_counts()
        for packed, (family, local) in self._locals.items():
            for _ in range(SPARE_SOCKETS - have.get(packed, 0)):
                if not self.pump.spare_room():
                    return
                try:
                    sock = self.new_socket(family, local)
                except OSError as err:  # out of descriptors or ports: serve without
                    if self.noise.allow("", time.monotonic()):
                        log.warning("spare socket: %s", err)
                    return
                self.pump.put_spare(sock, packed)

    def _bind_in_range(self, sock: socket.socket, local: str) -> None:
        assert self.port_range is not None
        lo, hi = self.port_range
        span = hi - lo + 1
        start = int.from_bytes(os.urandom(2), "big") % span
        for i in range(span):
            try:
                sock.bind((local, lo + (start + i) % span))
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no free port in --port-range")

    def error_socket(self, lst: Listener) -> socket.socket:
        """One socket per listener for answers that start no transfer.

        Errors still come from a port other than the listen port (a new TID, as
        RFC 1350 has it) without a socket per refusal: misses in a storm stay cheap.
        """
        key = id(lst)
        sock = self._error_socks.get(key)
        if sock is None:
            sock = socket.socket(lst.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
            sock.bind((lst.host, 0))
            self._error_socks[key] = sock
        return sock

    def send_error(self, lst: Listener, src: tuple, local: str, pkt: bytes) -> None:
        """An ERROR to a request's client from the listener's error socket; raises
        OSError."""
        sock = self.error_socket(lst)
        if lst.pktinfo:
            # Answer from the address the request was sent to (multi-homed hosts).
            sock.sendmsg([pkt], [pktinfo_cmsg(lst.family, local)], 0, src)
        else:
            sock.sendto(pkt, src)
