"""Transfers C starts itself: the OACK of a known request, the probe ended in C.

Python negotiates a request once and enters its OACK in the `KnownAnswers` table; C then
answers every identical request from a spare socket, owns the transfer in the pump,
and ends it there on ERROR 0, 8 or 9. Anything else makes Python adopt it. These
tests drive the C calls directly over loopback, then the daemon.
"""

from __future__ import annotations

import errno
import os
import random
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, need_ext, scaled, start_daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import client
from tftpd import packet as P
from tftpd.datapath import (
    EV_PACKET,
    EV_PROBE,
    REQ_MERGED,
    REQ_PASS,
    REQ_STARTED,
    KnownAnswers,
    Pump,
    encode_sockaddr,
    get_datapath,
)
from tftpd.files import dir_identity
from tftpd.transfer import ReadTransfer

WAIT = 2.0  # s, for a datagram on loopback


@pytest.fixture(autouse=True)
def _need_ext() -> None:
    need_ext("transfers start in C only with the C data path: ")


class Rig:
    """A listen socket, its error socket, a pump with its starts, one known OACK."""

    def __init__(self, tmp_path: Path) -> None:
        self.dp: Any = get_datapath("c")
        self.pump: Pump = self.dp.pump(64)
        self.refusals = KnownAnswers(self.dp)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.lsock.bind(("127.0.0.1", 0))
        from tftpd.worker import enable_pktinfo

        enable_pktinfo(self.lsock)
        self.err = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.err.bind(("127.0.0.1", 0))
        self.path = tmp_path / "nbp.efi"
        self.path.write_bytes(b"x" * 5000)
        self.request = P.encode_rrq(b"nbp.efi", "octet", {"tsize": "0", "blksize": "1456"})
        self.oack = P.encode_oack({"tsize": "5000", "blksize": "1456"})
        self.entry = self.enter(self.request, self.oack, timeout=1.0)
        self.spares: list[socket.socket] = []

    def enter(self, request: bytes, oack: bytes, timeout: float, ifindex: int = 1) -> Any:
        slot, state = self.pump.new_state()
        ReadTransfer(("127.0.0.1", 9), 5000, blksize=1456, oack={"tsize": "5000"},
                     timeout=timeout, state=state)
        xfer = self.pump.template(state)
        self.pump.release(slot)
        return self.refusals.put(request, oack, time.monotonic() + 30, str(self.path),
                                 dir_identity(str(self.path)), "note", ifindex=ifindex, dstlen=4,
                                 xfer=xfer)

    def add_spare(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        s.bind(("127.0.0.1", 0))
        assert self.pump.put_spare(s, socket.inet_pton(socket.AF_INET, "127.0.0.1"))
        self.spares.append(s)
        return s

    def read(self, want: int) -> list:
        out: list = []
        end = time.monotonic() + WAIT
        while len(out) < want and time.monotonic() < end:
            out += self.dp.requests(self.lsock, self.err, False, self.refusals,
                                    time.monotonic(), 32, self.pump)
        return out

    def events(self, want: int = 1) -> list:
        out: list = []
        end = time.monotonic() + WAIT
        while len(out) < want and time.monotonic() < end:
            out += [e for e in self.pump.run(time.monotonic(), 0.05) if e[1] != 4]
        return out

    def close(self) -> None:
        self.pump.close_spares()
        for s in (self.lsock, self.err):
            s.close()
        self.pump.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def _client() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(WAIT)
    return s


def test_a_known_oack_starts_in_c_and_the_probe_ends_in_c(rig: Rig) -> None:
    spare = rig.add_spare()
    rig.pump.offer(4)
    c = _client()
    c.sendto(rig.request, rig.lsock.getsockname())
    [req] = rig.read(1)
    kind, entry, err, slot, answered = req.kind, req.answer, req.err, req.slot, req.answered
    assert (kind, entry, err) == (REQ_STARTED, rig.entry, 0) and answered > 0
    data, src = c.recvfrom(600)
    assert data == rig.oack and src == spare.getsockname()  # from the spare, not the port
    assert rig.pump.live == 1 and rig.pump.is_started(slot)
    assert rig.pump.find(encode_sockaddr(c.getsockname())) == slot
    assert rig.pump.starts.nspares == 0 and rig.pump.starts.nfree == 3
    c.sendto(P.encode_error(8, "probe only"), src)
    [ev] = rig.events()
    assert (ev.slot, ev.kind, ev.err, ev.offered) == (slot, EV_PROBE, 8, True)
    assert ev.source == c.getsockname()
    # The peer and the slot went back; the socket did not: its port served one client.
    assert rig.pump.live == 0 and not rig.pump.is_started(slot)
    assert rig.pump.find(encode_sockaddr(c.getsockname())) == -1
    assert rig.pump.starts.nspares == 0 and rig.pump.starts.nfree == 4
    port = spare.getsockname()
    rig.pump.ended(slot, ev.offered)
    assert spare.fileno() == -1  # closed
    # The next start needs a spare of its own, and its port is another.
    c2 = _client()
    c2.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_PASS
    spare2 = rig.add_spare()
    c2.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_STARTED
    data, src = c2.recvfrom(600)
    assert data == rig.oack and src == spare2.getsockname() != port
    c2.sendto(P.encode_error(0, ""), src)
    [ev] = rig.events()
    assert ev[1:3] == (EV_PROBE, 0) and ev[4] == c2.getsockname()
    c.close()
    c2.close()


def test_anything_but_a_probe_end_is_pythons(rig: Rig) -> None:
    rig.add_spare()
    rig.pump.offer(4)
    c = _client()
    c.sendto(rig.request, rig.lsock.getsockname())
    slot = rig.read(1)[0].slot
    _, src = c.recvfrom(600)
    c.sendto(P.encode_error(2, "access violation"), src)  # not a probe's code
    c.sendto(P.encode_ack(0), src)
    [ev] = rig.events()
    assert ev[0] == slot and ev[1] == EV_PACKET and P.parse(ev[3]) == P.Error(2, "access violation")
    assert rig.pump.is_started(slot)  # Python adopts it, C does not guess
    x, sock = rig.pump.adopt(slot)
    assert sock is not None and sock.getsockname() == src and rig.pump.live == 0
    c.close()
    sock.close()


def test_a_repeat_is_merged_and_other_requests_of_the_peer_pass(rig: Rig) -> None:
    rig.add_spare()
    rig.add_spare()
    rig.pump.offer(4)
    c = _client()
    c.sendto(rig.request, rig.lsock.getsockname())
    c.sendto(rig.request, rig.lsock.getsockname())  # a legacy ROM's second copy
    other = P.encode_rrq(b"other", "octet", {})
    c.sendto(other, rig.lsock.getsockname())
    got = rig.read(3)
    assert [g[0] for g in got] == [REQ_STARTED, REQ_MERGED, REQ_PASS]
    assert got[1].slot == got[0].slot and got[2].datagram == other
    assert rig.pump.live == 1 and rig.pump.starts.nspares == 1  # one OACK, one socket
    c.settimeout(0.2)
    c.recvfrom(600)
    with pytest.raises(TimeoutError):
        c.recvfrom(600)
    c.close()


def test_without_a_spare_a_slot_the_file_or_the_interface_it_passes(rig: Rig) -> None:
    c = _client()
    rig.pump.offer(4)
    c.sendto(rig.request, rig.lsock.getsockname())  # no spare socket
    assert rig.read(1)[0][0] == REQ_PASS
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    other.bind(("127.0.0.2", 0))
    rig.pump.put_spare(other, socket.inet_pton(socket.AF_INET, "127.0.0.2"))
    c.sendto(rig.request, rig.lsock.getsockname())  # a spare, bound elsewhere
    assert rig.read(1)[0][0] == REQ_PASS
    rig.add_spare()
    rig.pump.offer(0)
    c.sendto(rig.request, rig.lsock.getsockname())  # no free slot
    assert rig.read(1)[0][0] == REQ_PASS
    rig.pump.offer(4)
    os.utime(rig.path, ns=(1, 1))  # the file is not the one negotiated for
    c.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_PASS
    rig.enter(rig.request, rig.oack, 1.0, ifindex=99)  # negotiated for another NIC
    c.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_PASS
    assert rig.pump.live == 0
    rig.enter(rig.request, rig.oack, 1.0)
    c.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_STARTED
    c.close()


def test_overdue_reports_an_unanswered_oack(rig: Rig) -> None:
    rig.enter(rig.request, rig.oack, timeout=0.3)
    rig.add_spare()
    rig.pump.offer(4)
    c = _client()
    t0 = time.monotonic()
    c.sendto(rig.request, rig.lsock.getsockname())
    slot = rig.read(1)[0].slot
    due, nxt = rig.pump.overdue(t0)
    assert due == [] and t0 + 0.3 <= nxt <= time.monotonic() + 0.3
    due, _ = rig.pump.overdue(nxt + 0.001)
    assert due == [slot]
    # A second one: a scan cut short by its room says "again at once".
    rig.add_spare()
    c2 = _client()
    c2.sendto(rig.request, rig.lsock.getsockname())
    assert rig.read(1)[0][0] == REQ_STARTED
    ffi, lib = rig.dp._ffi, rig.dp._lib
    out, nxt_p = ffi.new("unsigned int[]", 1), ffi.new("double *", float("inf"))
    later = time.monotonic() + 1.0
    assert lib.tftpd_overdue(rig.pump.starts, later, out, 1, nxt_p) == 1
    assert nxt_p[0] == later
    assert len(rig.pump.overdue(later)[0]) == 2
    c.close()
    c2.close()


@settings(max_examples=scaled(300, deep=100))
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=10, max_size=120),
       st.sampled_from([16, 64]))
