"""The data path, over both implementations: exact datagrams on loopback.

Every test that sends runs once with the C extension and once with the
pure-Python twin (the ``datapath`` fixture).  The C run is skipped when the
extension is not built, unless TFTPD_REQUIRE_EXT=1 (CI), where that fails.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEEP_IO, need_ext, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tftpd
from tftpd import datapath as dp_module
from tftpd.datapath import (
    BATCH,
    MAX_BLKSIZE,
    DataPath,
    FileShrank,
    encode_sockaddr,
    ext_error,
    get_datapath,
    wire_block,
)


@pytest.fixture(params=["c", "python"])
def datapath(request: pytest.FixtureRequest) -> DataPath:
    if request.param == "c":
        need_ext()
    return get_datapath(request.param)


# --- helpers -----------------------------------------------------------------


def expected(data: bytes, filesize: int, blksize: int, first: int, count: int,
             rollover: int = 0) -> list[bytes]:
    """The datagrams the contract says blocks first..first+count-1 are."""
    out = []
    for k in range(first, first + count):
        wire = wire_block(k, rollover)
        start = (k - 1) * blksize
        payload = data[start:min(start + blksize, filesize)]
        out.append(bytes([0, 3, wire >> 8, wire & 0xFF]) + payload)
    return out


class Receiver:
    """A UDP socket on loopback that collects what the data path sends."""

    def __init__(self, family: int = socket.AF_INET, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # Room for a whole window, so loopback never drops: forced past
        # rmem_max when we are root (CI is), else as much as allowed.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, 64 << 20)
        except (OSError, AttributeError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.sock.bind((host, 0))
        self.addr: tuple[Any, ...] = self.sock.getsockname()
        self.sockaddr = encode_sockaddr(self.addr)

    def take(self, n: int) -> list[bytes]:
        """Exactly n datagrams, then check nothing else arrived."""
        self.sock.settimeout(2.0)
        got = [self.sock.recv(MAX_BLKSIZE + 4 + 100) for _ in range(n)]
        self.sock.settimeout(0.02)
        try:
            extra = self.sock.recv(MAX_BLKSIZE + 4 + 100)
        except TimeoutError:
            return got
        raise AssertionError(f"more than {n} datagrams arrived (next: {extra[:4].hex()})")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)  # as in the worker
    yield s
    s.close()


def open_file(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.fixture
def make_file(tmp_path: Path) -> Iterator[Any]:
    fds: list[int] = []

    def make(data: bytes, name: str = "f") -> int:
        fd = open_file(tmp_path / name, data)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send(dp: DataPath, sock: socket.socket, r: Receiver, fd: int, first: int, count: int,
         blksize: int, filesize: int, rollover: int = 0) -> int:
    return dp.send_window(sock, r.addr, r.sockaddr, fd, first, count, blksize, filesize,
                          rollover)


# --- wire numbers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "rollover", "wire"),
    [
        (1, 0, 1), (65534, 0, 65534), (65535, 0, 65535), (65536, 0, 0), (65537, 0, 1),
        (131071, 0, 65535), (131072, 0, 0), (131073, 0, 1),
        (1, 1, 1), (65535, 1, 65535), (65536, 1, 1), (65537, 1, 2),
        # Rolling to 1 makes a lap 65535 blocks long: 65536 + 65534 is 65535 again.
        (131070, 1, 65535), (131071, 1, 1), (131072, 1, 2),
        (196605, 1, 65535), (196606, 1, 1),
    ],
)
def test_wire_block(k: int, rollover: int, wire: int) -> None:
    assert wire_block(k, rollover) == wire
    if ext_error() is None:
        from tftpd import _datapath  # type: ignore[attr-defined]

        assert _datapath.lib.tftpd_wire_block(k, rollover) == wire


# --- exact datagrams -----------------------------------------------------------


def test_window_exact(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                      make_file: Any) -> None:
    data = os.urandom(5 * 512 + 100)
    fd = make_file(data)
    assert send(datapath, sender, receiver, fd, 1, 6, 512, len(data)) == 6
    got = receiver.take(6)
    assert got == expected(data, len(data), 512, 1, 6)
    assert [len(g) for g in got] == [516] * 5 + [104]  # last block short


def test_empty_last_block(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                          make_file: Any) -> None:
    # A file that fills its blocks exactly ends with an empty block (RFC 1350).
    data = os.urandom(4 * 512)
    fd = make_file(data)
    assert send(datapath, sender, receiver, fd, 3, 3, 512, len(data)) == 3
    got = receiver.take(3)
    assert got == expected(data, len(data), 512, 3, 3)
    assert got[-1] == b"\x00\x03\x00\x05"


def test_empty_file(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                    make_file: Any) -> None:
    fd = make_file(b"")
    assert send(datapath, sender, receiver, fd, 1, 1, 512, 0) == 1
    assert receiver.take(1) == [b"\x00\x03\x00\x01"]


def test_window_across_batches(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                               make_file: Any) -> None:
    blksize = 64
    count = 2 * BATCH + 10
    data = os.urandom(blksize * count - 7)
    fd = make_file(data)
    assert send(datapath, sender, receiver, fd, 1, count, blksize, len(data)) == count
    assert receiver.take(count) == expected(data, len(data), blksize, 1, count)


@pytest.mark.parametrize("blksize", [8, 9, 1428, 1468, 8192, MAX_BLKSIZE])
def test_block_sizes(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                     make_file: Any, blksize: int) -> None:
    data = os.urandom(blksize * 3 + 5)
    fd = make_file(data)
    assert send(datapath, sender, receiver, fd, 1, 4, blksize, len(data)) == 4
    assert receiver.take(4) == expected(data, len(data), blksize, 1, 4)


def test_file_grew_sends_only_filesize(datapath: DataPath, receiver: Receiver,
                                       sender: socket.socket, make_file: Any) -> None:
    # The size taken at the start is what the transfer promised (tsize).
    data = os.urandom(1000)
    fd = make_file(data + b"grown later")
    assert send(datapath, sender, receiver, fd, 1, 2, 512, len(data)) == 2
    assert receiver.take(2) == expected(data, len(data), 512, 1, 2)


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize(("blksize", "count"), [(512, 6), (64, 2 * BATCH + 10), (1456, 16)])
def test_an_image_is_sent_as_the_file_would_be(datapath: DataPath, receiver: Receiver,
                                                sender: socket.socket, gso: bool,
                                                blksize: int, count: int) -> None:
    """From a file's image (OpenFile.image), not its descriptor: none is given."""
    data = os.urandom(blksize * count - 7)
    datapath.gso = gso
    assert datapath.send_window(sender, receiver.addr, receiver.sockaddr, -1, 1, count,
                                blksize, len(data), 0, data) == count
    assert receiver.take(count) == expected(data, len(data), blksize, 1, count)
    with pytest.raises(ValueError):
        datapath.send_window(sender, receiver.addr, receiver.sockaddr, -1, 1, 1, blksize,
                             len(data) + 1, 0, data)


