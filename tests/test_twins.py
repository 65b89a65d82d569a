"""The C data path against its pure-Python twin, on arbitrary input.

Every rule that exists twice, in _ext/ and in Python (docs/twins.md), is driven here
with the same arbitrary inputs on both sides, and the results must be equal:

- wire numbers: `tftpd_wire_block` against `transfer.wire_block`;
- the tables' hash: `tftpd_hash` against SipHash-2-4 written out below (the hash has no
  Python twin in the product: Python keys its refusals by the bytes themselves);
- the ACK rules (the absolute block of a wire ACK, the RTT sample and RTO, the next
  window, duplicates, stale ACKs, backoff): C's `tftpd_pump` on a real socket pair
  against `ReadTransfer._on_ack`, from arbitrary transfer states, also around rollover;
- the request reader and its known-answer lookup: `tftpd_requests` against the twin's
  `requests`, on arbitrary datagrams over loopback: the same kinds, the same answers;
- the send path: `tftpd_send_window` against the twin, on arbitrary windows of
  arbitrary files, from the descriptor or an image, with and without UDP segmentation:
  the same datagrams on the wire;
- probe endings: `tftpd_is_probe_end` against `transfer.is_probe_end` on any datagram;
- draining a spare socket: `tftpd_drain` against `net.drained`;
- the OACK repeat: `tftpd_repeat` (through `tftpd_requests`) against
  `ReadTransfer.on_repeat`, from arbitrary states.

docs/twins.md lists every pair and the test that holds it.
"""

from __future__ import annotations

import os
import platform
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEEP_IO, need_ext, scaled
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_starts import Rig as StartRig

from tftpd import packet as P
from tftpd import transfer as T
from tftpd.datapath import (
    BATCH,
    EV_DONE,
    EV_PACKET,
    EV_REARM,
    MAX_BLKSIZE,
    REQ_ANSWERED,
    REQ_BATCH,
    REQ_MERGED,
    REQ_STARTED,
    DataPath,
    KnownAnswers,
    dir_identity,
    encode_sockaddr,
    get_datapath,
)

WAIT = 2.0  # s: the longest a datagram on loopback may take
# C and Python do the same IEEE double operations; on x86-64 nothing fuses them, so the
# numbers must be equal to the last bit. Elsewhere a compiler may contract a*b+c.
EXACT = platform.machine() in ("x86_64", "AMD64")
FIELDS = ("last_acked", "sent_upto", "retransmits", "retries", "fast", "resent", "rto",
          "base_rto", "srtt", "rttvar", "sent_at", "armed_at")
REARM_SLACK = 0.05  # TFTPD_REARM_SLACK


@pytest.fixture(scope="module")
def lib() -> Any:
    need_ext("the twins are compared with C: ")
    from tftpd import _datapath  # type: ignore[attr-defined]

    return _datapath.lib


def _same(a: float, b: float) -> bool:
    return a == b if EXACT else a == pytest.approx(b, rel=1e-12, abs=1e-12)


