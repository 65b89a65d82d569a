"""The pump: C's epoll loop over many transfers, and the transfers C starts.

The worker registers each transfer's socket with a slot (a struct tftpd_xfer in
memory this module owns); `Pump.run` lets C answer the common ACKs and returns
the rest as PumpEvents. C may also start transfers itself from known OACK
answers (tftpd_requests): for that it takes free slots offered here and spare
sockets kept here, and enters peers in the peer table (peers.py).
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any

from tftpd.datapath.events import EV_PACKET, EV_PROBE, Owner, PumpEvent
from tftpd.datapath.net import decode_sockaddr, drained
from tftpd.datapath.peers import PeerTable
from tftpd.datapath.sending import CDataPath

__all__ = ["Pump"]


class Pump:
    """C's lock-step for a set of transfer sockets (see tftpd_pump in the header).

    The worker registers each transfer's socket with a slot; `run` serves the
    ready ones and returns what Python must decide (PumpEvents). Only the C data
    path has one; the Python twin of a pump step is
    ReadTransfer.on_datagram itself.
    """

    MAX_EVENTS = 256
    PKTBUF = 256 * 1500
    SCRATCH = 1 << 20
    OFFER = 32  # free slots C is offered before each read: the most one read can start
    FREE_CAP = 1024  # room for slots C gives back itself when it ends a probe
    SPARES = 256  # new sockets for the next transfers (all local addresses)

    def __init__(self, datapath: CDataPath, transfers: int = 1024) -> None:
        self._dp = datapath
        ffi, lib = datapath._ffi, datapath._lib
        self._ffi, self._lib = ffi, lib
        self.epoll = select.epoll()
        self._cap = 1024
        self._table = ffi.new("struct tftpd_xfer *[]", self._cap)
        self._states: dict[int, Any] = {}  # slot -> the struct (keeps it alive)
        self._tokens: dict[int, int] = {}  # token -> the descriptor add_token put in
        self._free_tokens: list[int] = []  # removed tokens, numbered again by add_token
        self._released: list[int] = []  # removed since the last run: not yet reusable
        self._next_token = int(lib.TFTPD_TOKEN_BASE)  # the lowest never handed out
        self._free: list[int] = list(range(self._cap - 1, -1, -1))
        self._events = ffi.new("struct tftpd_event[]", self.MAX_EVENTS)
        # What C needs to start transfers (tftpd_starts in the header): the peer
        # table, free slots offered to it and spare sockets, all owned here.
        peers = 1024
        while peers < 4 * (transfers + self.OFFER) and peers < 1 << 22:
            peers *= 2
        st = self.starts = ffi.new("struct tftpd_starts *")
        self._offered = ffi.new("unsigned int[]", self.FREE_CAP)
        self._spares = ffi.new("struct tftpd_spare[]", self.SPARES)
        st.epfd = self.epoll.fileno()
        st.table, st.table_len = self._table, self._cap
        self.peers = PeerTable(lib, st, ffi.new("unsigned int[]", peers), peers)
        st.free_slots, st.spares = self._offered, self._spares
        st.free_cap, st.spares_cap = self.FREE_CAP, self.SPARES
        self._socks: dict[int, tuple[socket.socket, bytes]] = {}  # spares and lent ones
        self._images: dict[int, Any] = {}  # slot -> the cdata its struct's mem points into
        self._overdue = ffi.new("unsigned int[]", 256)
        self._next = ffi.new("double *")
        self._pktbuf = ffi.new("char[]", self.PKTBUF)
        self._buffer = ffi.buffer(self._pktbuf)
        # C batches a window by what fits: 1 MiB holds 64 blocks up to 16 KiB
        # (and always at least one of the largest).
        if datapath._scratch_len < self.SCRATCH:
            datapath._grow(self.SCRATCH)

    def fileno(self) -> int:
        return self.epoll.fileno()

    def close(self) -> None:
        self.epoll.close()

    def new_state(self) -> tuple[int, Any]:
        """A zeroed struct tftpd_xfer and the slot it is known by."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        x = self._ffi.new("struct tftpd_xfer *")
        self._states[slot] = x
        self._table[slot] = x
        return slot, x

    def _grow(self) -> None:
        old, cap = self._table, self._cap
        self._cap = cap * 2
        self._table = self._ffi.new("struct tftpd_xfer *[]", self._cap)
        self._ffi.memmove(self._table, old, cap * self._ffi.sizeof("struct tftpd_xfer *"))
        self._free.extend(range(self._cap - 1, cap - 1, -1))
        self.starts.table, self.starts.table_len = self._table, self._cap

    def watch(self, slot: int, sock: socket.socket, sockaddr: bytes, file_fd: int,
              image: bytes | None = None) -> None:
        """Register a transfer: its socket, its peer (from encode_sockaddr), its file
        (and the file's image, if it has one)."""
        x = self._states[slot]
        raw = sockaddr
        x.sock = sock.fileno()
        self.set_file(slot, file_fd, image)
        x.addrlen = len(raw)
        self._ffi.memmove(x.addr, raw, len(raw))
        rc = self._lib.tftpd_epoll_set(self.epoll.fileno(), self._lib.TFTPD_EPOLL_ADD,
                                       sock.fileno(), slot)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        # C looks peers up before it answers a request; past half full it starts
        # nothing more (tftpd_start), so a failure here loses no merge.
        self.peers.put(slot)

    def release(self, slot: int) -> None:
        """Forget a slot. Its socket is about to be closed, which takes it out of
        the epoll set (its only descriptor goes): no epoll_ctl per transfer."""
        x = self._states.get(slot)
        if x is None:
            return
        self.peers.delete(slot)
        del self._states[slot]
        self._images.pop(slot, None)
        self._table[slot] = self._ffi.NULL
        self._free.append(slot)

    def add_token(self, fd: int) -> int:
        """Put one of Python's descriptors (a listen socket, the signal pipe, a
        selector) in the pump's epoll set; `run` reports it ready as
        PumpEvent(token, EV_READY) and stops waiting. Returns the token: a removed one
        again if there is one, so watching and unwatching do not use tokens up (C
        counts them from TFTPD_TOKEN_BASE to the top of 32 bits: 65,536)."""
        if self._free_tokens:
            token = self._free_tokens.pop()
        elif self._next_token <= 0xFFFFFFFF:
            token = self._next_token
            self._next_token += 1
        else:
            raise OSError(errno.ENOSPC, "every pump token is in use")
        rc = self._lib.tftpd_epoll_set(self.epoll.fileno(), self._lib.TFTPD_EPOLL_ADD, fd,
                                       token)
        if rc < 0:
            self._free_tokens.append(token)
            raise OSError(-rc, os.strerror(-rc))
        self._tokens[token] = fd
        return token

    def remove_token(self, fd: int, token: int) -> None:
        """Take the descriptor out of the epoll set. Its token is numbered again only
        from the next `run` on: the events the last run handed out may still name it,
        and must not reach whoever gets it next."""
        self._lib.tftpd_epoll_set(self.epoll.fileno(), self._lib.TFTPD_EPOLL_DEL, fd, token)
        if self._tokens.get(token) == fd:
            del self._tokens[token]
            self._released.append(token)

    def run(self, now: float, timeout: float = 0.0,
            max_ready: int = 256) -> list[PumpEvent]:
        """Serve ready transfers; wait up to `timeout` s for something for Python
        (an event, a ready token), answering ACKs in C meanwhile."""
        if self._released:
            self._free_tokens += self._released
            self._released.clear()
        dp = self._dp
        ms = min(int(timeout * 1000.0 + 0.999), 86_400_000) if timeout > 0 else 0
        dp._gso[0] = 1 if dp.gso else 0
        n = self._lib.tftpd_pump(self.epoll.fileno(), self._table, self._cap, now, ms,
                                 max_ready, self._events, self.MAX_EVENTS, self._pktbuf,
                                 self.PKTBUF, dp._buf, dp._scratch_len, dp._gso,
                                 self.starts)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        out: list[PumpEvent] = []
        ev = self._events
        for i in range(n):
            e = ev[i]
            if e.kind == EV_PACKET:
                data = self._buffer[e.off:e.off + e.len]
                src = decode_sockaddr(bytes(self._ffi.buffer(e.src, e.srclen)))
                if src is not None:  # else no address to answer: dropped
                    out.append(PumpEvent(e.slot, EV_PACKET, 0, data, src))
            elif e.kind == EV_PROBE:
                src = decode_sockaddr(bytes(self._ffi.buffer(e.src, e.srclen)))
                out.append(PumpEvent(e.slot, EV_PROBE, e.err, b"", src, bool(e.offered)))
            else:
                out.append(PumpEvent(e.slot, e.kind, e.err))
        return out

    def state(self, slot: int) -> Any:
        return self._states[slot]

    def set_file(self, slot: int, file_fd: int, image: bytes | None) -> None:
        """The file C sends the slot's blocks from: its image when it has one (kept
        alive here while the slot is), else the descriptor."""
        x = self._states[slot]
        x.fd = file_fd
        if image is not None:
            mem = self._ffi.from_buffer(image)
            self._images[slot] = mem
            x.mem = mem
        else:
            self._images.pop(slot, None)
            x.mem = self._ffi.NULL

    # -- transfers C starts ----------------------------------------------------------

    @property
    def live(self) -> int:
        """Transfers C started and still owns."""
        return int(self.starts.live)

    def offer(self, room: int) -> None:
        """Let C take free slots for transfers it starts: at least OFFER while there
        is `room` for that many more transfers, none when there is none. The slots
        C gives back stay offered (their structs are reused) up to FREE_CAP."""
        st = self.starts
        want = max(0, min(room, self.OFFER))
        while st.nfree < want:
            slot, _ = self.new_state()
            self._offered[st.nfree] = slot
            st.nfree += 1
        if room < st.nfree:  # nearly full: C may start no more than `room`
            while st.nfree > max(0, room):
                st.nfree -= 1
                self._unoffer(self._offered[st.nfree])

    def _unoffer(self, slot: int) -> None:
        self._states.pop(slot, None)
        self._table[slot] = self._ffi.NULL
        self._free.append(slot)

    def is_started(self, slot: int) -> bool:
        """The slot holds a transfer C started and still owns."""
        x = self._states.get(slot)
        return x is not None and x.owner == Owner.C

    def adopt(self, slot: int) -> tuple[Any, socket.socket | None]:
        """Python takes over a transfer C started: its struct and its socket."""
        x = self._states[slot]
        x.owner = Owner.PYTHON
        self.starts.live -= 1
        sock = self._socks.pop(x.sock, (None, b""))[0]
        return x, sock

    def ended(self, slot: int, offered: bool) -> None:
        """A transfer C started and ended (EV_PROBE): its socket is closed (a port
        serves one client), and its slot taken back unless C offered it again
        itself (the event's `offered`)."""
        kept = self._socks.pop(self._states[slot].sock, None)
        if kept is not None:
            kept[0].close()
        if not offered:
            self._unoffer(slot)

    def template(self, state: Any) -> Any:
        """A copy of a transfer's struct, for C to start the next ones from (no
        socket, file or peer: C sets the socket and the peer, Python the file)."""
        x = self._ffi.new("struct tftpd_xfer *")
        self._ffi.memmove(x, state, self._ffi.sizeof("struct tftpd_xfer"))
        x.sock, x.fd, x.addrlen, x.owner, x.answer = -1, -1, 0, Owner.PYTHON, 0
        x.mem = self._ffi.NULL  # another transfer's image: Python sets the file on adoption
        return x

    def peer(self, slot: int) -> tuple[Any, ...]:
        x = self._states[slot]
        return decode_sockaddr(bytes(self._ffi.buffer(x.addr, x.addrlen)))

    def spare_room(self) -> bool:
        return self.starts.nspares < self.SPARES

    def find(self, sockaddr: bytes) -> int:
        """The slot of the transfer serving this peer (encode_sockaddr), or -1."""
        return self.peers.find(sockaddr)

    def overdue(self, now: float) -> tuple[list[int], float]:
        """Transfers C started whose OACK timer is due, and the next deadline."""
        self._next[0] = float("inf")
        n = self._lib.tftpd_overdue(self.starts, now, self._overdue, 256, self._next)
        return [self._overdue[i] for i in range(n)], float(self._next[0])

    # -- spare sockets (shared with C) ------------------------------------------------

    def take_spare(self, local: bytes) -> socket.socket | None:
        """A spare socket bound to `local` (packed address), emptied of late
        datagrams; None when there is none."""
        st, arr = self.starts, self._spares
        i = st.nspares
        while i > 0:
            i -= 1
            e = arr[i]
            flooded = e.dstlen == 0  # C found it so
            if not flooded and bytes(e.dst[0:e.dstlen]) != local:
                continue
            fd = e.sock
            st.nspares -= 1
            arr[i] = arr[st.nspares]
            sock = self._socks.pop(fd)[0]
            if flooded or not drained(sock):
                sock.close()
                continue
            return sock
        return None

    def spare_counts(self) -> dict[bytes, int]:
        """How many spares each local address (packed) has."""
        counts: dict[bytes, int] = {}
        arr = self._spares
        for i in range(self.starts.nspares):
            e = arr[i]
            if e.dstlen:
                key = bytes(e.dst[0:e.dstlen])
                counts[key] = counts.get(key, 0) + 1
        return counts

    def put_spare(self, sock: socket.socket, local: bytes) -> bool:
        """Keep a new socket, bound to `local` (packed), for a transfer to come;
        False when full."""
        if self.starts.nspares >= self.SPARES:
            return False
        self._socks[sock.fileno()] = (sock, local)
        self._put_spare(sock.fileno(), local)
        return True

    def _put_spare(self, fd: int, local: bytes) -> None:
        st = self.starts
        e = self._spares[st.nspares]
        e.sock = fd
        e.dstlen = len(local)
        self._ffi.memmove(e.dst, local, len(local))
        st.nspares += 1

    def close_spares(self) -> None:
        for sock, _ in self._socks.values():
            sock.close()
        self._socks.clear()
        self.starts.nspares = 0
