"""C's lock-step pump follows ReadTransfer's rules: same numbers, same datagrams."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEEP_IO, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tftpd import packet as P
from tftpd import transfer as T
from tftpd.datapath import (
    EV_DONE,
    EV_PACKET,
    EV_READY,
    EV_REARM,
    encode_sockaddr,
    ext_error,
    get_datapath,
)

pytestmark = pytest.mark.skipif(
    ext_error() is not None and not os.environ.get("TFTPD_REQUIRE_EXT"),
    reason=f"the C extension is not built: {ext_error()}")

FIELDS = ("last_acked", "sent_upto", "retransmits", "retries", "fast", "resent", "rto",
          "base_rto", "srtt", "rttvar", "sent_at", "armed_at")


def test_constants_match() -> None:
    from tftpd import _datapath  # type: ignore[attr-defined]

    assert _datapath.lib.TFTPD_RTO_FLOOR_MS / 1000 == T.RTO_FLOOR
    assert _datapath.lib.TFTPD_RTO_CEILING_MS / 1000 == T.RTO_CEILING


class Rig:
    """A C-pumped transfer and its Python twin, fed the same ACKs."""

    def __init__(self, path: Path, size: int, blksize: int, window: int, rollover: int) -> None:
        self.dp = get_datapath("c")
        self.pump = self.dp.pump()
        assert self.pump is not None
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.server.bind(("127.0.0.1", 0))
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.client.settimeout(2)
        self.peer = self.client.getsockname()
        self.fd = os.open(path, os.O_RDONLY)
        self.slot, state = self.pump.new_state()
        kw = dict(blksize=blksize, windowsize=window, timeout=1.0, rollover=rollover)
        self.c = T.ReadTransfer(self.peer, size, state=state, **kw)  # type: ignore[arg-type]
        self.py = T.ReadTransfer(self.peer, size, **kw)  # type: ignore[arg-type]
        self.pump.watch(self.slot, self.server, encode_sockaddr(self.peer), self.fd)
        self.data = path.read_bytes()[:size]  # the transfer serves `size` bytes

    def close(self) -> None:
        self.pump.release(self.slot)
        self.pump.close()
        for s in (self.server, self.client):
            s.close()
        os.close(self.fd)

    def expect_blocks(self, actions: list[T.Action]) -> None:
        """The client receives exactly the blocks the Python twin asked for."""
        t = self.py
        for a in actions:
            if not isinstance(a, T.SendBlocks):
                continue
            for k in range(a.first, a.first + a.count):
                got, _ = self.client.recvfrom(70000)
                off = (k - 1) * t.blksize
                assert got == P.encode_data(T.wire_block(k, t.rollover),
                                            self.data[off:off + t.blksize])

    def start(self, now: float = 0.0) -> None:
        acts = self.py.start(now)
        assert self.c.start(now) == acts
        first = acts[0]
        assert isinstance(first, T.SendBlocks)
        self.dp.send_window(self.server, self.peer, encode_sockaddr(self.peer), self.fd,
                            first.first, first.count, self.c.blksize, self.c.size,
                            self.c.rollover)
        self.expect_blocks(acts)

    def ack(self, n: int, now: float) -> None:
        self.client.sendto(P.encode_ack(n), self.server.getsockname())
        acts = self.py.on_datagram(P.encode_ack(n), self.peer, now)
        events = []
        for _ in range(100):  # the ACK is in flight on loopback: bounded wait
            events = self.pump.run(now)
            if events or self._consumed():
                break
        done = [e for e in events if e[1] == EV_DONE]
        assert bool(done) == any(isinstance(a, T.Finish) for a in acts)
        assert not [e for e in events if e[1] == EV_PACKET]
        for name in FIELDS:
            assert getattr(self.c.s, name) == pytest.approx(getattr(self.py.s, name)), name
        self.expect_blocks(acts)

    def _consumed(self) -> bool:
        try:
            self.server.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "f"
    p.write_bytes(os.urandom(40_000))
    yield p


@settings(max_examples=scaled(40, deep=DEEP_IO), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blksize=st.sampled_from([8, 512, 1456]), window=st.integers(1, 8),
       rollover=st.integers(0, 1), acks=st.lists(st.integers(0, 80), max_size=40))
def test_pump_matches_python(data_file: Path, blksize: int, window: int, rollover: int,
                             acks: list[int]) -> None:
    size = 40_000 if blksize > 8 else 400
    rig = Rig(data_file, size, blksize, window, rollover)
    try:
        rig.start()
        now = 0.0
        for n in acks:
            if rig.py.state == T.DONE:
                break
            now += 0.003
            # Mostly plausible ACKs (inside or at the end of the window), some junk.
            plausible = rig.py.s.last_acked + 1 + n % max(1, rig.py.s.windowsize)
            rig.ack(T.wire_block(plausible if n % 5 else n, rollover), now)
    finally:
        rig.close()


def test_foreign_and_non_ack_datagrams_go_to_python(data_file: Path) -> None:
    rig = Rig(data_file, 40_000, 512, 1, 0)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        rig.start()
        stranger.sendto(P.encode_ack(1), rig.server.getsockname())
        rig.client.sendto(P.encode_error(0, "bye"), rig.server.getsockname())
        got: list[tuple] = []
        for _ in range(100):
            got += rig.pump.run(1.0)
            if len(got) >= 2:
                break
        assert [(e[1], e[3]) for e in got] == [(EV_PACKET, P.encode_ack(1)),
                                               (EV_PACKET, P.encode_error(0, "bye"))]
        assert got[0][4] == stranger.getsockname()
        assert got[1][4] == rig.peer
        assert rig.c.s.last_acked == 0  # nothing was taken as progress
    finally:
        stranger.close()
        rig.close()


def test_the_pump_waits_and_serves_a_lockstep_client_alone(data_file: Path) -> None:
    """run(now, timeout) answers every ACK in C until something is Python's: a client
    thread reads the whole file lock-step while the test sits in one or a few calls,
    which end with the transfer's EV_DONE; a ready token ends a wait at once; an idle
    wait ends after its timeout with nothing."""
    import threading
    import time

    from tftpd.datapath import EV_READY

    rig = Rig(data_file, 40_000, 512, 1, 0)
    r, w = os.pipe()
    try:
        token = rig.pump.add_token(r)
        rig.start(time.monotonic())
        got = bytearray(rig.data[:512])

        def client() -> None:  # bounded: one ACK per block, 2 s timeout on each read
            n = 1
            while True:
                rig.client.sendto(P.encode_ack(n), rig.server.getsockname())
                if n == rig.c.nblocks:
                    return
                block, _ = rig.client.recvfrom(70000)
                got.extend(block[4:])
                n += 1

        th = threading.Thread(target=client, daemon=True)
        th.start()
        events: list[tuple] = []
        calls = 0
        end = time.monotonic() + 10
        while EV_DONE not in [e[1] for e in events] and time.monotonic() < end:
            events += rig.pump.run(time.monotonic(), 5.0)
            calls += 1
        th.join(5)
        # The first RTT sample brings the timer forward from the initial 1 s, once.
        assert [e[1] for e in events] in ([EV_DONE], [EV_REARM, EV_DONE])
        assert bytes(got) == rig.data
        assert calls <= 4, f"{calls} calls for {rig.c.nblocks} blocks: C did not wait"
        assert rig.c.s.last_acked == rig.c.nblocks
        # A ready token ends the wait at once, idle waits end by their timeout.
        t0 = time.monotonic()
        assert rig.pump.run(t0, 0.05) == []
        assert time.monotonic() - t0 >= 0.04
        os.write(w, b"x")
        t0 = time.monotonic()
        ready = rig.pump.run(t0, 5.0)
        assert [(e[0], e[1]) for e in ready] == [(token, EV_READY)]
        assert time.monotonic() - t0 < 2.0
        rig.pump.remove_token(r, token)
        assert rig.pump.run(time.monotonic(), 0.01) == []  # read nothing: gone from the set
    finally:
        os.close(r)
        os.close(w)
        rig.close()


def test_a_repeated_ack_while_backing_off_goes_to_python(data_file: Path) -> None:
    """C ignores a duplicate ACK, except while the timer backs off: then the ACK ends
    the backoff and re-arms the timer sooner, which only Python's heap can do."""
    rig = Rig(data_file, 40_000, 512, 1, 0)
    try:
        rig.start()
        rig.ack(1, 0.01)
        rig.client.sendto(P.encode_ack(1), rig.server.getsockname())  # no backoff yet
        for _ in range(100):
            assert rig.pump.run(0.02) == []
            if rig._consumed():
                break
        deadline = rig.c.deadline
        assert deadline is not None
        assert rig.c.on_timer(deadline) == [T.SendBlocks(2, 1)]  # a timeout: retries 1
        assert rig.c.s.retries == 1
        rig.client.sendto(P.encode_ack(1), rig.server.getsockname())
        events: list = []
        for _ in range(40):  # bounded: 2 s at most
            events = rig.pump.run(deadline + 0.01, 0.05)
            if events:
                break
        assert [(e[1], e[3]) for e in events] == [(EV_PACKET, P.encode_ack(1))]
        assert rig.c.on_datagram(events[0][3], rig.peer, deadline + 0.01) == []
        assert rig.c.s.retries == 0
    finally:
        rig.close()


