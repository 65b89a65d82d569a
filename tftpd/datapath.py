"""The data path: send a window of DATA blocks from a file to a client.

Two implementations with one behaviour: the C one (``tftpd._datapath``, built by
cffi from ``_ext/``) and a pure-Python twin used when the extension is missing.
This module is the only importer of the compiled module.  Python validates
every argument and decides what is sent; C does the syscalls and returns a
count or ``-errno``; this module turns the status into the typed exception.

Both implementations, per window:

- read the blocks in batches of at most ``BATCH`` blocks (``pread`` into a
  scratch buffer the ``DataPath`` owns), each batch read completely before any
  of it is sent, so a file that shrinks under us never yields a short or
  garbage block: ``FileShrank`` is raised instead (the batches before it went
  out whole);
- send one datagram per block, the 4-byte header and the payload gathered from
  two buffers (C: ``sendmmsg``; Python: ``socket.sendmsg``), to an explicit
  address, because transfer sockets are unconnected (so the server can answer
  a stray TID with ERROR 5);
- stop on back-pressure (EAGAIN/EWOULDBLOCK/ENOBUFS) and return how many
  datagrams went out, 0 when the first one did not; raise ``OSError`` for any
  other error.

Neither sendfile() (needs a connected socket) nor mmap() (a file truncated
under a mapping raises SIGBUS and kills the worker) is used.
"""

from __future__ import annotations

import abc
import errno
import os
import select
import socket
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Any

from tftpd.files import Identity, dir_identity  # one definition: the negative cache's
from tftpd.transfer import wire_block  # one definition: the state machine's

__all__ = [
    "BATCH",
    "EV_READY",
    "REQ_ANSWERED",
    "REQ_BATCH",
    "REQ_PASS",
    "DataPath",
    "FileShrank",
    "MAX_BLKSIZE",
    "MIN_BLKSIZE",
    "Pump",
    "Refusal",
    "Refusals",
    "decode_sockaddr",
    "dir_identity",
    "encode_sockaddr",
    "ext_error",
    "from_ancillary",
    "get_datapath",
    "pktinfo_cmsg",
    "wire_block",
]

# The version of _ext/tftpd_datapath.h this module speaks; the compiled module
# reports its own (TFTPD_DATAPATH_VERSION) and a mismatch means a stale build.
EXT_VERSION = 11

# Blocks read and sent per batch; equal to TFTPD_MAX_BATCH in the C code
# (checked at import) so both implementations stop at the same place.
BATCH = 64

MIN_BLKSIZE = 8  # RFC 2348
MAX_BLKSIZE = 65464  # RFC 2348

_OPCODE_DATA = 3
_SOL_UDP, _UDP_SEGMENT = 17, 103  # linux/udp.h
_GSO_MAX_BYTES = 65000  # TFTPD_GSO_MAX_BYTES
_NO_GSO = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
                     errno.EMSGSIZE})
_BACK_PRESSURE = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
_ENV = "TFTPD_DATAPATH"


# struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr} (Linux ip(7))
_PKTINFO4 = struct.Struct("=i4s4s")
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SO_TIMESTAMPNS = 35  # == SCM_TIMESTAMPNS (Linux asm-generic/socket.h)
_TIMESPEC = struct.Struct("=qq")
_ANC_SIZE = socket.CMSG_SPACE(32) + socket.CMSG_SPACE(_TIMESPEC.size)

REQ_ANSWERED, REQ_PASS, REQ_STARTED, REQ_MERGED = 1, 2, 3, 4
REQ_MAX = 65536  # TFTPD_REQ_MAX: one UDP payload
REQ_BATCH = 32  # TFTPD_REQ_BATCH
# (kind, refusal, err, datagram, source, destination, ifindex, arrival, answered)
Request = tuple[int, "Refusal | None", int, bytes, tuple[Any, ...], "str | None", int, float,
                float]


class FileShrank(OSError):
    """The file ended before a block it had to supply: it shrank after its size was taken.

    An OSError with errno EIO, so callers that map errno to a TFTP error need
    no special case.
    """

    def __init__(self, filesize: int) -> None:
        super().__init__(errno.EIO, f"file shrank below the {filesize} bytes being sent")
        self.filesize = filesize


_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port, address
_SOCKADDR_IN6 = struct.Struct("=H2s4s16sI")  # family, port, flowinfo, address, scope
_SOCKADDR_STORAGE = 128


