"""The live transfers of a worker, by client address, and by slot in C's pump."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tftpd.datapath import Pump, encode_sockaddr
from tftpd.files import FileCache, FileError, OpenFile, Upload
from tftpd.transfer import ReadTransfer, WriteTransfer

log = logging.getLogger("tftpd")


@dataclass(slots=True, eq=False)
class Session:
    """A live transfer and the I/O the worker holds for it."""

    transfer: ReadTransfer | WriteTransfer
    sock: Any  # socket.socket; its port serves this client only
    file: OpenFile | None  # a read's file
    peer: tuple
    sockaddr: bytes
    request: bytes  # the RRQ datagram, to merge a repeated one
    name: str  # sanitised, for the log
    mode: str
    started: float
    slot: int = -1  # the transfer's slot in C's pump, -1 on the Python path
    asked: dict = field(default_factory=dict)  # the client's options, for the JSON log
    granted: dict = field(default_factory=dict)
    upload: Upload | None = None  # a write's file
    heap_deadline: float = field(default=float("inf"))
    local: str | None = None  # the address `sock` is bound to, to reuse it


@dataclass(slots=True, frozen=True)
class Start:
    """What the log and an adoption need of a transfer C starts (an OACK entry)."""

    filename: bytes  # to open the file when Python takes the transfer over
    name: str
    mode: str
    asked: dict
    granted: dict
    local: str  # the address its sockets are bound to


class SessionTable:
    """Who is being served: one session per client address and port."""

    def __init__(self) -> None:
        self.by_peer: dict[tuple, Session] = {}
        self.by_slot: dict[int, Session] = {}  # transfers C's pump watches
        self.per_client: dict[str, int] = {}  # live transfers by client address
        self.uploads = 0  # live uploads: not in C's peer table, so C starts nothing

    def __len__(self) -> int:
        return len(self.by_peer)

    def get(self, peer: tuple) -> Session | None:
        return self.by_peer.get(peer)

    def is_current(self, session: Session) -> bool:
        """False once the session has ended (its peer may have a new one)."""
        return self.by_peer.get(session.peer) is session

    def sessions(self) -> list[Session]:
        return list(self.by_peer.values())

    def client_count(self, host: str) -> int:
        return self.per_client.get(host, 0)

    def add(self, session: Session) -> None:
        self.by_peer[session.peer] = session
        host = session.peer[0]
        self.per_client[host] = self.per_client.get(host, 0) + 1
        if session.upload is not None:
            self.uploads += 1
        if session.slot >= 0:
            self.by_slot[session.slot] = session

    def remove(self, session: Session) -> bool:
        """Take an ended session out; False if it was out already."""
        if session.slot >= 0:
            self.by_slot.pop(session.slot, None)
        if self.by_peer.get(session.peer) is not session:
            return False
        del self.by_peer[session.peer]
        host = session.peer[0]
        left = self.per_client.get(host, 1) - 1
        if left > 0:
            self.per_client[host] = left
        else:
            self.per_client.pop(host, None)
        if session.upload is not None:
            self.uploads -= 1
        return True

    def adopt(self, pump: Pump, refusals: Any, files: FileCache, retries: int,
              slot: int) -> Session | None:
        """Python takes over a transfer C started: its state, socket and file.

        The session is added to the table. None if its state is lost (then C's slot
        is released); a session without a file if the file changed since the OACK told
        its size (the caller ends it: never serve a mix).
        """
        x, sock = pump.adopt(slot)
        entry = refusals.get(x.answer)
        peer = pump.peer(slot)
        if sock is None or entry is None:  # cannot be: the pool and entries outlive it
            log.error("%s: lost the state of a transfer C started", peer_text(peer))
            pump.release(slot)
            if sock is not None:
                sock.close()
            return None
        note: Start = entry.note
        started, armed = x.sent_at, x.armed_at
        try:
            f: OpenFile | None = files.open(note.filename, note.mode)
        except (FileError, OSError):  # gone or unreadable since
            f = None
        if f is not None and f.ident != entry.ident:
            f.close()
            f = None
        t = ReadTransfer(peer, x.filesize, blksize=x.blksize, windowsize=x.windowsize,
                         oack=note.granted, timeout=x.base_rto,
                         client_timeout=bool(x.fixed_rto), retries=retries,
                         rollover=x.rollover, state=x, oack_packet=entry.reply)
        x.sent_at, x.armed_at = started, armed
        if f is not None:
            pump.set_file(slot, f.fd, f.image)
        else:
            x.fd = -1
        session = Session(t, sock, f, peer, encode_sockaddr(peer), entry.request, note.name,
                          note.mode, started, slot, note.asked, dict(note.granted),
                          local=note.local)
        self.add(session)
        return session


def peer_text(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
