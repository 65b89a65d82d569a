"""Where requests come in: the listen sockets, and requests forwarded between workers.

Requests are read in batches by the data path, which answers known misses (and, with
C's pump, starts known transfers) itself; the rest go on to the worker's request path
(Worker.serve_request), here or, for a socket every worker reads, in the worker that
owns the client (Forward).
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tftpd import packet as P
from tftpd.datapath import (
    IP_PKTINFO,
    IPV6_RECVPKTINFO,
    REQ_ANSWERED,
    REQ_BATCH,
    REQ_MERGED,
    REQ_STARTED,
    SO_TIMESTAMPNS,
)

if TYPE_CHECKING:
    from tftpd.worker.core import Worker
    from tftpd.worker.loops import Loop

log = logging.getLogger("tftpd")

LISTEN_BATCH = 256  # requests read per turn before transfers get their share


def wants_pktinfo(sock: socket.socket) -> bool:
    """A wildcard-bound socket must learn each request's destination address."""
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")


def enable_pktinfo(sock: socket.socket) -> None:
    """Each request's destination, interface and kernel arrival time."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    # The arrival time measures how long a request waited in the socket buffer: the
    # first-answer time a PXE ROM sees, not only our own part of it.
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    pktinfo: bool
    host: str  # the bound address (wildcard or not)
    shared: bool = False  # every worker reads it: requests go on to their owner
    index: int = 0  # position among the worker's listeners (same in every worker)
    family: int = 0  # sock.family, read once (the property builds an enum each time)

    def __post_init__(self) -> None:
        self.family = int(self.sock.family)


_FWD = struct.Struct("!BBHId")  # listener, family, port, ifindex, arrival (realtime)


class Forward:
    """Hands requests read from a shared listen socket to the worker that owns them.

    Without SO_REUSEPORT (inetd, systemd without ReusePort=yes) every worker reads
    the same socket, and a client's repeated RRQ could reach a worker other than the
    one serving it. The owner is a hash of the client's address and port, so every
    copy of a request meets in one worker, where a live transfer merges it.
    """

    def __init__(self, index: int, reader: socket.socket, writers: list[socket.socket]) -> None:
        self.index = index
        self.reader = reader
        self.reader.setblocking(False)
        self.writers = writers

    def owner(self, src: tuple) -> int:
        key = f"{src[0]}|{src[1]}".encode()
        return zlib.crc32(key) % len(self.writers)

    def send(self, owner: int, lst: Listener, data: bytes, src: tuple, local: str,
             ifindex: int, arrival: float) -> bool:
        fam = lst.family
        head = _FWD.pack(lst.index, fam, src[1], ifindex, arrival)
        msg = head + socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, local) + data
        try:
            self.writers[owner].send(msg)
            return True
        except OSError:
            return False  # the owner's queue is full (or it is being replaced)

    def receive(self) -> tuple[int, bytes, tuple, str, int, float] | None:
        try:
            msg = self.reader.recv(P.MAX_DATAGRAM + 64)
        except (BlockingIOError, InterruptedError):
            return None
        li, fam, port, ifindex, arrival = _FWD.unpack_from(msg)
        n = 16 if fam == socket.AF_INET6 else 4
        off = _FWD.size
        src_ip = socket.inet_ntop(fam, msg[off:off + n])
        local = socket.inet_ntop(fam, msg[off + n:off + 2 * n])
        src = (src_ip, port, 0, 0) if fam == socket.AF_INET6 else (src_ip, port)
        return li, msg[off + 2 * n:], src, local, ifindex, arrival


class Intake:
    """The worker's listen sockets and its end of the forwarding between workers."""

    def __init__(self, worker: Worker, listeners: list[Listener],
                 forward: Forward | None) -> None:
        self.worker = worker
        self.listeners = listeners
        self.forward = forward

    def start(self, loop: Loop) -> None:
        for i, lst in enumerate(self.listeners):
            lst.index = i
            lst.sock.setblocking(False)
        for lst in self.listeners:
            loop.watch(lst.sock.fileno(), functools.partial(self.read_requests, lst))
        if self.forward is not None:
            loop.watch(self.forward.reader.fileno(), self.read_forwarded)

    def stop(self, loop: Loop) -> None:
        """Stop reading requests.

        With SO_REUSEPORT a socket that stays open keeps receiving its share of
        requests; a draining worker closes its copy (the master closes its own). The
        master shares the socket, so closing ours would not take it out of an epoll
        set: it is unwatched first. Forwarded requests stop too: the owner of a hash
        may be a new worker now.
        """
        for lst in self.listeners:
            loop.unwatch(lst.sock.fileno())
            lst.sock.close()
        self.listeners = []
        if self.forward is not None:
            loop.unwatch(self.forward.reader.fileno())

    def read_requests(self, lst: Listener) -> bool:
        """Serve up to LISTEN_BATCH requests; True when more are waiting."""
        w = self.worker
        fwd = self.forward if lst.shared else None
        got = 0
        while got < LISTEN_BATCH:
            # Known misses are answered by the data path itself (C: without Python),
            # unless this worker is full: then every request hears "busy".
            refusals = w.refusals if fwd is None \
                and len(w.table) < w.max_sessions else None
            # C may start transfers itself (an OACK it has the answer for) while
            # there is room, from spares bound to the address the client asked.
            starts = None
            if refusals is not None and not w.table.uploads:
                starts = w.loop.offer_starts(w.max_sessions - len(w.table))
            try:
                # IP_PKTINFO on every listener: the destination address (for a wildcard
                # bind) and the arrival interface, whose MTU caps the blksize.
                batch = w.datapath.requests(lst.sock, w.pool.error_socket(lst), lst.pktinfo,
                                            refusals, time.monotonic(),
                                            min(REQ_BATCH, LISTEN_BATCH - got), starts)
            except OSError as err:
                log.warning("listen socket: %s", err)
                return False
            for kind, refusal, err, data, src, dst, ifindex, arrival, answered, _ in batch:
                if kind == REQ_STARTED:
                    w.pool.spares_used = True
                    w.c_started(refusal, err, arrival, answered)
                    continue
                if kind == REQ_MERGED:
                    w.books.count("requests")
                    w.books.count("merged")
                    continue
                if kind == REQ_ANSWERED:
                    assert refusal is not None
                    w.answered(refusal, err, src, arrival, answered)
                    continue
                local = dst if lst.pktinfo and dst else lst.host
                if fwd is not None:
                    owner = fwd.owner(src)
                    if owner != fwd.index:
                        if fwd.send(owner, lst, data, src, local, ifindex, arrival):
                            w.books.count("forwarded")
                            continue
                        # The owner cannot take it: serving it here beats dropping it.
                w.serve_request(data, src, local, lst, ifindex, arrival)
            # What the content hook answered meanwhile goes on now, not after the rest
            # of a storm's requests.
            w.requests.complete_parked()
            got += len(batch)
            if len(batch) < REQ_BATCH:
                return False
        return True

    def read_forwarded(self) -> None:
        assert self.forward is not None
        for _ in range(LISTEN_BATCH):
            got = self.forward.receive()
            if got is None:
                return
            li, data, src, local, ifindex, arrival = got
            if li < len(self.listeners):
                self.worker.serve_request(data, src, local, self.listeners[li], ifindex,
                                          arrival)