def test_progress_after_a_backoff_brings_the_timer_forward(data_file: Path) -> None:
    """An ACK C answers after timeouts resets the backoff: the timer is due sooner
    than the time Python's heap holds, and C says so (EV_REARM)."""
    import time

    rig = Rig(data_file, 40_000, 512, 1, 0)
    try:
        t0 = time.monotonic()  # C reads the clock itself after a wait
        rig.start(t0)
        rig.ack(1, t0 + 0.01)  # block 2 is out
        for _ in range(2):
            deadline = rig.c.deadline
            assert deadline is not None
            assert rig.c.on_timer(deadline) == [T.SendBlocks(2, 1)]
        late = rig.c.deadline
        assert late is not None and rig.c.rto == 4 * rig.c.base_rto
        rig.client.sendto(P.encode_ack(2), rig.server.getsockname())
        events: list = []
        for _ in range(40):  # bounded: 2 s at most
            events = rig.pump.run(time.monotonic(), 0.05)
            if events:
                break
        assert [e[:2] for e in events] == [(rig.slot, EV_REARM)]
        assert rig.c.s.last_acked == 2 and rig.c.s.retries == 0
        assert rig.c.rto == rig.c.base_rto and rig.c.deadline < late - 0.05
    finally:
        rig.close()


@pytest.mark.parametrize("reuse", [False, True])
def test_a_ready_socket_its_slot_no_longer_names_leaves_the_set(tmp_path: Path,
                                                                 reuse: bool) -> None:
    # A socket still open whose slot was let go (or given to another transfer's
    # socket) must not stay in the level-triggered set: the pump would wake for it
    # at once, every time, and spin until its deadline.
    path = tmp_path / "f"
    path.write_bytes(os.urandom(4096))
    rig = Rig(path, 4096, 512, 1, 0)
    try:
        rig.pump.release(rig.slot)  # the socket stays open
        if reuse:  # the slot serves another socket now
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            other.bind(("127.0.0.1", 0))
            slot, state = rig.pump.new_state()
            T.ReadTransfer(rig.peer, 4096, state=state)
            rig.pump.watch(slot, other, encode_sockaddr(rig.peer), rig.fd)
        rig.client.sendto(P.encode_ack(1), rig.server.getsockname())
        assert rig.pump.epoll.poll(1.0)  # ready: the datagram waits, unread
        assert rig.pump.run(0.0, timeout=0.05) == []
        assert rig.pump.epoll.poll(0) == []  # out of the set (nothing else is ready)
        if reuse:
            other.close()
    finally:
        rig.close()


def test_tokens_are_reused_after_unwatching() -> None:
    """Watching and unwatching a descriptor again and again keeps the tokens in use
    bounded (C has 65,536 of them); a removed token is numbered again only from the
    next run on, so an event the last run handed out cannot reach its next owner."""
    pump = get_datapath("c").pump()
    assert pump is not None
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        first = pump.add_token(r)
        pump.remove_token(r, first)
        second = pump.add_token(r2)
        assert second != first  # not within the same run's events
        pump.remove_token(r2, second)
        assert pump.run(0.0, 0.0) == []
        seen = set()
        for _ in range(3000):
            token = pump.add_token(r)
            seen.add(token)
            pump.remove_token(r, token)
            assert pump.run(0.0, 0.0) == []
        assert seen <= {first, second}
        # The reused token still reports its new descriptor ready.
        token = pump.add_token(r2)
        os.write(w2, b"x")
        assert [(e[0], e[1]) for e in pump.run(0.0, 2.0)] == [(token, EV_READY)]
        pump.remove_token(r2, token)
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)
        pump.close()