def encode_sockaddr(addr: tuple[Any, ...]) -> bytes:
    """The raw ``struct sockaddr_in``/``sockaddr_in6`` for a socket-module address.

    ``addr`` is what ``recvfrom`` gives: ``(host, port)`` for IPv4 or
    ``(host, port, flowinfo, scope_id)`` for IPv6 (a 2-tuple with an IPv6 host is
    taken with flowinfo and scope_id 0).  Hosts are numeric.  Workers encode a
    client's address once per transfer and keep the bytes.
    """
    if not isinstance(addr, tuple) or not 2 <= len(addr) <= 4:
        raise ValueError(f"not a socket address: {addr!r}")
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"not a socket address: {addr!r}")
    port_be = port.to_bytes(2, "big")
    if ":" not in host:
        if len(addr) != 2:
            raise ValueError(f"an IPv4 address is a 2-tuple: {addr!r}")
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise ValueError(f"not a numeric IPv4 address: {host!r}") from None
        return _SOCKADDR_IN.pack(socket.AF_INET, port_be, packed)
    flowinfo = addr[2] if len(addr) > 2 else 0
    scope_id = addr[3] if len(addr) > 3 else 0
    if not isinstance(flowinfo, int) or not 0 <= flowinfo < 1 << 20:
        raise ValueError(f"bad IPv6 flowinfo in {addr!r}")
    if not isinstance(scope_id, int) or not 0 <= scope_id < 1 << 32:
        raise ValueError(f"bad IPv6 scope id in {addr!r}")
    # recvfrom names link-local peers "fe80::1%eth0"; the scope is in scope_id.
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        raise ValueError(f"not a numeric IPv6 address: {host!r}") from None
    # The kernel keeps sin6_flowinfo in network order, sin6_scope_id in host order.
    return _SOCKADDR_IN6.pack(socket.AF_INET6, port_be, flowinfo.to_bytes(4, "big"), packed,
                              scope_id)


class DataPath(abc.ABC):
    """Sends windows of DATA blocks; see the module docstring for the contract.

    ``name`` is ``"c"`` or ``"python"``.  An instance owns a scratch buffer,
    grown on demand to one batch of the largest block size it has served; it
    is not thread-safe (one per worker).
    """

    name: str = ""

    def __init__(self) -> None:
        self._scratch_len = 0
        # UDP segmentation for windows: on unless TFTPD_GSO=0, off for good once the
        # kernel refuses it (the same datagrams go out by sendmmsg then).
        self.gso = os.environ.get("TFTPD_GSO", "1") != "0"

    def send_window(
        self,
        sock: socket.socket,
        addr: tuple[Any, ...],
        sockaddr: bytes,
        file_fd: int,
        first: int,
        count: int,
        blksize: int,
        filesize: int,
        rollover: int = 0,
        image: bytes | None = None,
        state: Any = None,
    ) -> int:
        """Send blocks ``first`` .. ``first+count-1`` of the file to the client.

        ``addr`` is the client's socket-module address (used by the Python
        twin) and ``sockaddr`` the same address from ``encode_sockaddr`` (used
        by C).  Block k holds file bytes [(k-1)*blksize, min(k*blksize,
        filesize)); the last block may be empty.

        Returns the number of datagrams sent: ``count``, or fewer when the
        socket pushed back (EAGAIN/ENOBUFS), possibly 0.  Raises ``FileShrank``
        when the file is shorter than ``filesize``, ``OSError`` on other
        errors and ``ValueError`` on bad arguments.

        ``image``, when given, is the file's ``filesize`` bytes, taken when it was
        opened (``OpenFile.image``): blocks come from it, not from the descriptor.

        ``state``, the transfer's numbers (XferState or its C struct), says in its
        ``gso`` whether the transfer's route still takes UDP segmentation; a route
        that refuses it clears that, for this transfer alone. Segmentation is used
        when both it and the data path's ``gso`` (TFTPD_GSO) allow it.
        """
        _check(sockaddr, file_fd, first, count, blksize, filesize, rollover, image)
        need = min(count, BATCH) * (blksize + 4)  # room for a segmented batch too
        if need > self._scratch_len:
            self._grow(need)
        gso = self.gso and (state is None or bool(state.gso))
        sent, refused = self._send(sock, addr, sockaddr, file_fd, first, count, blksize,
                                   filesize, rollover, image, gso)
        if refused and state is not None:
            state.gso = 0
        return sent

    @abc.abstractmethod
    def _grow(self, size: int) -> None:
        """Make the scratch buffer at least `size` bytes."""

    def pump(self, transfers: int = 1024) -> Pump | None:
        """C's lock-step for many transfers, or None on the Python path."""
        return None

    @abc.abstractmethod
    def requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                 refusals: Refusals | None, now: float,
                 limit: int = REQ_BATCH, starts: Pump | None = None) -> list[Request]:
        """Read up to `limit` requests waiting on the listen socket (none: []).

        A request `refusals` knows is answered from `errsock` at once (from the
        address it was sent to, with `pktinfo`) and reported as REQ_ANSWERED with
        its Refusal; every other one is REQ_PASS, for the worker to serve.  Each is
        (kind, refusal, err, datagram, source, destination, ifindex, arrival,
        answered): err is the failed answer's errno or 0; destination, ifindex and
        arrival (realtime) come from the socket's ancillary data (None/0 if not
        given); answered is the realtime the answer went out.  OSError when the
        listen socket fails.

        With `starts` (the C data path's Pump), a request whose entry in
        `refusals` is an OACK starts its transfer in C (tftpd_requests in the
        header): REQ_STARTED, with the slot in place of the ifindex and no source
        (the slot's struct has the peer); the exact repeat of such a request from
        the same peer is REQ_MERGED, likewise. The twin has no pump: it never
        starts a transfer, and its lookup passes OACK entries to the worker.
        """

    @abc.abstractmethod
    def _send(self, sock: socket.socket, addr: tuple[Any, ...], sockaddr: bytes, file_fd: int,
              first: int, count: int, blksize: int, filesize: int, rollover: int,
              image: bytes | None, gso: bool) -> tuple[int, bool]:
        """Send the blocks (segmented if `gso`); the arguments are checked already.
        Returns what send_window does, and whether the route refused segmentation."""

    def __repr__(self) -> str:
        return f"<DataPath {self.name}>"