def test_the_peer_table_finds_what_a_dict_would(ops: list[tuple[bool, int]],
                                                 cells: int) -> None:
    dp: Any = get_datapath("c")
    pump = dp.pump(1)
    pump.starts.peers_len = cells  # of its 1024: runs of collisions, wrapping around
    try:
        slots: dict[int, int] = {}  # client port -> slot
        known: set[int] = set()
        for put, port in ops:
            known.add(port)
            addr = encode_sockaddr(("10.0.0.1", port))
            if put and port not in slots:
                slot, state = pump.new_state()
                state.addrlen = len(addr)
                pump._ffi.memmove(state.addr, addr, len(addr))
                rc = dp._lib.tftpd_peer_put(pump.starts, slot)
                if 2 * (len(slots) + 1) > cells:
                    assert rc == -errno.ENOSPC  # never more than half full
                    pump.release(slot)
                    continue
                assert rc == 0
                slots[port] = slot
            elif not put and port in slots:
                pump.release(slots.pop(port))
            for p in known:
                assert pump.find(encode_sockaddr(("10.0.0.1", p))) == slots.get(p, -1)
        assert pump.starts.npeers == len(slots)
    finally:
        pump.close()


@settings(max_examples=200)
@given(st.lists(st.integers(0, 30), min_size=3, max_size=7, unique=True), st.data())
def test_a_stale_cell_leaves_no_hole_in_the_peer_table(ports: list[int],
                                                       data: st.DataObject) -> None:
    # A cell whose transfer is gone (its struct let go without leaving the table:
    # cannot happen while Python keeps the rules) is dropped when a deletion walks
    # past it, and every other peer is still found afterwards.
    dp: Any = get_datapath("c")
    pump = dp.pump(1)
    pump.starts.peers_len = 16  # one run of collisions
    try:
        slots = {}
        for port in ports:
            addr = encode_sockaddr(("10.0.0.1", port))
            slot, state = pump.new_state()
            state.addrlen = len(addr)
            pump._ffi.memmove(state.addr, addr, len(addr))
            assert dp._lib.tftpd_peer_put(pump.starts, slot) == 0
            slots[port] = slot
        stale = data.draw(st.sampled_from(ports))
        pump._table[slots.pop(stale)] = pump._ffi.NULL  # gone, still in the table
        gone = data.draw(st.sampled_from(sorted(slots)))
        pump.release(slots.pop(gone))
        for port, slot in slots.items():
            assert pump.find(encode_sockaddr(("10.0.0.1", port))) == slot
        assert pump.find(encode_sockaddr(("10.0.0.1", gone))) == -1
    finally:
        pump.close()


