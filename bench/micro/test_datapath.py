"""tftpd.datapath: the per-block send path, C and pure Python, lock-step and windowed.

Datagrams go to a receiver on 127.0.0.1 inside a network namespace made for the run (root
needed; skipped otherwise). Every benchmark has a fixed number of rounds, so the traffic
is bounded in count: at most ROUNDS x 64 datagrams per case. The receiver is drained
between rounds, outside the timed part.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from bench import netns
from bench.micro.conftest import need_module

datapath = need_module("tftpd.datapath")

ROUNDS = 300
FILESIZE = 1 << 20


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: datagrams are sent only inside a network namespace")
    why = netns.available()
    if why:
        pytest.skip(why)
    netns.cleanup_stale()
    name = netns.create("micro")
    try:
        yield name
    finally:
        netns.delete(name)


@pytest.fixture(scope="module")
def file_fd() -> Iterator[int]:
    with tempfile.TemporaryFile() as fh:
        fh.write(os.urandom(FILESIZE))
        fh.flush()
        yield fh.fileno()


@pytest.fixture(params=["c", "python"])
def path(request: pytest.FixtureRequest) -> Any:
    if request.param == "c" and datapath.ext_error():
        pytest.skip(f"C data path not built: {datapath.ext_error()}")
    return datapath.get_datapath(request.param)


@pytest.fixture
def pair(ns: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    with netns.inside(ns):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.bind(("127.0.0.1", 0))
        tx.setblocking(False)
        yield tx, rx
    finally:
        rx.close()
        tx.close()


def _drain(rx: socket.socket) -> int:
    n = 0
    for _ in range(10000):
        try:
            rx.recv(65536)
        except BlockingIOError:
            break
        n += 1
    return n


def _bench_window(benchmark: Any, path: Any, pair: tuple[socket.socket, socket.socket],
                  fd: int, count: int, blksize: int) -> None:
    tx, rx = pair
    addr = rx.getsockname()
    sa = datapath.encode_sockaddr(addr)
    first = [1]
    last = FILESIZE // blksize + 1

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        _drain(rx)
        f = first[0]
        if f + count - 1 > last:
            f = 1
        first[0] = f + count
        return (tx, addr, sa, fd, f, count, blksize, FILESIZE), {}

    sent = benchmark.pedantic(path.send_window, setup=setup, rounds=ROUNDS, iterations=1)
    assert sent == count
    assert _drain(rx) == count


def test_datapath_lockstep_1456(benchmark: Any, path: Any, pair: Any, file_fd: int) -> None:
    _bench_window(benchmark, path, pair, file_fd, 1, 1456)


def test_datapath_lockstep_512(benchmark: Any, path: Any, pair: Any, file_fd: int) -> None:
    _bench_window(benchmark, path, pair, file_fd, 1, 512)


def test_datapath_window4_1468(benchmark: Any, path: Any, pair: Any, file_fd: int) -> None:
    _bench_window(benchmark, path, pair, file_fd, 4, 1468)


def test_datapath_window16_1468(benchmark: Any, path: Any, pair: Any, file_fd: int) -> None:
    _bench_window(benchmark, path, pair, file_fd, 16, 1468)


def test_datapath_window64_8192(benchmark: Any, path: Any, pair: Any, file_fd: int) -> None:
    _bench_window(benchmark, path, pair, file_fd, 64, 8192)


def test_encode_sockaddr(benchmark: Any) -> None:
    assert len(benchmark(datapath.encode_sockaddr, ("127.0.0.1", 4242))) == 16