def _check(sockaddr: bytes, file_fd: int, first: int, count: int, blksize: int, filesize: int,
           rollover: int, image: bytes | None = None) -> None:
    # Any raw sockaddr up to sizeof(struct sockaddr_storage); normally one
    # from encode_sockaddr().
    if not isinstance(sockaddr, bytes) or not 0 < len(sockaddr) <= _SOCKADDR_STORAGE:
        raise ValueError("sockaddr must be the bytes of a struct sockaddr")
    if image is not None:
        if len(image) != filesize:
            raise ValueError(f"an image of {len(image)} bytes for a file of {filesize}")
    elif file_fd < 0:
        raise ValueError(f"bad file descriptor {file_fd}")
    if not MIN_BLKSIZE <= blksize <= MAX_BLKSIZE:
        raise ValueError(f"blksize {blksize} outside {MIN_BLKSIZE}..{MAX_BLKSIZE}")
    if rollover not in (0, 1):
        raise ValueError(f"rollover must be 0 or 1, not {rollover}")
    if filesize < 0 or filesize > (1 << 63) - 1 - MAX_BLKSIZE:
        raise ValueError(f"bad file size {filesize}")
    if not 1 <= count <= 0x7FFFFFFF:  # C returns the count as an int
        raise ValueError(f"count {count} outside 1..{0x7FFFFFFF}")
    # Blocks 1 .. filesize // blksize + 1 exist; the last one may be empty.
    last_block = filesize // blksize + 1
    if first < 1 or first + count - 1 > last_block:
        raise ValueError(
            f"blocks {first}..{first + count - 1} outside 1..{last_block} "
            f"(file of {filesize} bytes, blksize {blksize})"
        )