@pytest.mark.parametrize("rollover", [0, 1])
def test_send_across_rollover(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                              make_file: Any, rollover: int) -> None:
    blksize = 8
    first, count = 65533, 6
    data = os.urandom(blksize * (first + count))
    fd = make_file(data)
    assert send(datapath, sender, receiver, fd, first, count, blksize, len(data), rollover) == 6
    got = receiver.take(count)
    assert got == expected(data, len(data), blksize, first, count, rollover)
    wires = [int.from_bytes(g[2:4], "big") for g in got]
    assert wires == [65533, 65534, 65535] + ([0, 1, 2] if rollover == 0 else [1, 2, 3])


def test_offsets_past_4gib(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                           tmp_path: Path) -> None:
    # A sparse file, so the test writes only the bytes it reads back.
    blksize = MAX_BLKSIZE
    filesize = 5 << 30
    first = (4 << 30) // blksize + 2  # starts past 4 GiB, wire numbers past one lap
    path = tmp_path / "big"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, filesize)
        payload = os.urandom(2 * blksize)
        os.pwrite(fd, payload, (first - 1) * blksize)
        assert send(datapath, sender, receiver, fd, first, 2, blksize, filesize) == 2
        got = receiver.take(2)
    finally:
        os.close(fd)
    assert [g[4:] for g in got] == [payload[:blksize], payload[blksize:]]
    assert [int.from_bytes(g[2:4], "big") for g in got] == [
        wire_block(first, 0), wire_block(first + 1, 0)
    ]


