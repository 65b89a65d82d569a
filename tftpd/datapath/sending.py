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
import socket
import struct
from typing import TYPE_CHECKING, Any

from tftpd.datapath import intake
from tftpd.datapath.events import Request
from tftpd.datapath.ext import BATCH, REQ_BATCH
from tftpd.datapath.net import SOCKADDR_STORAGE
from tftpd.transfer import wire_block  # the state machine's rule, used here

if TYPE_CHECKING:
    from tftpd.datapath.known import KnownAnswers
    from tftpd.datapath.pump import Pump

__all__ = ["MAX_BLKSIZE", "MIN_BLKSIZE", "CDataPath", "DataPath", "FileShrank", "PythonDataPath"]

MIN_BLKSIZE = 8  # RFC 2348
MAX_BLKSIZE = 65464  # RFC 2348

_OPCODE_DATA = 3
_SOL_UDP, _UDP_SEGMENT = 17, 103  # linux/udp.h
_GSO_MAX_BYTES = 65000  # TFTPD_GSO_MAX_BYTES
_NO_GSO = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
                     errno.EMSGSIZE})
_BACK_PRESSURE = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})


class FileShrank(OSError):
    """The file ended before a block it had to supply: it shrank after its size was taken.

    An OSError with errno EIO, so callers that map errno to a TFTP error need
    no special case.
    """

    def __init__(self, filesize: int) -> None:
        super().__init__(errno.EIO, f"file shrank below the {filesize} bytes being sent")
        self.filesize = filesize


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

    def requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                 answers: KnownAnswers | None, now: float,
                 limit: int = REQ_BATCH, starts: Pump | None = None) -> list[Request]:
        """Read up to `limit` requests waiting on the listen socket (none: []).

        A request `answers` knows is answered from `errsock` at once (from the
        address it was sent to, with `pktinfo`) and reported as REQ_ANSWERED with
        its KnownAnswer; every other one is REQ_PASS, for the worker to serve.
        Each is a `Request` (events.py): err is the failed answer's errno or 0;
        destination, ifindex and arrival (realtime) come from the socket's
        ancillary data (None/0 if not given); answered is the realtime the answer
        went out.  OSError when the listen socket fails.

        With `starts` (the C data path's Pump), a request whose known answer is an
        OACK starts its transfer in C (tftpd_requests in the header): REQ_STARTED,
        with the transfer's `slot` and no source (the slot's struct has the peer);
        the exact repeat of such a request from the same peer is REQ_MERGED,
        likewise. The twin has no pump: it never starts a transfer, and its lookup
        passes OACK entries to the worker.
        """
        return self._requests(lsock, errsock, pktinfo, answers, now, min(limit, REQ_BATCH),
                              starts)

    @abc.abstractmethod
    def _requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                  answers: KnownAnswers | None, now: float, limit: int,
                  starts: Pump | None) -> list[Request]:
        """requests(), by this data path (tftpd.datapath.intake)."""

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
    if not isinstance(sockaddr, bytes) or not 0 < len(sockaddr) <= SOCKADDR_STORAGE:
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


class PythonDataPath(DataPath):
    """os.preadv into a bytearray, then socket.sendmsg per block (or one segmented
    sendmsg per batch).  C twin of _send: tftpd_send_window (_ext/tftpd_send.c)."""

    name = "python"

    def __init__(self) -> None:
        super().__init__()
        self._buf = memoryview(bytearray(0))

    def _grow(self, size: int) -> None:
        self._buf = memoryview(bytearray(size))
        self._scratch_len = size

    def _requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                  answers: KnownAnswers | None, now: float, limit: int,
                  starts: Pump | None) -> list[Request]:
        return intake.python_requests(lsock, errsock, pktinfo, answers, now, limit)

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
        """n blocks, header and payload back to back, one sendmsg with UDP_SEGMENT:
        n, 0 on back-pressure, None if refused. C twin: tftpd_send_gso (tftpd_send.c)."""
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

def _read_full(fd: int, buf: memoryview, length: int, off: int, filesize: int) -> None:
    done = 0
    while done < length:
        n = os.preadv(fd, (buf[done:length],), off + done)
        if n == 0:
            raise FileShrank(filesize)
        done += n


class CDataPath(DataPath):
    """tftpd._datapath: pread, then sendmmsg of the whole batch."""

    name = "c"

    def __init__(self, ext: Any) -> None:
        """`ext`: the loaded tftpd._datapath (see tftpd.datapath.get_datapath)."""
        super().__init__()
        self._ffi = ext.ffi
        self._lib = ext.lib
        self._buf: Any = self._ffi.NULL
        self._gso = self._ffi.new("unsigned int *", 1 if self.gso else 0)  # the pump's
        self._seg = self._ffi.new("unsigned int *", 0)  # one send_window call's
        self._shrank = self._ffi.new("int *", 0)
        self._intake: Any = None  # intake.CIntake, made on first use

    def _grow(self, size: int) -> None:
        self._buf = self._ffi.new("char[]", size)
        self._scratch_len = size

    def _requests(self, lsock: socket.socket, errsock: socket.socket | None, pktinfo: bool,
                  answers: KnownAnswers | None, now: float, limit: int,
                  starts: Pump | None) -> list[Request]:
        return intake.c_requests(self, lsock, errsock, pktinfo, answers, now, limit, starts)

    def pump(self, transfers: int = 1024) -> Pump:
        from tftpd.datapath.pump import Pump  # the pump builds on this class

        return Pump(self, transfers)

    def _send(self, sock: socket.socket, addr: tuple[Any, ...], sockaddr: bytes, file_fd: int,
              first: int, count: int, blksize: int, filesize: int, rollover: int,
              image: bytes | None, gso: bool) -> tuple[int, bool]:
        self._seg[0] = 1 if gso else 0
        mem = self._ffi.from_buffer(image) if image is not None else self._ffi.NULL
        rc: int = self._lib.tftpd_send_window(
            sock.fileno(), sockaddr, len(sockaddr), file_fd, mem, filesize, blksize, first,
            count, rollover, self._buf, self._scratch_len, self._seg, self._shrank,
        )
        if self._shrank[0]:
            raise FileShrank(filesize)
        if rc >= 0:
            return rc, gso and not self._seg[0]
        raise OSError(-rc, os.strerror(-rc))