class _PythonDataPath(DataPath):
    """os.preadv into a bytearray, then socket.sendmsg per block."""

    name = "python"

    def __init__(self) -> None:
        super().__init__()
        self._buf = memoryview(bytearray(0))

    def _grow(self, size: int) -> None:
        self._buf = memoryview(bytearray(size))
        self._scratch_len = size

    def _send(self, sock: socket.socket, addr: tuple[Any, ...], sockaddr: bytes, file_fd: int,
              first: int, count: int, blksize: int, filesize: int, rollover: int,
              image: bytes | None, gso: bool) -> tuple[int, bool]:
        buf = self._buf
        refused = False
        batch = min(self._scratch_len // blksize, BATCH)
        seg = blksize + 4
        sent = 0
        while sent < count:
            k0 = first + sent
            g = min(count - sent, BATCH, self._scratch_len // seg, _GSO_MAX_BYTES // seg)
            if gso and g >= 2:
                r = self._send_gso(sock, addr, file_fd, k0, g, blksize, filesize, rollover,
                                   image)
                if r is not None:
                    if r == 0:
                        return sent, refused  # back-pressure
                    sent += r
                    continue
                gso, refused = False, True  # plain datagrams from now on, as C does
            n = min(batch, count - sent)
            off = (k0 - 1) * blksize
            length = min(off + n * blksize, filesize) - off
            if image is not None:  # the file's image: copied, as C points at it
                buf[:length] = image[off:off + length]
            else:
                _read_full(file_fd, buf, length, off, filesize)
            for i in range(n):
                start = i * blksize
                left = filesize - off - start
                wire = wire_block(k0 + i, rollover)
                header = bytes((0, _OPCODE_DATA, wire >> 8, wire & 0xFF))
                payload = buf[start:start + min(left, blksize)]
                try:
                    sock.sendmsg((header, payload), (), 0, addr)
                except OSError as exc:
                    # Python retries EINTR itself (PEP 475).
                    if exc.errno in _BACK_PRESSURE:
                        return sent + i, refused
                    raise
            sent += n
        return sent, refused


    def _send_gso(self, sock: socket.socket, addr: tuple[Any, ...], file_fd: int, k0: int,
                  n: int, blksize: int, filesize: int, rollover: int,
                  image: bytes | None = None) -> int | None:
        """C's tftpd_send_gso: n blocks, header and payload back to back, one
        sendmsg with UDP_SEGMENT. n, 0 on back-pressure, None if refused."""
        buf, seg = self._buf, blksize + 4
        off = (k0 - 1) * blksize
        total = 0
        views = []
        for i in range(n):
            length = max(0, min(blksize, filesize - off - i * blksize))
            wire = wire_block(k0 + i, rollover)
            buf[i * seg:i * seg + 4] = bytes((0, _OPCODE_DATA, wire >> 8, wire & 0xFF))
            views.append(buf[i * seg + 4:i * seg + 4 + length])
            total = i * seg + 4 + length
        want = sum(len(v) for v in views)
        done = 0
        if image is not None:
            for i, v in enumerate(views):
                v[:] = image[off + i * blksize:off + i * blksize + len(v)]
            done = want
        while done < want:  # one preadv for the batch, as in C
            skip, first_view = done, 0
            while skip >= len(views[first_view]):
                skip -= len(views[first_view])
                first_view += 1
            got = os.preadv(file_fd, [views[first_view][skip:], *views[first_view + 1:]],
                            off + done)
            if got == 0:
                raise FileShrank(filesize)
            done += got
        try:
            sock.sendmsg([buf[:total]], [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", seg))],
                         0, addr)
        except OSError as exc:
            if exc.errno in _BACK_PRESSURE:
                return 0
            if exc.errno in _NO_GSO:
                return None
            raise
        return n


    def requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                 refusals: Refusals | None, now: float,
                 limit: int = REQ_BATCH, starts: Pump | None = None) -> list[Request]:
        out: list[Request] = []
        family = lsock.family
        for _ in range(min(limit, REQ_BATCH)):
            try:
                data, anc, flags, src = lsock.recvmsg(REQ_MAX, _ANC_SIZE)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            dst, ifindex, arrival = from_ancillary(family, anc)
            r = None
            if refusals is not None and errsock is not None and not flags & socket.MSG_TRUNC:
                r = refusals.lookup(data, now)
            if r is None:
                out.append((REQ_PASS, None, 0, data, src, dst, ifindex, arrival, 0.0))
                continue
            err = 0
            try:
                if pktinfo and dst:
                    errsock.sendmsg([r.reply], [pktinfo_cmsg(family, dst)], 0, src)
                else:
                    errsock.sendto(r.reply, src)
            except OSError as exc:
                err = exc.errno or errno.EIO
            out.append((REQ_ANSWERED, r, err, b"", src, dst, ifindex, arrival, time.time()))
        return out


def _read_full(fd: int, buf: memoryview, length: int, off: int, filesize: int) -> None:
    done = 0
    while done < length:
        n = os.preadv(fd, (buf[done:length],), off + done)
        if n == 0:
            raise FileShrank(filesize)
        done += n


class _CDataPath(DataPath):
    """tftpd._datapath: pread, then sendmmsg of the whole batch."""

    name = "c"

    def __init__(self) -> None:
        super().__init__()
        if _ext is None:
            raise ImportError(_ext_error or "tftpd._datapath is not available")
        self._ffi = _ext.ffi
        self._lib = _ext.lib
        self._buf: Any = self._ffi.NULL
        self._gso = self._ffi.new("unsigned int *", 1 if self.gso else 0)  # the pump's
        self._seg = self._ffi.new("unsigned int *", 0)  # one send_window call's
        self._reqbuf: Any = None

    def _grow(self, size: int) -> None:
        self._buf = self._ffi.new("char[]", size)
        self._scratch_len = size

    def pump(self, transfers: int = 1024) -> Pump:
        return Pump(self, transfers)

    def _send(self, sock: socket.socket, addr: tuple[Any, ...], sockaddr: bytes, file_fd: int,
              first: int, count: int, blksize: int, filesize: int, rollover: int,
              image: bytes | None, gso: bool) -> tuple[int, bool]:
        self._seg[0] = 1 if gso else 0
        mem = self._ffi.from_buffer(image) if image is not None else self._ffi.NULL
        rc: int = self._lib.tftpd_send_window(
            sock.fileno(), sockaddr, len(sockaddr), file_fd, mem, filesize, blksize, first,
            count, rollover, self._buf, self._scratch_len, self._seg,
        )
        if rc >= 0:
            return rc, gso and not self._seg[0]
        if rc == -self._lib.TFTPD_ESHRANK:
            raise FileShrank(filesize)
        raise OSError(-rc, os.strerror(-rc))


    def requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                 refusals: Refusals | None, now: float,
                 limit: int = REQ_BATCH, starts: Pump | None = None) -> list[Request]:
        ffi, lib = self._ffi, self._lib
        if self._reqbuf is None:
            # 2 MiB of address space, never cleared: only the pages requests
            # land on are ever touched.
            self._reqbuf = self._ffi.new_allocator(should_clear_after_alloc=False)(
                "char[]", REQ_BATCH * REQ_MAX)
            self._reqs = ffi.new("struct tftpd_request[]", REQ_BATCH)
            self._reqview = ffi.buffer(self._reqbuf)
        table, size = ffi.NULL, 0
        if refusals is not None and errsock is not None and len(refusals):
            table, size = refusals.table, refusals.capacity
        n = lib.tftpd_requests(lsock.fileno(), errsock.fileno() if errsock is not None else -1,
                               1 if pktinfo else 0, table, size, now, min(limit, REQ_BATCH),
                               self._reqs, self._reqbuf, REQ_BATCH * REQ_MAX,
                               starts.starts if starts is not None else ffi.NULL)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        out: list[Request] = []
        family = lsock.family
        for i in range(n):
            q = self._reqs[i]
            if q.kind == REQ_STARTED or q.kind == REQ_MERGED:
                # C has the peer in the slot's struct: nothing to decode per probe.
                assert refusals is not None
                out.append((q.kind, refusals.get(q.id), q.err, b"", None, None, q.slot,
                            q.arrival, q.answered))
                continue
            src = decode_sockaddr(bytes(ffi.buffer(q.src, q.srclen)))
            if src is None:
                continue  # no address to answer: dropped, as the twin's recvmsg would
            dst = socket.inet_ntop(family, bytes(q.dst[0:q.dstlen])) if q.dstlen else None
            if q.kind == REQ_ANSWERED:
                assert refusals is not None
                out.append((REQ_ANSWERED, refusals.get(q.id), q.err, b"", src, dst, q.ifindex,
                            q.arrival, q.answered))
            else:
                data = self._reqview[q.off:q.off + q.len]
                out.append((REQ_PASS, None, 0, data, src, dst, q.ifindex, q.arrival, 0.0))
        return out


def drained(sock: socket.socket) -> bool:
    """Empty a spare socket of what strangers sent to its port while it waited;
    False if it keeps receiving (someone is flooding that port: take another)."""
    try:
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears a pending error
        for _ in range(64):
            sock.recv(1)  # a UDP recv drops the whole datagram
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False


def decode_sockaddr(raw: bytes) -> tuple[Any, ...] | None:
    """The socket-module address of a raw struct sockaddr_in / sockaddr_in6; None
    for anything else (no address at all, another family, too short)."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6:
        if len(raw) < 28:
            return None
        flowinfo, = struct.unpack_from("!I", raw, 4)
        scope, = struct.unpack_from("=I", raw, 24)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope)
    if family != socket.AF_INET:
        return None
    return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


# -- requests: the listen socket, and the refusals C may answer alone ----------------

def from_ancillary(family: int, anc: list) -> tuple[str | None, int, float]:
    """The request's destination address, arrival interface and arrival time."""
    dst, ifindex, arrival = None, 0, 0.0
    for level, kind, data in anc:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO \
                and len(data) >= _PKTINFO4.size:
            ifindex, _, addr = _PKTINFO4.unpack_from(data)
            dst = socket.inet_ntop(socket.AF_INET, addr)
        elif family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 \
                and kind == IPV6_PKTINFO and len(data) >= 20:
            dst = socket.inet_ntop(socket.AF_INET6, data[:16])
            ifindex = struct.unpack_from("=I", data, 16)[0]
        elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            arrival = sec + nsec / 1e9
    return dst, ifindex, arrival


def pktinfo_cmsg(family: int, local: str) -> tuple[int, int, bytes]:
    """The ancillary data that makes a reply leave from `local`."""
    if family == socket.AF_INET6:
        return (socket.IPPROTO_IPV6, IPV6_PKTINFO,
                socket.inet_pton(socket.AF_INET6, local) + struct.pack("=I", 0))
    return (socket.IPPROTO_IP, IP_PKTINFO,
            _PKTINFO4.pack(0, socket.inet_pton(socket.AF_INET, local), bytes(4)))


@dataclass(slots=True, eq=False)
class Refusal:
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


class Refusals:
    """The requests the data path answers without Python (tftpd_refusal in the header).

    Filled by the worker from its negative cache: one entry per distinct request
    datagram that named a missing file, for as long as the cache holds that miss.
    With the C data path the entries also live in a C table that `tftpd_requests`
    reads; the Python twin looks them up here, with the same rules.
    """

    def __init__(self, datapath: DataPath, capacity: int = 4096) -> None:
        if capacity & (capacity - 1) or capacity < 2:
            raise ValueError("capacity must be a power of two")
        self.capacity = capacity
        self._by_request: dict[bytes, Refusal] = {}
        self._by_id: dict[int, Refusal] = {}
        self._retired: dict[int, Refusal] = {}  # OACK entries that left the table
        self._ids = 0
        self._c = isinstance(datapath, _CDataPath)
        if self._c:
            assert isinstance(datapath, _CDataPath)
            self._ffi, self._lib = datapath._ffi, datapath._lib
            self._keep: dict[int, tuple[Any, Any, Any]] = {}
            self.table = self._ffi.new("struct tftpd_refusal[]", capacity)

    def __len__(self) -> int:
        return len(self._by_request)

    def get(self, ident: int) -> Refusal | None:
        r = self._by_id.get(ident)
        return r if r is not None else self._retired.get(ident)

    def put(self, request: bytes, reply: bytes, expires: float, dir: str,
            ident: Identity | None, note: Any = None, *,
            ifindex: int = 0, dstlen: int = 0, xfer: Any = None) -> Refusal:
        """Enter a known answer: an ERROR, or with `xfer` (C only) an OACK."""
        old = self._by_request.get(request)
        if old is not None:  # the same request again: refresh it in place
            self._retire(old)
        elif len(self._by_request) + 1 > self.capacity // 2:
            self._rebuild(time.monotonic())
        self._ids += 1
        r = Refusal(self._ids, request, reply, expires, dir, ident, note,
                    old.index if old is not None else -1, ifindex, dstlen, xfer)
        self._by_request[request] = r
        self._by_id[r.id] = r
        if self._c:
            self._enter(r)
        return r

    def current(self, request: bytes) -> Refusal | None:
        """The entry for this request, as it stands (no checks)."""
        return self._by_request.get(request)

    def _retire(self, r: Refusal) -> None:
        """An entry leaves the table. A transfer C started from it may still be
        live, so an OACK's entry stays at hand by id for a while (bounded)."""
        self._by_id.pop(r.id, None)
        if r.xfer is None:
            return
        if len(self._retired) >= self.capacity:
            for key in list(self._retired)[:self.capacity // 2]:  # the oldest half
                del self._retired[key]
        self._retired[r.id] = r

    def lookup(self, request: bytes, now: float) -> Refusal | None:
        """The twin of C's lookup: byte-identical, unexpired, the directory unchanged.
        An OACK entry is not the twin's to answer: it has no pump."""
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

    def _enter(self, r: Refusal) -> None:
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


EV_PACKET, EV_DONE, EV_ERROR, EV_READY, EV_PROBE, EV_REARM = 1, 2, 3, 4, 5, 6
PROBE_OFFERED = 2  # C offered the slot of a probe it ended again itself


class Pump:
    """C's lock-step for a set of transfer sockets (see tftpd_pump in the header).

    The worker registers each transfer's socket with a slot; `run` serves the
    ready ones and returns what Python must decide: (slot, kind, err, datagram,
    source). Only the C data path has one; the Python twin of a pump step is
    ReadTransfer.on_datagram itself.
    """

    MAX_EVENTS = 256
    PKTBUF = 256 * 1500
    SCRATCH = 1 << 20
    OFFER = 32  # free slots C is offered before each read: the most one read can start
    FREE_CAP = 1024  # room for slots C gives back itself when it ends a probe
    SPARES = 256  # new sockets for the next transfers (all local addresses)

    def __init__(self, datapath: _CDataPath, transfers: int = 1024) -> None:
        self._dp = datapath
        ffi, lib = datapath._ffi, datapath._lib
        self._ffi, self._lib = ffi, lib
        self.epoll = select.epoll()
        self._cap = 1024
        self._table = ffi.new("struct tftpd_xfer *[]", self._cap)
        self._states: dict[int, Any] = {}  # slot -> the struct (keeps it alive)
        self._tokens: list[int] = []  # the descriptors added by add_token
        self._free: list[int] = list(range(self._cap - 1, -1, -1))
        self._events = ffi.new("struct tftpd_event[]", self.MAX_EVENTS)
        # What C needs to start transfers (tftpd_starts in the header): the peer
        # table, free slots offered to it and spare sockets, all owned here.
        peers = 1024
        while peers < 4 * (transfers + self.OFFER) and peers < 1 << 22:
            peers *= 2
        st = self.starts = ffi.new("struct tftpd_starts *")
        self._peers = ffi.new("unsigned int[]", peers)
        self._offered = ffi.new("unsigned int[]", self.FREE_CAP)
        self._spares = ffi.new("struct tftpd_spare[]", self.SPARES)
        st.epfd = self.epoll.fileno()
        st.table, st.table_len = self._table, self._cap
        st.peers, st.peers_len = self._peers, peers
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
        self._lib.tftpd_peer_put(self.starts, slot)

    def release(self, slot: int) -> None:
        """Forget a slot. Its socket is about to be closed, which takes it out of
        the epoll set (its only descriptor goes): no epoll_ctl per transfer."""
        x = self._states.get(slot)
        if x is None:
            return
        self._lib.tftpd_peer_del(self.starts, slot)
        del self._states[slot]
        self._images.pop(slot, None)
        self._table[slot] = self._ffi.NULL
        self._free.append(slot)

    def add_token(self, fd: int) -> int:
        """Put one of Python's descriptors (a listen socket, the signal pipe, a
        selector) in the pump's epoll set; `run` reports it ready as
        (token, EV_READY, 0, b"", None) and stops waiting. Returns the token."""
        token = int(self._lib.TFTPD_TOKEN_BASE) + len(self._tokens)
        rc = self._lib.tftpd_epoll_set(self.epoll.fileno(), self._lib.TFTPD_EPOLL_ADD, fd,
                                       token)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        self._tokens.append(fd)
        return token

    def remove_token(self, fd: int, token: int) -> None:
        self._lib.tftpd_epoll_set(self.epoll.fileno(), self._lib.TFTPD_EPOLL_DEL, fd, token)

    def run(self, now: float, timeout: float = 0.0,
            max_ready: int = 256) -> list[tuple[int, int, int, bytes, tuple[Any, ...] | None]]:
        """Serve ready transfers; wait up to `timeout` s for something for Python
        (an event, a ready token), answering ACKs in C meanwhile."""
        dp = self._dp
        ms = min(int(timeout * 1000.0 + 0.999), 86_400_000) if timeout > 0 else 0
        dp._gso[0] = 1 if dp.gso else 0
        n = self._lib.tftpd_pump(self.epoll.fileno(), self._table, self._cap, now, ms,
                                 max_ready, self._events, self.MAX_EVENTS, self._pktbuf,
                                 self.PKTBUF, dp._buf, dp._scratch_len, dp._gso,
                                 self.starts)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        out = []
        ev = self._events
        for i in range(n):
            e = ev[i]
            if e.kind == EV_PACKET:
                data = self._buffer[e.off:e.off + e.len]
                src = decode_sockaddr(bytes(self._ffi.buffer(e.src, e.srclen)))
                if src is not None:  # else no address to answer: dropped
                    out.append((e.slot, EV_PACKET, 0, data, src))
            elif e.kind == EV_PROBE:  # (slot, EV_PROBE, error code, what C took back, peer)
                src = decode_sockaddr(bytes(self._ffi.buffer(e.src, e.srclen)))
                out.append((e.slot, EV_PROBE, e.err, e.off, src))
            elif e.kind == EV_ERROR and e.err == self._lib.TFTPD_ESHRANK:
                out.append((e.slot, EV_ERROR, -1, b"", None))
            else:
                out.append((e.slot, e.kind, e.err, b"", None))
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
        return x is not None and x.probe == 1

    def adopt(self, slot: int) -> tuple[Any, socket.socket | None]:
        """Python takes over a transfer C started: its struct and its socket."""
        x = self._states[slot]
        x.probe = 0
        self.starts.live -= 1
        sock = self._socks.pop(x.sock, (None, b""))[0]
        return x, sock

    def ended(self, slot: int, back: int) -> None:
        """A transfer C started and ended (EV_PROBE): its socket is closed (a port
        serves one client), and its slot taken back unless C offered it again
        itself (`back` has PROBE_OFFERED)."""
        kept = self._socks.pop(self._states[slot].sock, None)
        if kept is not None:
            kept[0].close()
        if not back & PROBE_OFFERED:
            self._unoffer(slot)

    def template(self, state: Any) -> Any:
        """A copy of a transfer's struct, for C to start the next ones from (no
        socket, file or peer: C sets the socket and the peer, Python the file)."""
        x = self._ffi.new("struct tftpd_xfer *")
        self._ffi.memmove(x, state, self._ffi.sizeof("struct tftpd_xfer"))
        x.sock, x.fd, x.addrlen, x.probe, x.answer = -1, -1, 0, 0, 0
        x.mem = self._ffi.NULL  # another transfer's image: Python sets the file on adoption
        return x

    def peer(self, slot: int) -> tuple[Any, ...]:
        x = self._states[slot]
        return decode_sockaddr(bytes(self._ffi.buffer(x.addr, x.addrlen)))

    def spare_room(self) -> bool:
        return self.starts.nspares < self.SPARES

    def find(self, sockaddr: bytes) -> int:
        """The slot of the transfer serving this peer (encode_sockaddr), or -1."""
        return int(self._lib.tftpd_peer_find(self.starts, sockaddr, len(sockaddr)))

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


def _load_ext() -> tuple[Any, str | None]:
    try:
        from tftpd import _datapath  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the C data path tftpd._datapath is not built ({exc})"
    version = _datapath.lib.TFTPD_DATAPATH_VERSION
    if version != EXT_VERSION:
        return None, (
            f"the C data path tftpd._datapath is version {version}, this tftpd "
            f"expects {EXT_VERSION}: rebuild it (pip install -e . or "
            "python3 setup.py build_ext --inplace)"
        )
    if _datapath.lib.TFTPD_MAX_BATCH != BATCH:
        return None, (
            f"the C data path batches {_datapath.lib.TFTPD_MAX_BATCH} blocks, "
            f"the Python twin {BATCH}: rebuild it"
        )
    if _datapath.lib.TFTPD_PROBE_OFFERED != PROBE_OFFERED:
        return None, "the C data path reports probes otherwise: rebuild it"
    if (_datapath.lib.TFTPD_REQ_MAX, _datapath.lib.TFTPD_REQ_BATCH) != (REQ_MAX, REQ_BATCH):
        return None, "the C data path reads requests in other batches than the twin: rebuild it"
    # The tables' hash key: random, so that no client can aim at one chain.
    _datapath.lib.tftpd_hash_key(int.from_bytes(os.urandom(8), "little"),
                                 int.from_bytes(os.urandom(8), "little"))
    return _datapath, None


_ext, _ext_error = _load_ext()
_warned = False


def ext_error() -> str | None:
    """Why the C data path is unavailable, or None when it loaded."""
    return _ext_error


def get_datapath(force: str | None = None) -> DataPath:
    """A new DataPath: C when the extension loaded, else Python (with a warning, once).

    ``force`` (or else the environment variable ``TFTPD_DATAPATH``) set to
    ``"c"`` or ``"python"`` picks one; forcing ``"c"`` without the extension
    raises ImportError.
    """
    global _warned
    choice = force if force is not None else os.environ.get(_ENV, "").strip().lower() or None
    if choice not in (None, "c", "python"):
        raise ValueError(f"data path must be 'c' or 'python', not {choice!r}")
    if choice == "python":
        return _PythonDataPath()
    if choice == "c":
        if _ext is None:
            raise ImportError(f"{_ext_error}; it was required (force='c' or {_ENV}=c)")
        return _CDataPath()
    if _ext is not None:
        return _CDataPath()
    if not _warned:
        _warned = True
        warnings.warn(f"{_ext_error}; using the slower pure-Python data path",
                      RuntimeWarning, stacklevel=2)
    return _PythonDataPath()