# -- the daemon ---------------------------------------------------------------------


@pytest.fixture
def cdaemon(root: Path) -> Iterator[Daemon]:
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": "c"})
    try:
        yield d
    finally:
        d.stop()


def _totals(d: Daemon) -> dict[str, int]:
    d.stop()
    line = d.wait_for_log(r"stopped; totals:")[0]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def test_probes_are_answered_without_python_opening_the_file(cdaemon: Daemon) -> None:
    (cdaemon.root / "nbp.efi").write_bytes(b"p" * 70_000)
    n = 12
    for _ in range(n):
        res = client.probe("127.0.0.1", cdaemon.port, "nbp.efi", options={"blksize": "1456"})
        assert res.oack == {"tsize": "70000", "blksize": "1456"}
    cdaemon.wait_for_log(r"file=nbp\.efi .*outcome=probe", count=n)
    t = _totals(cdaemon)
    assert t["requests"] == n and t["probe"] == n and t["failed"] == 0
    # Python opens (or finds open) the file for each request it serves itself; the
    # first is Python's, and a next RRQ read before the last probe's ERROR finds no
    # spare socket yet.
    assert t["c_starts"] >= n // 2 and t["cache_hits"] == n - 1 - t["c_starts"], t


def _download(sock: socket.socket, server: tuple, request: bytes, blksize: int,
              ack_oack: bool = True) -> tuple[bytes, tuple]:
    sock.sendto(request, server)
    got, block, src = [], 0, None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        raw, frm = sock.recvfrom(P.MAX_DATAGRAM)
        src = src or frm
        assert frm == src
        pkt = P.parse(raw)
        if isinstance(pkt, P.OAck):
            sock.sendto(P.encode_ack(0), frm)
            continue
        assert isinstance(pkt, P.Data), pkt
        if pkt.block == block + 1:
            block += 1
            got.append(pkt.payload)
        sock.sendto(P.encode_ack(block), frm)
        if len(pkt.payload) < blksize:
            break
    assert src is not None
    return b"".join(got), src