def test_ipv6_loopback(datapath: DataPath, make_file: Any) -> None:
    try:
        r = Receiver(socket.AF_INET6, "::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        assert len(r.addr) == 4 and len(r.sockaddr) == 28
        data = os.urandom(2500)
        fd = make_file(data)
        assert send(datapath, s, r, fd, 1, 3, 1024, len(data)) == 3
        assert r.take(3) == expected(data, len(data), 1024, 1, 3)
    finally:
        s.close()
        r.close()


def test_c_and_python_identical(receiver: Receiver, sender: socket.socket,
                                make_file: Any) -> None:
    need_ext()
    data = os.urandom(600_003)
    fd = make_file(data)
    runs = []
    for name in ("c", "python"):
        dp = get_datapath(name)
        n = send(dp, sender, receiver, fd, 65500, 80, 8, len(data), 1)
        runs.append(receiver.take(n))
        n = send(dp, sender, receiver, fd, 1, 101, 700, len(data))
        runs[-1] += receiver.take(n)
    assert runs[0] == runs[1]
    assert runs[0] == (expected(data, len(data), 8, 65500, 80, 1)
                       + expected(data, len(data), 700, 1, 101))


# --- errors ---------------------------------------------------------------------


def test_file_shrank(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                     tmp_path: Path) -> None:
    data = os.urandom(5000)
    path = tmp_path / "f"
    fd = open_file(path, data)
    try:
        filesize = os.fstat(fd).st_size
        os.truncate(path, 3000)  # shrinks after the size was taken
        with pytest.raises(FileShrank) as info:
            send(datapath, sender, receiver, fd, 1, 10, 512, filesize)
    finally:
        os.close(fd)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.EIO
    # The window is one batch, read whole before any of it is sent: nothing went out.
    receiver.take(0)


def test_file_shrank_in_a_later_batch(datapath: DataPath, receiver: Receiver,
                                      sender: socket.socket, tmp_path: Path) -> None:
    blksize = 64
    data = os.urandom(blksize * 100)
    path = tmp_path / "f"
    fd = open_file(path, data)
    try:
        os.truncate(path, blksize * 70)
        with pytest.raises(FileShrank):
            send(datapath, sender, receiver, fd, 1, 100, blksize, len(data))
    finally:
        os.close(fd)
    # The first batch went out whole and correct; nothing of the short one did.
    assert receiver.take(BATCH) == expected(data, len(data), blksize, 1, BATCH)


def test_file_shrank_mid_block(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                               tmp_path: Path) -> None:
    data = os.urandom(1024)
    path = tmp_path / "f"
    fd = open_file(path, data)
    try:
        os.truncate(path, 1000)
        with pytest.raises(FileShrank):
            send(datapath, sender, receiver, fd, 2, 1, 512, len(data))
    finally:
        os.close(fd)
    receiver.take(0)  # never a short block 2


def test_real_send_error_raises(datapath: DataPath, sender: socket.socket,
                                make_file: Any) -> None:
    # Linux refuses UDP to port 0 with EINVAL: an error that is not back-pressure.
    fd = make_file(b"x" * 100)
    addr = ("127.0.0.1", 0)
    with pytest.raises(OSError) as info:
        datapath.send_window(sender, addr, encode_sockaddr(addr), fd, 1, 1, 512, 100)
    assert info.value.errno == errno.EINVAL
    assert not isinstance(info.value, FileShrank)


def test_read_error_raises(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                           tmp_path: Path) -> None:
    fd = open_file(tmp_path / "f", b"x" * 100)
    os.close(fd)
    with pytest.raises(OSError) as info:
        send(datapath, sender, receiver, fd, 1, 1, 512, 100)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(
    ("first", "count", "blksize", "filesize", "rollover"),
    [
        (1, 0, 512, 1000, 0),  # count < 1
        (0, 1, 512, 1000, 0),  # first < 1
        (1, 1, 7, 1000, 0),  # blksize below RFC 2348
        (1, 1, 65465, 1000, 0),  # blksize above RFC 2348
        (1, 1, 512, 1000, 2),  # rollover neither 0 nor 1
        (3, 1, 512, 1000, 0),  # block 3 does not exist in 1000 bytes (1, 2 do)
        (2, 2, 512, 1000, 0),  # the window runs past the last block
        (4, 1, 512, 1024, 0),  # 1024 bytes: blocks 1..3, block 3 empty
        (1, 1, 512, -1, 0),  # negative size
    ],
)
def test_bad_arguments(datapath: DataPath, receiver: Receiver, sender: socket.socket,
                       make_file: Any, first: int, count: int, blksize: int, filesize: int,
                       rollover: int) -> None:
    fd = make_file(b"x" * 1024)
    with pytest.raises(ValueError):
        send(datapath, sender, receiver, fd, first, count, blksize, filesize, rollover)
    receiver.take(0)


def test_bad_sockaddr(datapath: DataPath, sender: socket.socket, make_file: Any) -> None:
    fd = make_file(b"x")
    for bad in (b"", b"x" * 129):
        with pytest.raises(ValueError):
            datapath.send_window(sender, ("127.0.0.1", 9), bad, fd, 1, 1, 512, 1)


# --- back-pressure -------------------------------------------------------------


def test_back_pressure(datapath: DataPath, make_file: Any, tmp_path: Path) -> None:
    """A full socket stops the window: the count sent comes back, nothing is raised.

    UDP over loopback cannot show this: the loopback device orphans every
    packet from the sending socket as it transmits it, so the send buffer
    never fills (and a full receive queue drops silently).  An AF_UNIX
    datagram socket does push back: its packets stay charged to the sender
    until the receiver reads them, so a sender with a tiny SO_SNDBUF gets
    EAGAIN after a few.  The data path is address-family agnostic (it takes
    a raw sockaddr), so this exercises exactly the EAGAIN handling a UDP
    socket would get from a busy NIC queue.
    """
    path = str(tmp_path / "sink")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    src = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    src.setblocking(False)
    src.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
    sockaddr = socket.AF_UNIX.to_bytes(2, sys.byteorder) + path.encode() + b"\0"
    blksize, count = 512, 100
    data = os.urandom(blksize * count)
    fd = make_file(data)
    try:
        n = datapath.send_window(src, path, sockaddr, fd, 1, count, blksize, len(data))  # type: ignore[arg-type]
        assert 0 < n < count
        # Still full: the very first datagram is refused, which is 0, not an error.
        assert datapath.send_window(src, path, sockaddr, fd, n + 1, count - n, blksize,  # type: ignore[arg-type]
                                    len(data)) == 0
        sink.setblocking(False)
        got = []
        while True:
            try:
                got.append(sink.recv(blksize + 4))
            except BlockingIOError:
                break
        # Exactly the datagrams reported, and they are blocks 1..n.
        assert got == expected(data, len(data), blksize, 1, n)
        # Drained: the window resumes where it stopped.
        m = datapath.send_window(src, path, sockaddr, fd, n + 1, 1, blksize, len(data))  # type: ignore[arg-type]
        assert m == 1
        assert sink.recv(blksize + 4) == expected(data, len(data), blksize, n + 1, 1)[0]
    finally:
        src.close()
        sink.close()


def test_udp_tiny_sndbuf_counts_what_arrived(datapath: DataPath, receiver: Receiver,
                                             make_file: Any) -> None:
    # On loopback a tiny SO_SNDBUF may or may not push back (see test_back_pressure);
    # whatever the kernel does, the count returned is exactly what was delivered,
    # never more, and no exception escapes.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    blksize, count = 1468, 64
    data = os.urandom(blksize * count)
    fd = make_file(data)
    try:
        n = send(datapath, s, receiver, fd, 1, count, blksize, len(data))
    finally:
        s.close()
    assert 0 <= n <= count
    assert receiver.take(n) == expected(data, len(data), blksize, 1, n)


# --- sockaddr encoding -----------------------------------------------------------


def _raw_sockname(sock: socket.socket) -> bytes:
    """The kernel's own struct sockaddr for a bound socket, via getsockname(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    if libc.getsockname(sock.fileno(), buf, ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "getsockname")
    return buf.raw[: size.value]


def test_encode_sockaddr_matches_kernel_ipv4(receiver: Receiver) -> None:
    assert encode_sockaddr(receiver.addr) == _raw_sockname(receiver.sock)


def test_encode_sockaddr_matches_kernel_ipv6() -> None:
    try:
        r = Receiver(socket.AF_INET6, "::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert encode_sockaddr(r.addr) == _raw_sockname(r.sock)
    finally:
        r.close()


def test_encode_sockaddr_fields() -> None:
    raw = encode_sockaddr(("10.1.2.3", 69))
    assert len(raw) == 16
    assert int.from_bytes(raw[:2], sys.byteorder) == socket.AF_INET
    assert raw[2:4] == b"\x00\x45" and raw[4:8] == bytes([10, 1, 2, 3])
    raw6 = encode_sockaddr(("fe80::1%lo", 69, 0x12345, 7))
    assert len(raw6) == 28
    assert int.from_bytes(raw6[:2], sys.byteorder) == socket.AF_INET6
    assert raw6[4:8] == (0x12345).to_bytes(4, "big")
    assert raw6[8:24] == socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert int.from_bytes(raw6[24:], sys.byteorder) == 7
    assert encode_sockaddr(("::1", 69)) == encode_sockaddr(("::1", 69, 0, 0))


@pytest.mark.parametrize(
    "bad",
    [("127.0.0.1",), ("127.0.0.1", 70000), ("localhost", 69), ("127.0.0.1", 69, 0, 0),
     ("::1", 69, -1, 0), ("::zz", 69, 0, 0), "127.0.0.1", (1, 2)],
)
def test_encode_sockaddr_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        encode_sockaddr(bad)


# --- choosing the implementation -------------------------------------------------


def test_force_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TFTPD_DATAPATH", raising=False)
    assert get_datapath("python").name == "python"
    monkeypatch.setenv("TFTPD_DATAPATH", "python")
    assert get_datapath().name == "python"
    with pytest.raises(ValueError):
        get_datapath("rust")


def test_default_prefers_c(monkeypatch: pytest.MonkeyPatch) -> None:
    need_ext()
    monkeypatch.delenv("TFTPD_DATAPATH", raising=False)
    assert get_datapath().name == "c"
    monkeypatch.setenv("TFTPD_DATAPATH", "c")
    assert get_datapath().name == "c"


def test_missing_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TFTPD_DATAPATH", raising=False)
    monkeypatch.setattr(dp_module, "_ext", None)
    monkeypatch.setattr(dp_module, "_ext_error", "tftpd._datapath is not built (test)")
    monkeypatch.setattr(dp_module, "_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-Python"):
        assert get_datapath().name == "python"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: silent now
        assert get_datapath().name == "python"
    with pytest.raises(ImportError, match="not built"):
        get_datapath("c")
    monkeypatch.setenv("TFTPD_DATAPATH", "c")
    with pytest.raises(ImportError, match="not built"):
        get_datapath()


def test_stale_extension_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Lib:
        TFTPD_DATAPATH_VERSION = dp_module.EXT_VERSION + 1
        TFTPD_MAX_BATCH = BATCH

    class Module:
        lib = Lib

    monkeypatch.setattr(tftpd, "_datapath", Module, raising=False)
    monkeypatch.setitem(sys.modules, "tftpd._datapath", Module)
    ext, reason = dp_module._load_ext()
    assert ext is None and reason is not None and "rebuild" in reason


# --- the property: C and Python send the same datagrams ---------------------------

_BIG = os.urandom(200_000)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Receiver, socket.socket, int]]:
    import tempfile

    r = Receiver()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    with tempfile.TemporaryDirectory() as d:
        fd = open_file(Path(d) / "big", _BIG)
        try:
            yield r, s, fd
        finally:
            os.close(fd)
            s.close()
            r.close()


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    blksize = draw(st.one_of(st.integers(8, 600), st.sampled_from([512, 1428, 1468, 4096])))
    filesize = draw(st.integers(0, len(_BIG)))
    last_block = filesize // blksize + 1
    first = draw(st.integers(1, last_block))
    count = draw(st.integers(1, min(last_block - first + 1, 2 * BATCH + 20)))
    rollover = draw(st.integers(0, 1))
    return filesize, blksize, first, count, rollover


@settings(max_examples=scaled(150, deep=DEEP_IO), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(window=windows())
def test_property_c_equals_python(shared: tuple[Receiver, socket.socket, int],
                                  window: tuple[int, int, int, int, int]) -> None:
    need_ext()
    r, s, fd = shared
    filesize, blksize, first, count, rollover = window
    want = expected(_BIG, filesize, blksize, first, count, rollover)
    for name in ("c", "python"):
        dp = get_datapath(name)
        assert send(dp, s, r, fd, first, count, blksize, filesize, rollover) == count
        assert r.take(count) == want, name


@pytest.mark.parametrize("blksize,count,filesize", [(512, 16, 512 * 16), (1456, 40, 50_000),
                                                    (8192, 9, 70_000), (65464, 2, 100_000)])
def test_segmented_and_plain_sends_put_the_same_datagrams_on_the_wire(
        datapath: DataPath, tmp_path: Path, blksize: int, count: int, filesize: int) -> None:
    """UDP segmentation (one sendmsg for a window) is an optimisation only."""
    data = os.urandom(filesize)
    path = tmp_path / "f"
    path.write_bytes(data)
    seen = []
    for gso in (True, False):
        dp = get_datapath(datapath.name)
        dp.gso = gso
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.settimeout(2)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fd = os.open(path, os.O_RDONLY)
        try:
            n = min(count, filesize // blksize + 1)
            assert dp.send_window(tx, rx.getsockname(), encode_sockaddr(rx.getsockname()), fd,
                                  1, n, blksize, filesize) == n
            seen.append([rx.recv(70000) for _ in range(n)])
            assert dp.gso == gso  # loopback takes segmentation: it was really used
        finally:
            os.close(fd)
            rx.close()
            tx.close()
    assert seen[0] == seen[1]
    assert [d[4:] for d in seen[0]] == [data[i * blksize:(i + 1) * blksize]
                                        for i in range(len(seen[0]))]


@given(st.binary(max_size=40))
def test_decode_sockaddr_takes_any_bytes(raw: bytes) -> None:
    # A source address C could not read (none at all, a family of another kind)
    # is None, which the data path drops: never an exception in the worker.
    from tftpd.datapath import decode_sockaddr, encode_sockaddr

    got = decode_sockaddr(raw)
    if got is not None:
        assert encode_sockaddr(got)[:8] == raw[:8]


def test_decode_sockaddr_round_trips() -> None:
    from tftpd.datapath import decode_sockaddr, encode_sockaddr

    for addr in (("10.1.2.3", 69), ("::1", 6969, 0, 0), ("fe80::1", 1, 0, 2)):
        assert decode_sockaddr(encode_sockaddr(addr)) == addr
    assert decode_sockaddr(b"") is None