def nothing_more(sock: socket.socket) -> None:
    """Nothing else is waiting on `sock` (loopback delivers within the send call)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        extra = sock.recv(70000)
    except BlockingIOError:
        return
    finally:
        sock.settimeout(timeout)
    raise AssertionError(f"an unexpected datagram: {extra[:8].hex()}")


# -- wire numbers and the hash ---------------------------------------------------------

LAPS = [65536 + 65536 * m for m in range(4)] + [65536 + 65535 * m for m in range(4)]
blocks = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**20),
    st.builds(lambda b, d: max(0, b + d), st.sampled_from(LAPS), st.integers(-3, 3)),
)


@settings(max_examples=scaled(500))
@given(k=blocks, rollover=st.integers(0, 1))
def test_wire_block(lib: Any, k: int, rollover: int) -> None:
    assert lib.tftpd_wire_block(k, rollover) == T.wire_block(k, rollover)


def siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 of data under the key (k0, k1), never 0: what tftpd_hash is."""
    mask = (1 << 64) - 1

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    v = [0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1,
         0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1]

    def rounds(n: int) -> None:
        for _ in range(n):
            v[0] = (v[0] + v[1]) & mask
            v[1] = rotl(v[1], 13) ^ v[0]
            v[0] = rotl(v[0], 32)
            v[2] = (v[2] + v[3]) & mask
            v[3] = rotl(v[3], 16) ^ v[2]
            v[0] = (v[0] + v[3]) & mask
            v[3] = rotl(v[3], 21) ^ v[0]
            v[2] = (v[2] + v[1]) & mask
            v[1] = rotl(v[1], 17) ^ v[2]
            v[2] = rotl(v[2], 32)

    full = len(data) - len(data) % 8
    for i in range(0, full, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v[3] ^= m
        rounds(2)
        v[0] ^= m
    b = (len(data) << 56 | int.from_bytes(data[full:], "little")) & mask
    v[3] ^= b
    rounds(2)
    v[0] ^= b
    v[2] ^= 0xFF
    rounds(4)
    return (v[0] ^ v[1] ^ v[2] ^ v[3]) or 1


@settings(max_examples=scaled(500))
@given(data=st.binary(max_size=600), k0=st.integers(0, (1 << 64) - 1),
       k1=st.integers(0, (1 << 64) - 1))
def test_hash(lib: Any, data: bytes, k0: int, k1: int) -> None:
    lib.tftpd_hash_key(k0, k1)
    try:
        assert lib.tftpd_hash(data, len(data)) == siphash24(k0, k1, data)
    finally:  # the process's own key again: random
        lib.tftpd_hash_key(int.from_bytes(os.urandom(8), "little"),
                           int.from_bytes(os.urandom(8), "little"))


# -- the ACK rules: C's pump against ReadTransfer ------------------------------------------

# A sparse file big enough for four laps of wire numbers at blksize 1456; what it holds
# is random where the tests read (the start and around each lap), zeros elsewhere.
BLKSIZES = [8, 9, 512, 1456]
MAX_BLOCKS = 4 * 65536 + 200


@pytest.fixture(scope="module")
def sparse() -> Iterator[int]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sparse"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, MAX_BLOCKS * max(BLKSIZES))
            os.pwrite(fd, os.urandom(1 << 20), 0)
            for b in BLKSIZES:
                for lap in LAPS:
                    off = max(0, (lap - 80) * b)
                    os.pwrite(fd, os.urandom(160 * b), off)
            yield fd
        finally:
            os.close(fd)


def datagrams_of(fd: int, size: int, blksize: int, rollover: int, first: int,
                 count: int) -> list[bytes]:
    """Blocks first..first+count-1 as the contract says they are on the wire."""
    out = []
    for k in range(first, first + count):
        off = (k - 1) * blksize
        wire = T.wire_block(k, rollover)
        out.append(bytes((0, 3, wire >> 8, wire & 0xFF))
                   + os.pread(fd, max(0, min(blksize, size - off)), off))
    return out


class AckRig:
    """A transfer pumped by C (state in a C struct) and its Python twin (XferState),
    started from the same arbitrary state and fed the same events."""

    def __init__(self, fd: int, state: dict[str, Any]) -> None:
        self.fd = fd
        self.dp = get_datapath("c")
        self.pump = self.dp.pump()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.server.bind(("127.0.0.1", 0))
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.client.settimeout(WAIT)
        self.peer = self.client.getsockname()
        self.slot, cstate = self.pump.new_state()
        kw: dict[str, Any] = dict(blksize=state["blksize"], windowsize=state["window"],
                                  timeout=state["base_rto"], rollover=state["rollover"],
                                  client_timeout=bool(state["fixed_rto"]))
        self.c = T.ReadTransfer(self.peer, state["size"], state=cstate, **kw)
        self.py = T.ReadTransfer(self.peer, state["size"], **kw)
        self.pump.watch(self.slot, self.server, encode_sockaddr(self.peer), fd)
        for t in (self.c, self.py):
            t.start(state["now"])  # the first window "went out": its numbers are set below
            for name in ("last_acked", "sent_upto", "retries", "retransmits", "resent",
                         "srtt", "rttvar", "base_rto", "rto", "sent_at", "armed_at"):
                setattr(t.s, name, state[name])
        self.check()

    def close(self) -> None:
        self.pump.release(self.slot)
        self.pump.close()
        self.server.close()
        self.client.close()

    def check(self) -> None:
        for name in FIELDS:
            c, py = getattr(self.c.s, name), getattr(self.py.s, name)
            assert _same(c, py), f"{name}: C {c!r}, Python {py!r}"
        assert (self.c.state, self.c.outcome) == (self.py.state, self.py.outcome)

    def expect(self, actions: list[T.Action]) -> None:
        """The client got exactly the blocks the Python twin's actions name."""
        t = self.py
        for a in actions:
            if isinstance(a, T.SendBlocks):
                want = datagrams_of(self.fd, t.size, t.blksize, t.rollover, a.first, a.count)
                got = [self.client.recv(70000) for _ in range(a.count)]
                assert got == want
        nothing_more(self.client)

    def carry_out(self, actions: list[T.Action]) -> None:
        """What the worker does with the C side's actions: send the blocks named."""
        t = self.c
        for a in actions:
            if isinstance(a, T.SendBlocks):
                n = self.dp.send_window(self.server, self.peer, encode_sockaddr(self.peer),
                                        self.fd, a.first, a.count, t.blksize, t.size,
                                        t.rollover)
                assert n == a.count

    def ack(self, n: int, now: float) -> None:
        due = self.py.deadline
        py_actions = self.py.on_datagram(P.encode_ack(n), self.peer, now)
        self.client.sendto(P.encode_ack(n), self.server.getsockname())
        # The ACK is on loopback: wait for it, then let C serve it (bounded).
        assert select.select([self.server], [], [], WAIT)[0], "the ACK never arrived"
        events: list[tuple] = []
        for _ in range(100):
            events += self.pump.run(now)
            if self._consumed():
                break
        c_actions: list[T.Action] = []
        kinds = []
        for slot, kind, _err, data, src, _offered in events:
            assert slot == self.slot
            kinds.append(kind)
            if kind == EV_PACKET:  # C left it to Python, as the worker does
                assert (data, src) == (P.encode_ack(n), self.peer)
                c_actions += self.c.on_datagram(data, src, now)
            elif kind == EV_DONE:
                c_actions += self.c.on_pumped_done()
        self.carry_out(c_actions)
        sends = [a for a in py_actions if isinstance(a, T.SendBlocks)]
        assert [a for a in c_actions if not isinstance(a, T.SendBlocks)] == \
            [a for a in py_actions if not isinstance(a, T.SendBlocks)]
        # C reports a timer it brought forward, which only Python's heap can re-arm.
        after = self.py.deadline
        rearm = bool(sends) and EV_PACKET not in kinds and due is not None \
            and after is not None and after < due - REARM_SLACK
        assert (EV_REARM in kinds) == rearm, (kinds, due, after)
        self.expect(py_actions)
        self.check()

    def timer(self, now: float) -> float:
        due = self.py.deadline
        assert due is not None
        now = max(now, due)
        py_actions = self.py.on_timer(now)
        c_actions = self.c.on_timer(now)
        assert c_actions == py_actions
        self.carry_out(c_actions)
        self.expect(py_actions)
        self.check()
        return now

    def _consumed(self) -> bool:
        try:
            self.server.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        return False


times = st.floats(0, 20, allow_nan=False, allow_infinity=False)


@st.composite
def ack_states(draw: st.DrawFn) -> dict[str, Any]:
    """A read transfer in the middle of its life: any size, window, position, blocks in
    flight, RTT estimate, backoff, Karn flag; often with the window in flight across a
    lap of wire numbers (65535 to 0, or to 1 with rollover 1)."""
    blksize = draw(st.sampled_from(BLKSIZES))
    rollover = draw(st.integers(0, 1))
    window = draw(st.one_of(st.integers(1, 8), st.sampled_from([16, 32, 64])))
    lap = draw(st.sampled_from([65536 + (65536 - rollover) * m for m in range(4)]))
    shape = draw(st.sampled_from(["small", "anywhere", "across"]))
    if shape == "small":
        nblocks = draw(st.integers(1, 300))
        last = draw(st.integers(0, nblocks - 1))
    elif shape == "anywhere":
        nblocks = draw(st.integers(1, MAX_BLOCKS))
        last = draw(st.integers(0, nblocks - 1))
    else:  # block lap - 1 is the last before the wire numbers start again
        nblocks = lap + draw(st.integers(0, 200))
        last = lap - draw(st.integers(1, window))
    size = (nblocks - 1) * blksize + draw(st.integers(0, blksize - 1))
    most = min(window, nblocks - last)
    least = min(most, lap - last) if shape == "across" else 1
    inflight = draw(st.integers(least, most))
    fixed = draw(st.integers(0, 1))
    base_rto = draw(st.floats(T.RTO_FLOOR, T.RTO_CEILING))
    retries = draw(st.integers(0, 4))
    now = 1000.0
    sent_at = now - draw(times)
    return dict(
        size=size, blksize=blksize, window=window, rollover=rollover,
        fixed_rto=fixed, last_acked=last, sent_upto=last + inflight, retries=retries,
        retransmits=draw(st.integers(0, 1000)), resent=draw(st.integers(0, 1)),
        srtt=draw(st.one_of(st.just(-1.0), times)), rttvar=draw(times), base_rto=base_rto,
        rto=base_rto if fixed else min(base_rto * 2**retries, T.RTO_CEILING),
        sent_at=sent_at, armed_at=sent_at + draw(st.floats(0, 1)), now=now,
    )


def wire_acks(state: dict[str, Any]) -> st.SearchStrategy[int]:
    """ACK numbers for a state: in the window, its end, duplicates, stale, any."""
    last, upto, r = state["last_acked"], state["sent_upto"], state["rollover"]

    def wire(k: int) -> int:
        return T.wire_block(max(0, k), r)

    return st.one_of(
        st.integers(last + 1, upto).map(wire),
        st.just(wire(upto)),
        st.just(wire(last)),
        st.integers(1, 70).map(lambda d: wire(last - d)),
        st.integers(1, 70).map(lambda d: wire(upto + d)),
        st.integers(0, 65535),
    )


_ACK_SETTINGS = settings(max_examples=scaled(150, deep=DEEP_IO),
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


@_ACK_SETTINGS
@given(data=st.data())
def test_one_ack_from_any_state(lib: Any, sparse: int, data: st.DataObject) -> None:
    """The absolute block of a wire ACK, the RTT sample, the next window: one ACK (any
    number, at any time) on an arbitrary transfer, C and Python alike."""
    state = data.draw(ack_states())
    rig = AckRig(sparse, state)
    try:
        n = data.draw(wire_acks(state))
        rig.ack(n, state["now"] + data.draw(times))
    finally:
        rig.close()


@_ACK_SETTINGS
@given(data=st.data())
def test_rtt_sample_and_rto(lib: Any, sparse: int, data: st.DataObject) -> None:
    """The ACK of a whole window in flight, at any time after it went out: RFC 6298's
    smoothing, the floor and ceiling, Karn's rule (no sample after a resend), a timeout
    the client set (no adaptation) and the end of the backoff."""
    state = data.draw(ack_states())
    rig = AckRig(sparse, state)
    try:
        rig.ack(T.wire_block(state["sent_upto"], state["rollover"]),
                state["sent_at"] + data.draw(st.one_of(times, st.floats(0, 0.01))))
        assert rig.c.s.last_acked == state["sent_upto"]
    finally:
        rig.close()


@settings(max_examples=scaled(100, deep=DEEP_IO),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_ack_sequences(lib: Any, sparse: int, data: st.DataObject) -> None:
    """Arbitrary ACK sequences (progress, whole windows, duplicates, stale and future
    numbers, around rollover) mixed with timeouts (backoff, its end by a duplicate
    ACK or by progress) until the transfer ends or the events do."""
    state = data.draw(ack_states())
    rig = AckRig(sparse, state)
    try:
        now = state["now"]
        for _ in range(data.draw(st.integers(1, 30))):
            if rig.py.state == T.DONE:
                break
            if data.draw(st.integers(0, 5)) == 0:
                now = rig.timer(now)
                continue
            now += data.draw(st.one_of(st.floats(0, 0.05), times))
            s = rig.py.s
            n = data.draw(wire_acks({"last_acked": s.last_acked, "sent_upto": s.sent_upto,
                                     "rollover": s.rollover}))
            rig.ack(n, now)
    finally:
        rig.close()


# -- the request reader and its known answers ----------------------------------------------

# What an entry of the known answers is like when the request comes: the states C's
# lookup and the twin's must judge alike.
LIVE, EXPIRED, DIR_CHANGED, DIR_GONE, DIR_STILL_MISSING, DIR_NOW_THERE, OACK = range(7)


@st.composite
def request_cases(draw: st.DrawFn) -> tuple[list[tuple[bytes, int]], list[tuple[int, bytes,
                                                                                 int]], bool,
                                               int]:
    known = draw(st.lists(st.binary(max_size=80), min_size=1, max_size=6, unique=True))
    entries = [(k, draw(st.integers(LIVE, OACK))) for k in known]

    def mutate(k: bytes, how: int) -> bytes:
        if how == 0 or not k:
            return k + b"\0"
        if how == 1:
            return k[:-1]
        i = draw(st.integers(0, len(k) - 1))
        return k[:i] + bytes([k[i] ^ 0x01]) + k[i + 1:]

    datagram = st.one_of(
        st.sampled_from(known),
        st.builds(mutate, st.sampled_from(known), st.integers(0, 2)),
        st.binary(max_size=600),
        st.builds(lambda n, seed: (bytes(range(seed, 256)) * (n // 200 + 1))[:n],
                  st.integers(601, 65507), st.integers(0, 255)),
    )
    # (client, datagram, destination: 127.0.0.1 or 127.0.0.2)
    sends = draw(st.lists(st.tuples(st.integers(0, 2), datagram, st.integers(1, 2)),
                          min_size=1, max_size=40))
    return entries, sends, draw(st.booleans()), draw(st.integers(1, REQ_BATCH))


def _run_reader(dp: DataPath, tmp: Path, entries: list[tuple[bytes, int]],
                sends: list[tuple[int, bytes, int]], pktinfo: bool, limit: int,
                now: float) -> tuple[list, list]:
    from tftpd.worker import enable_pktinfo

    there, gone = tmp / "there", tmp / "gone"
    refusals = KnownAnswers(dp)
    for i, (req, how) in enumerate(entries):
        directory = gone if how in (DIR_GONE, DIR_STILL_MISSING) else there
        ident = dir_identity(str(directory))
        if how == DIR_CHANGED:
            assert ident is not None
            ident = (*ident[:3], ident[3] + 1, *ident[4:])
        elif how == DIR_GONE:
            ident = dir_identity(str(there))  # was there when the name was missing
        elif how == DIR_NOW_THERE:
            ident = None  # was missing, is there now
        expires = now - 1.0 if how == EXPIRED else now + 60.0
        xfer = None
        if how == OACK:
            xfer = dp._ffi.new("struct tftpd_xfer *") if dp.name == "c" \
                else object()  # type: ignore[attr-defined]
        refusals.put(req, P.encode_error(1, f"no {i}"), expires, str(directory), ident, i,
                     xfer=xfer)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    lsock.bind(("0.0.0.0", 0))
    enable_pktinfo(lsock)
    err = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    err.bind(("0.0.0.0", 0))
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for c in clients:
            c.bind(("127.0.0.1", 0))
            c.settimeout(WAIT)
        who = {c.getsockname(): i for i, c in enumerate(clients)}
        port = lsock.getsockname()[1]
        events: list = []
        # In chunks the receive buffer surely holds (no root needed for a big one), each
        # read in calls of `limit` requests, as the worker reads them.
        i = 0
        while i < len(sends):
            chunk, room = [], 150_000
            while i < len(sends) and len(chunk) < 32 and (not chunk or
                                                           len(sends[i][1]) + 1024 <= room):
                chunk.append(sends[i])
                room -= len(sends[i][1]) + 1024
                i += 1
            for client, d, dst in chunk:
                clients[client].sendto(d, (f"127.0.0.{dst}", port))
            got: list = []
            for _ in range(200):  # bounded
                if len(got) >= len(chunk):
                    break
                if not select.select([lsock], [], [], WAIT)[0]:
                    break
                got += dp.requests(lsock, err, pktinfo, refusals, now, limit)
            assert len(got) == len(chunk), f"{dp.name}: {len(got)} of {len(chunk)} read"
            events += got
        out = []
        for kind, r, e, data, src, dst, ifindex, arrival, answered, _ in events:
            out.append((kind, r.note if r is not None else None, e, bytes(data), who[src],
                        dst, ifindex, arrival > 0, answered > 0))
        replies: list = []
        errport = err.getsockname()[1]
        for ci, c in enumerate(clients):
            n = sum(1 for ev in out if ev[0] == REQ_ANSWERED and ev[4] == ci and ev[2] == 0)
            for _ in range(n):
                data, (host, p) = c.recvfrom(70000)
                replies.append((ci, data, host, p == errport))
            nothing_more(c)
        return out, replies
    finally:
        for s in (lsock, err, *clients):
            s.close()


@pytest.fixture(scope="module")
def dirs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "there").mkdir()
        yield Path(d)


@settings(max_examples=scaled(100, deep=DEEP_IO),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=request_cases())
def test_request_reader_and_known_answers(lib: Any, dirs: Path,
                                          case: tuple[list, list, bool, int]) -> None:
    """Arbitrary datagrams from three clients, to two local addresses, against known
    answers in every state (live, expired, directory changed, gone or back, an OACK
    entry): C's recvmmsg reader and the twin's report the same kinds, entries, errors,
    datagrams, sources, destinations and interfaces, and the clients get the same
    replies from the same address and port."""
    entries, sends, pktinfo, limit = case
    now = time.monotonic()
    c = _run_reader(get_datapath("c"), dirs, entries, sends, pktinfo, limit, now)
    py = _run_reader(get_datapath("python"), dirs, entries, sends, pktinfo, limit, now)
    assert c == py
    # And they are right: a live entry answers exactly its own request.
    live = {req: i for i, (req, how) in enumerate(entries)
            if how in (LIVE, DIR_STILL_MISSING)}
    assert [ev[1] for ev in c[0] if ev[0] == REQ_ANSWERED] == \
        [live[d] for _, d, _ in sends if d in live]
    if pktinfo:  # the reply leaves from the address the request went to
        dsts = [f"127.0.0.{dst}" for _, d, dst in sends if d in live]
        assert sorted(r[2] for r in c[1]) == sorted(dsts)


# -- the send path ---------------------------------------------------------------------------

IMAGE_MAX = 1 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@pytest.fixture(scope="module")
def send_rig(sparse: int) -> Iterator[tuple[socket.socket, socket.socket, bytes]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:  # room for a whole window: forced past rmem_max as root
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    except OSError:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(WAIT)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    image = os.pread(sparse, IMAGE_MAX, 0)
    yield rx, tx, image
    rx.close()
    tx.close()


@st.composite
def send_cases(draw: st.DrawFn) -> dict[str, Any]:
    blksize = draw(st.one_of(st.integers(8, 600), st.sampled_from([512, 1428, 1456, 1468,
                                                                     4096, 8192]),
                             st.integers(8, MAX_BLKSIZE)))
    image = draw(st.booleans())
    top = IMAGE_MAX if image else MAX_BLOCKS * max(BLKSIZES)  # an image is in memory
    filesize = draw(st.one_of(st.integers(0, min(top, 200_000)), st.integers(0, top),
                              st.sampled_from(LAPS).map(lambda b: min(top, b * blksize))))
    last = filesize // blksize + 1
    first = draw(st.one_of(st.integers(1, last),
                           st.sampled_from(LAPS).map(lambda b: min(max(1, b - 20), last))))
    # At most 1 MiB a window: what a receive buffer surely holds.
    most = min(last - first + 1, 2 * BATCH + 20, max(1, (1 << 20) // (blksize + 4)))
    return dict(blksize=blksize, filesize=filesize, first=first,
                count=draw(st.integers(1, most)), rollover=draw(st.integers(0, 1)),
                image=image, gso=draw(st.booleans()))


@settings(max_examples=scaled(150, deep=DEEP_IO),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=send_cases())
def test_send_window(lib: Any, sparse: int, send_rig: tuple[socket.socket, socket.socket,
                                                             bytes],
                     case: dict[str, Any]) -> None:
    """Any window of any file, from its descriptor or its image, segmented or not: C
    and the twin put the same datagrams on the wire, and the contract's."""
    rx, tx, image_bytes = send_rig
    b, size = case["blksize"], case["filesize"]
    # Without root the receive buffer may be small: only what it surely holds.
    assume(2 * case["count"] * (b + 100) <= rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    image = image_bytes[:size] if case["image"] else None
    want = datagrams_of(sparse, size, b, case["rollover"], case["first"], case["count"])
    seen = {}
    for name in ("c", "python"):
        dp = get_datapath(name)
        dp.gso = case["gso"]
        n = dp.send_window(tx, rx.getsockname(), encode_sockaddr(rx.getsockname()),
                           -1 if image is not None else sparse, case["first"], case["count"],
                           b, size, case["rollover"], image)
        assert n == case["count"], name
        seen[name] = [rx.recv(70000) for _ in range(n)]
        assert dp.gso == case["gso"]  # loopback takes segmentation: it was used
        nothing_more(rx)
    assert seen["c"] == seen["python"]
    assert seen["c"] == want


# A file whose reads come up short although it has the bytes: /proc's seq_files return
# at most about a page per read(), so a preadv() of blocks larger than a page is short
# again and again. The plain path's read loop resumes right; the segmented path's does
# not in C (below): it gives up with FileShrank.
SHORT = "/proc/kallsyms"


def _short_reads(fd: int) -> bool:
    return len(os.pread(fd, 16384, 0)) < 16384


@pytest.fixture(scope="module")
def short_file() -> Iterator[int]:
    try:
        fd = os.open(SHORT, os.O_RDONLY)
    except OSError as exc:
        pytest.skip(f"{SHORT} cannot be read here ({exc}): no file with short reads")
    try:
        if not _short_reads(fd) or len(os.pread(fd, 1 << 20, 0)) == 0:
            pytest.skip(f"{SHORT} reads whole here: no file with short reads")
        yield fd
    finally:
        os.close(fd)


def _full(fd: int, length: int, off: int) -> bytes:
    out = b""
    while len(out) < length:
        got = os.pread(fd, length - len(out), off + len(out))
        assert got, "the file ended"
        out += got
    return out


def _short_case(fd: int, name: str, blksize: int, count: int, gso: bool) -> None:
    size = blksize * count + 100
    data = _full(fd, size, 0)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(WAIT)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        dp = get_datapath(name)
        dp.gso = gso
        n = dp.send_window(tx, rx.getsockname(), encode_sockaddr(rx.getsockname()), fd, 1,
                           count, blksize, size)
        assert n == count
        got = [rx.recv(70000) for _ in range(n)]
    finally:
        rx.close()
        tx.close()
    assert [g[4:] for g in got] == [data[i * blksize:(i + 1) * blksize] for i in range(count)]


@pytest.mark.parametrize("name", ["c", "python"])
@pytest.mark.parametrize("blksize", [1456, 8192, 16000])
def test_short_reads_plain(lib: Any, short_file: int, name: str, blksize: int) -> None:
    _short_case(short_file, name, blksize, 4, gso=False)


def test_short_reads_segmented_python(short_file: int) -> None:
    _short_case(short_file, "python", 8192, 4, gso=True)


def test_short_reads_segmented_c(lib: Any, short_file: int) -> None:
    _short_case(short_file, "c", 8192, 4, gso=True)


# -- probe endings, draining a spare, the OACK repeat ----------------------------------------

@settings(max_examples=scaled(300))
@given(data=st.one_of(
    st.binary(max_size=12),
    st.builds(lambda code, rest: b"\x00\x05" + code.to_bytes(2, "big") + rest,
              st.integers(0, 0xFFFF) | st.integers(0, 10), st.binary(max_size=8)),
))
def test_probe_end(lib: Any, data: bytes) -> None:
    """ERROR 0, 8 or 9 ends an existence probe: C's tftpd_is_probe_end and
    transfer.is_probe_end agree on any datagram, and with the state machine's own
    judgement of an ERROR to its OACK."""
    c = bool(lib.tftpd_is_probe_end(data, len(data)))
    assert c == T.is_probe_end(data)
    pkt = None
    try:
        pkt = P.parse(data)
    except P.PacketError:
        pass
    if isinstance(pkt, P.Error):
        t = T.ReadTransfer(("127.0.0.1", 9), 100, oack={"tsize": "100"})
        t.start(0.0)
        [fin] = t.on_datagram(data, ("127.0.0.1", 9), 0.1)
        assert isinstance(fin, T.Finish) and (fin.outcome == "probe") == c


def _spare_with(n: int) -> tuple[socket.socket, socket.socket]:
    """A spare socket with n datagrams queued, and their sender."""
    spare = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    spare.bind(("127.0.0.1", 0))
    spare.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        tx.sendto(bytes([i & 0xFF]) * (1 + i % 40), spare.getsockname())
    end = time.monotonic() + WAIT  # loopback delivers at once; bounded all the same
    while n and not select.select([spare], [], [], 0)[0] and time.monotonic() < end:
        select.select([spare], [], [], 0.01)
    return spare, tx


@settings(max_examples=scaled(40), deadline=None)
@given(n=st.integers(0, 3) | st.integers(60, 70), then=st.integers(0, 3))
def test_drain(lib: Any, n: int, then: int) -> None:
    """Draining a spare: C's tftpd_drain and net.drained read the same datagrams and
    judge alike (empty: usable; DRAIN_MAX or more waiting: flooded), and leave the
    socket alike (what a second drain finds)."""
    from tftpd.datapath import drained

    results = []
    for side in ("c", "python"):
        spare, tx = _spare_with(n)
        try:
            ok = lib.tftpd_drain(spare.fileno()) == 0 if side == "c" else drained(spare)
            for i in range(then):
                tx.sendto(b"late %d" % i, spare.getsockname())
            left = 0
            while select.select([spare], [], [], 0.05)[0]:
                spare.recv(100)
                left += 1
            results.append((ok, left))
        finally:
            spare.close()
            tx.close()
    assert results[0] == results[1]
    assert results[0][0] == (n < 64)
    assert results[0][1] == then + max(0, n - 64)


@settings(max_examples=scaled(40), deadline=None)
@given(age=st.floats(0.0, 0.5), retries=st.integers(0, 4), acked=st.integers(0, 1),
       base_rto=st.floats(0.2, 3.0))
def test_oack_repeat(lib: Any, dirs: Path, age: float, retries: int, acked: int,
                     base_rto: float) -> None:
    """The same request again while a transfer C started waits for its OACK's answer:
    C (tftpd_repeat, inside tftpd_requests) and ReadTransfer.on_repeat change the
    numbers alike and resend the OACK alike."""
    rig = StartRig(dirs)
    rig.add_spare()
    rig.pump.offer(4)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    try:
        c.sendto(rig.request, rig.lsock.getsockname())
        [req] = rig.read(1)
        assert req.kind == REQ_STARTED
        c.settimeout(WAIT)
        assert c.recv(600) == rig.oack
        x = rig.pump.state(req.slot)
        now = time.monotonic()  # the known answer is unexpired (30 s)
        x.armed_at, x.retries, x.last_acked = now - age, retries, acked
        x.base_rto = x.rto = base_rto
        fields = ("retransmits", "retries", "rto", "base_rto", "resent", "armed_at",
                  "sent_at", "last_acked")
        t = T.ReadTransfer(("127.0.0.1", 9), 5000, blksize=1456, oack={"tsize": "5000"})
        for f in fields:
            setattr(t.s, f, getattr(x, f))
        py = t.on_repeat(now)
        c.sendto(rig.request, rig.lsock.getsockname())
        got: list = []
        end = time.monotonic() + WAIT
        while not got and time.monotonic() < end:
            select.select([rig.lsock], [], [], 0.05)
            got = rig.dp.requests(rig.lsock, rig.err, False, rig.refusals, now, 32, rig.pump)
        assert [g.kind for g in got] == [REQ_MERGED]
        assert {f: getattr(x, f) for f in fields} == {f: getattr(t.s, f) for f in fields}
        c.settimeout(0.05)
        try:
            resent = c.recv(600) == rig.oack
        except TimeoutError:
            resent = False
        assert resent == bool(py)
    finally:
        c.close()
        rig.close()