def test_a_download_c_started_is_served_whole_by_python(cdaemon: Daemon) -> None:
    data = random.Random(3).randbytes(300_001)
    (cdaemon.root / "k.bin").write_bytes(data)
    request = P.encode_rrq(b"k.bin", "octet", {"tsize": "0", "blksize": "1400"})
    for _ in range(3):  # the first is Python's, then C starts them
        s = _client()
        got, _ = _download(s, ("127.0.0.1", cdaemon.port), request, 1400)
        s.close()
        assert got == data
    cdaemon.wait_for_log(r"file=k\.bin .*bytes=300001 .*outcome=ok", count=3)
    t = _totals(cdaemon)
    assert t["ok"] == 3 and t["failed"] == 0


def test_an_oack_c_sent_is_resent_by_the_timer(cdaemon: Daemon) -> None:
    (cdaemon.root / "t.bin").write_bytes(b"t" * 1000)
    request = P.encode_rrq(b"t.bin", "octet", {"tsize": "0", "timeout": "1"})
    client.probe("127.0.0.1", cdaemon.port, "t.bin", options={"timeout": "1"})
    cdaemon.wait_for_log(r"file=t\.bin .*outcome=probe")  # its socket is a spare now
    s = _client()
    s.sendto(request, ("127.0.0.1", cdaemon.port))
    first, src = s.recvfrom(600)
    t0 = time.monotonic()
    s.settimeout(4)
    again, src2 = s.recvfrom(600)  # no answer from us: the OACK comes again
    assert again == first and src2 == src and time.monotonic() - t0 >= 0.9
    s.sendto(P.encode_error(8, ""), src)
    line = cdaemon.wait_for_log(rf"127\.0\.0\.1:{s.getsockname()[1]} file=t\.bin")[0]
    assert "outcome=probe" in line and "retransmits=1" in line
    s.close()


