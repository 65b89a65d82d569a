"""The worker's two event loops watch any descriptor the same way (loop.watch)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from tftpd.datapath import ext_error, get_datapath
from tftpd.worker.loops import Loop, PumpLoop, SelectorLoop
from tftpd.worker.sessions import SessionTable
from tftpd.worker.timers import Timers


@pytest.fixture(params=["selector", "pump"])
def loop(request: pytest.FixtureRequest) -> Iterator[Loop]:
    worker = SimpleNamespace(table=SessionTable(), timers=Timers(),
                             read_transfer=lambda session: None)
    if request.param == "selector":
        yield SelectorLoop(worker)  # type: ignore[arg-type]
        return
    if ext_error():
        pytest.skip("the C data path is not built")
    pump = get_datapath("c").pump(16)
    assert pump is not None
    yield PumpLoop(worker, pump)  # type: ignore[arg-type]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def _turn_until(loop: Loop, done: Callable[[], bool], limit: float = 2.0) -> None:
    deadline = time.monotonic() + limit
    while not done() and time.monotonic() < deadline:
        loop.turn(0.05)


def test_read_write_and_unwatch(loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    got: list[bytes] = []
    writable: list[int] = []
    loop.watch(a.fileno(), lambda: got.append(a.recv(16)))
    loop.turn(0.0)
    assert got == []  # nothing to read yet
    b.send(b"x")
    _turn_until(loop, lambda: bool(got))
    assert got == [b"x"]
    # Watched again with a write callback: both now (a socketpair is writable at once).
    loop.watch(a.fileno(), lambda: got.append(a.recv(16)), lambda: writable.append(1))
    _turn_until(loop, lambda: bool(writable))
    assert writable
    b.send(b"y")
    _turn_until(loop, lambda: len(got) == 2)
    assert got == [b"x", b"y"]
    loop.unwatch(a.fileno())
    loop.unwatch(a.fileno())  # a second time is no error
    seen = len(writable)
    b.send(b"z")
    for _ in range(3):
        loop.turn(0.01)
    assert got == [b"x", b"y"] and len(writable) == seen
    assert a.recv(16) == b"z"  # left unread


def test_a_callback_may_unwatch_a_descriptor_ready_in_the_same_turn(
        loop: Loop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    c, d = socket.socketpair()
    c.setblocking(False)
    calls: list[str] = []

    def first() -> None:
        calls.append("a")
        a.recv(16)
        loop.unwatch(c.fileno())

    def second() -> None:
        calls.append("c")
        c.recv(16)
        loop.unwatch(a.fileno())

    try:
        loop.watch(a.fileno(), first)
        loop.watch(c.fileno(), second)
        b.send(b"1")
        d.send(b"2")
        _turn_until(loop, lambda: bool(calls))
        for _ in range(3):
            loop.turn(0.01)
        assert calls in (["a"], ["c"])  # the other was unwatched before its turn
    finally:
        c.close()
        d.close()


def test_the_pump_loop_calls_a_backlogged_reader_again_without_waiting(
        pair: tuple[socket.socket, socket.socket]) -> None:
    if ext_error():
        pytest.skip("the C data path is not built")
    pump = get_datapath("c").pump(16)
    assert pump is not None
    worker = SimpleNamespace(table=SessionTable(), timers=Timers())
    loop = PumpLoop(worker, pump)  # type: ignore[arg-type]
    a, b = pair
    calls: list[int] = []

    def read() -> bool:  # as a listen socket with a full batch read: more may wait
        calls.append(1)
        try:
            a.recv(16)
        except BlockingIOError:
            pass
        return len(calls) < 3

    loop.watch(a.fileno(), read)
    b.send(b"x")
    _turn_until(loop, lambda: bool(calls))
    started = time.monotonic()
    loop.turn(5.0)  # nothing is ready, but the reader asked to be called again
    loop.turn(5.0)
    assert len(calls) == 3 and time.monotonic() - started < 2.0
