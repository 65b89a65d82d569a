"""The known-answer table: requests the data path answers without the worker.

An entry is a request datagram and its answer (an ERROR for a missing name, or
an OACK from which C starts the transfer), valid until it expires and while the
directory or file it names keeps its identity.  On the C data path the entries
also live in a C table (struct tftpd_known_answer) that tftpd_requests reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from tftpd.datapath.sending import CDataPath, DataPath
from tftpd.files import Identity, dir_identity  # one definition: the negative cache's

__all__ = ["KnownAnswer", "KnownAnswers"]


@dataclass(slots=True, eq=False)
class KnownAnswer:
    """A request whose answer is known, while `dir` keeps its identity: an ERROR
    (dir: the directory of the missing name), or an OACK that starts a transfer
    (dir: the file itself, `xfer` the transfer's numbers; C path only)."""

    id: int
    request: bytes
    reply: bytes
    expires: float  # time.monotonic()
    dir: str
    ident: Identity | None
    note: Any = None  # the caller's, for its log line
    index: int = -1  # the entry in C's table
    ifindex: int = 0  # an OACK: for requests that arrived on this interface only
    dstlen: int = 0  # an OACK: and were sent to an address of this family (4, 16)
    xfer: Any = None  # an OACK: the struct tftpd_xfer C copies into the slot


class KnownAnswers:
    """The requests the data path answers without the worker (struct
    tftpd_known_answer in the header).

    Filled by the worker: one entry per distinct request datagram that named a
    missing file, for as long as its negative cache holds that miss (an ERROR);
    and, on the C data path, one per request whose OACK C may send itself,
    starting the transfer (an OACK, while the file is unchanged).
    With the C data path the entries also live in a C table that `tftpd_requests`
    reads; the Python twin looks them up here, with the same rules.
    """

    def __init__(self, datapath: DataPath, capacity: int = 4096) -> None:
        if capacity & (capacity - 1) or capacity < 2:
            raise ValueError("capacity must be a power of two")
        self.capacity = capacity
        self._by_request: dict[bytes, KnownAnswer] = {}
        self._by_id: dict[int, KnownAnswer] = {}
        self._retired: dict[int, KnownAnswer] = {}  # OACK entries that left the table
        self._ids = 0
        self._c = isinstance(datapath, CDataPath)
        if self._c:
            assert isinstance(datapath, CDataPath)
            self._ffi, self._lib = datapath._ffi, datapath._lib
            self._keep: dict[int, tuple[Any, Any, Any]] = {}
            self.table = self._ffi.new("struct tftpd_known_answer[]", capacity)

    def __len__(self) -> int:
        return len(self._by_request)

    def get(self, ident: int) -> KnownAnswer | None:
        r = self._by_id.get(ident)
        return r if r is not None else self._retired.get(ident)

    def put(self, request: bytes, reply: bytes, expires: float, dir: str,
            ident: Identity | None, note: Any = None, *,
            ifindex: int = 0, dstlen: int = 0, xfer: Any = None) -> KnownAnswer:
        """Enter a known answer: an ERROR, or with `xfer` (C only) an OACK."""
        old = self._by_request.get(request)
        if old is not None:  # the same request again: refresh it in place
            self._retire(old)
        elif len(self._by_request) + 1 > self.capacity // 2:
            self._rebuild(time.monotonic())
        self._ids += 1
        r = KnownAnswer(self._ids, request, reply, expires, dir, ident, note,
                    old.index if old is not None else -1, ifindex, dstlen, xfer)
        self._by_request[request] = r
        self._by_id[r.id] = r
        if self._c:
            self._enter(r)
        return r

    def current(self, request: bytes) -> KnownAnswer | None:
        """The entry for this request, as it stands (no checks)."""
        return self._by_request.get(request)

    def _retire(self, r: KnownAnswer) -> None:
        """An entry leaves the table. A transfer C started from it may still be
        live, so an OACK's entry stays at hand by id for a while (bounded)."""
        self._by_id.pop(r.id, None)
        if r.xfer is None:
            return
        if len(self._retired) >= self.capacity:
            for key in list(self._retired)[:self.capacity // 2]:  # the oldest half
                del self._retired[key]
        self._retired[r.id] = r

    def lookup(self, request: bytes, now: float) -> KnownAnswer | None:
        """The entry that answers this request now: byte-identical, unexpired, its
        directory (or file) unchanged. An OACK entry is not the twin's to answer:
        it has no pump. C twin: tftpd_lookup (_ext/tftpd_known.c)."""
        r = self._by_request.get(request)
        if r is None or r.xfer is not None or r.expires <= now \
                or dir_identity(r.dir) != r.ident:
            return None
        return r

    def _rebuild(self, now: float) -> None:
        """Keep the unexpired entries (the newest half at most); the table half empty."""
        live = [r for r in self._by_request.values() if r.expires > now]
        live = live[-(self.capacity // 4):]
        keep = {r.id for r in live}
        for r in self._by_request.values():
            if r.id not in keep:
                self._retire(r)
        self._by_request = {r.request: r for r in live}
        self._by_id = {r.id: r for r in live}
        if self._c:
            self._ffi.memmove(self.table, bytes(self._ffi.sizeof(self.table)),
                              self._ffi.sizeof(self.table))
            self._keep.clear()
            for r in live:
                r.index = -1
                self._enter(r)

    def _enter(self, r: KnownAnswer) -> None:
        ffi = self._ffi
        h = self._lib.tftpd_hash(r.request, len(r.request))
        i = r.index
        if i < 0:
            mask = self.capacity - 1
            i = h & mask
            while self.table[i].hash != 0:
                i = (i + 1) & mask
            r.index = i
        req = ffi.new("char[]", r.request)
        reply = ffi.new("char[]", r.reply)
        path = ffi.new("char[]", os.fsencode(r.dir))
        self._keep[i] = (req, reply, path)
        e = self.table[i]
        e.req, e.reqlen, e.reply, e.replylen = req, len(r.request), reply, len(r.reply)
        e.id, e.expires, e.dir = r.id, r.expires, path
        e.dir_known = 1 if r.ident is not None else 0
        (e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns, e.mode, e.uid,
         e.gid) = r.ident if r.ident is not None else (0,) * 8
        e.oack = 1 if r.xfer is not None else 0
        e.ifindex = r.ifindex
        e.dstlen = r.dstlen
        e.xfer = r.xfer if r.xfer is not None else ffi.NULL
        e.hash = h  # last: the entry is whole before it can match