def test_a_file_replaced_after_the_oack_is_never_mixed(cdaemon: Daemon) -> None:
    path = cdaemon.root / "r.bin"
    path.write_bytes(b"a" * 10_000)
    request = P.encode_rrq(b"r.bin", "octet", {"tsize": "0"})
    client.probe("127.0.0.1", cdaemon.port, "r.bin")
    cdaemon.wait_for_log(r"file=r\.bin .*outcome=probe")  # its socket is a spare now
    s = _client()
    s.sendto(request, ("127.0.0.1", cdaemon.port))
    oack, src = s.recvfrom(600)
    assert P.parse(oack) == P.OAck({"tsize": "10000"})
    new = cdaemon.root / "r.new"
    new.write_bytes(b"b" * 20_000)
    os.replace(new, path)
    s.sendto(P.encode_ack(0), src)
    reply, _ = s.recvfrom(600)
    pkt = P.parse(reply)
    assert isinstance(pkt, P.Error) and pkt.code == 0, pkt
    cdaemon.wait_for_log(r"file=r\.bin .*outcome=failed reason=file changed after the OACK")
    s.close()


def test_a_repeated_rrq_of_a_transfer_c_started_is_merged(cdaemon: Daemon) -> None:
    (cdaemon.root / "m.bin").write_bytes(b"m" * 3000)
    request = P.encode_rrq(b"m.bin", "octet", {"tsize": "0"})
    client.probe("127.0.0.1", cdaemon.port, "m.bin")
    cdaemon.wait_for_log(r"file=m\.bin .*outcome=probe")  # its socket is a spare now
    s = _client()
    server = ("127.0.0.1", cdaemon.port)
    s.sendto(request, server)
    s.sendto(request, server)
    s.sendto(request, server)
    sources = set()
    s.settimeout(0.5)
    while select.select([s], [], [], 0.5)[0]:
        _, src = s.recvfrom(600)
        sources.add(src)
    assert len(sources) == 1, sources  # one transfer, one TID
    s.sendto(P.encode_error(8, ""), sources.pop())
    cdaemon.wait_for_log(rf":{s.getsockname()[1]} file=m\.bin .*outcome=probe")
    t = _totals(cdaemon)
    assert t["merged"] == 2 and t["probe"] == 2
    s.close()


@pytest.mark.parametrize("bind", ["::1", "::"])
def test_probes_over_ipv6_start_in_c(root: Path, bind: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    (root / "six.bin").write_bytes(b"6" * 3000)
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": "c"}, host=bind)
    request = P.encode_rrq(b"six.bin", "octet", {"tsize": "0"})
    try:
        for i in range(6):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.settimeout(WAIT)
            s.bind(("::1", 0))
            s.sendto(request, ("::1", d.port))
            reply, tid = s.recvfrom(600)
            assert P.parse(reply) == P.OAck({"tsize": "3000"})
            assert tid[0] == "::1" and tid[1] != d.port
            s.sendto(P.encode_error(8, ""), tid)
            d.wait_for_log(r"file=six\.bin .*outcome=probe", count=i + 1)
            s.close()
        t = _totals(d)
    finally:
        d.stop()
    assert t["probe"] == 6 and t["c_starts"] == 5, t  # the first one was Python's


@pytest.mark.parametrize("c_started", [False, True])
def test_a_repeated_rrq_of_an_unanswered_transfer_gets_the_oack_again(
        cdaemon: Daemon, c_started: bool) -> None:
    """A client that did not get the OACK (or a rebooted ROM on the same port) sends
    the same RRQ again: the OACK comes again at once, not at the backed-off timer."""
    (cdaemon.root / "u.bin").write_bytes(b"u" * 2000)
    if c_started:
        client.probe("127.0.0.1", cdaemon.port, "u.bin")
        cdaemon.wait_for_log(r"file=u\.bin .*outcome=probe")  # its socket is a spare now
    request = P.encode_rrq(b"u.bin", "octet", {"tsize": "0"})
    s = _client()
    server = ("127.0.0.1", cdaemon.port)
    s.sendto(request, server)
    first, tid = s.recvfrom(600)  # "lost": not answered
    time.sleep(0.3)  # the client's own timeout, shorter than the server's 1 s
    t0 = time.monotonic()
    s.sendto(request, server)
    again, tid2 = s.recvfrom(600)
    assert (again, tid2) == (first, tid) and time.monotonic() - t0 < 0.5
    s.sendto(P.encode_error(8, ""), tid)
    cdaemon.wait_for_log(rf":{s.getsockname()[1]} file=u\.bin .*retransmits=1 outcome=probe")
    t = _totals(cdaemon)
    assert t["merged"] == 1 and t["c_starts"] == (1 if c_started else 0)
    s.close()
