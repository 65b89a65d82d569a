"""Request intake: read a batch of requests from a listen socket, answer the ones
whose answer is known, hand the rest to the worker.

`python_requests` is the twin of C's `tftpd_requests` (_ext/tftpd_requests.c) for
what the twin does (answers known ERRORs; it has no pump, so it starts no
transfer); `c_requests` calls C and turns its structs into `Request`s.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from tftpd.datapath.events import REQ_ANSWERED, REQ_MERGED, REQ_PASS, REQ_STARTED, Request
from tftpd.datapath.ext import REQ_BATCH, REQ_MAX
from tftpd.datapath.net import ANC_SIZE, decode_sockaddr, from_ancillary, pktinfo_cmsg

if TYPE_CHECKING:
    from tftpd.datapath.known import KnownAnswers
    from tftpd.datapath.pump import Pump
    from tftpd.datapath.sending import CDataPath

__all__ = ["CIntake", "c_requests", "python_requests"]


def python_requests(lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                    answers: KnownAnswers | None, now: float, limit: int) -> list[Request]:
    """DataPath.requests on the Python data path. C twin: tftpd_requests."""
    out: list[Request] = []
    family = lsock.family
    for _ in range(min(limit, REQ_BATCH)):
        try:
            data, anc, flags, src = lsock.recvmsg(REQ_MAX, ANC_SIZE)
        except InterruptedError:
            continue
        except BlockingIOError:
            break
        dst, ifindex, arrival = from_ancillary(family, anc)
        r = None
        if answers is not None and errsock is not None and not flags & socket.MSG_TRUNC:
            r = answers.lookup(data, now)
        if r is None:
            out.append(Request(REQ_PASS, None, 0, data, src, dst, ifindex, arrival, 0.0))
            continue
        err = 0
        try:
            if pktinfo and dst:
                errsock.sendmsg([r.reply], [pktinfo_cmsg(family, dst)], 0, src)
            else:
                errsock.sendto(r.reply, src)
        except OSError as exc:
            err = exc.errno or errno.EIO
        out.append(Request(REQ_ANSWERED, r, err, b"", src, dst, ifindex, arrival, time.time()))
    return out


class CIntake:
    """The buffers C reads requests into: one per C data path, made on first use."""

    def __init__(self, ffi: Any) -> None:
        # 2 MiB of address space, never cleared: only the pages requests land on
        # are ever touched.
        self.buf = ffi.new_allocator(should_clear_after_alloc=False)(
            "char[]", REQ_BATCH * REQ_MAX)
        self.reqs = ffi.new("struct tftpd_request[]", REQ_BATCH)
        self.view = ffi.buffer(self.buf)


def c_requests(dp: CDataPath, lsock: socket.socket, errsock: socket.socket | None,
               pktinfo: bool, answers: KnownAnswers | None, now: float, limit: int,
               starts: Pump | None) -> list[Request]:
    """DataPath.requests on the C data path: tftpd_requests, its results typed."""
    ffi, lib = dp._ffi, dp._lib
    if dp._intake is None:
        dp._intake = CIntake(ffi)
    bufs = dp._intake
    table, size = ffi.NULL, 0
    if answers is not None and errsock is not None and len(answers):
        table, size = answers.table, answers.capacity
    n = lib.tftpd_requests(lsock.fileno(), errsock.fileno() if errsock is not None else -1,
                           1 if pktinfo else 0, table, size, now, min(limit, REQ_BATCH),
                           bufs.reqs, bufs.buf, REQ_BATCH * REQ_MAX,
                           starts.starts if starts is not None else ffi.NULL)
    if n < 0:
        raise OSError(-n, os.strerror(-n))
    out: list[Request] = []
    family = lsock.family
    for i in range(n):
        q = bufs.reqs[i]
        kind = q.kind
        if kind == REQ_STARTED or kind == REQ_MERGED:
            # C has the peer and the address asked in the slot's struct: nothing to
            # decode per start.
            assert answers is not None
            out.append(Request(kind, answers.get(q.id), q.err, b"", None, None, q.ifindex,
                               q.arrival, q.answered, q.slot))
            continue
        dst = socket.inet_ntop(family, bytes(q.dst[0:q.dstlen])) if q.dstlen else None
        src = decode_sockaddr(bytes(ffi.buffer(q.src, q.srclen)))
        if src is None:
            continue  # no address to answer: dropped, as the twin's recvmsg would
        if q.kind == REQ_ANSWERED:
            assert answers is not None
            out.append(Request(REQ_ANSWERED, answers.get(q.id), q.err, b"", src, dst,
                               q.ifindex, q.arrival, q.answered))
        else:
            data = bufs.view[q.off:q.off + q.len]
            out.append(Request(REQ_PASS, None, 0, data, src, dst, q.ifindex, q.arrival, 0.0))
    return out
