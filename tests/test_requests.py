"""Requests read by the data path, and known misses it answers alone (both paths).

`DataPath.requests` reads the listen socket; a request in the `KnownAnswers` table is
answered at once from the error socket, every other one is handed back. These tests
drive both implementations over loopback and compare what they report and send.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_ext

from tftpd import packet as P
from tftpd.datapath import (
    REQ_ANSWERED,
    REQ_BATCH,
    REQ_PASS,
    DataPath,
    KnownAnswers,
    dir_identity,
    get_datapath,
)

WAIT = 2.0  # s, for a datagram on loopback
MISSING = P.encode_rrq(b"pxelinux.cfg/01-52-54-00-12-34-56", "octet", {"tsize": "0"})
NOT_FOUND = P.encode_error(P.E_NOT_FOUND, "File not found")


@pytest.fixture(params=["c", "python"])
def datapath(request: pytest.FixtureRequest) -> DataPath:
    if request.param == "c":
        need_ext()
    return get_datapath(request.param)


def _udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(WAIT)
    return s


@pytest.fixture
def listen() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A listen socket as the worker sets it up, and its error socket."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    lsock.bind(("0.0.0.0", 0))
    from tftpd.worker import enable_pktinfo

    enable_pktinfo(lsock)
    err = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    err.bind(("0.0.0.0", 0))
    yield lsock, err
    lsock.close()
    err.close()


def _read(dp: DataPath, lsock: socket.socket, err: socket.socket, refusals: KnownAnswers | None,
          want: int, pktinfo: bool = True) -> list:
    """Read until `want` requests came (bounded by WAIT)."""
    out: list = []
    end = time.monotonic() + WAIT
    while len(out) < want and time.monotonic() < end:
        out += dp.requests(lsock, err, pktinfo, refusals, time.monotonic())
    return out


def _known(dp: DataPath, tmp_path: Path, request: bytes = MISSING,
           ttl: float = 30.0) -> KnownAnswers:
    refusals = KnownAnswers(dp)
    directory = str(tmp_path / "pxelinux.cfg")
    refusals.put(request, NOT_FOUND, time.monotonic() + ttl, directory,
                 dir_identity(directory), note="a note")
    return refusals


def test_nothing_waiting_reads_nothing(datapath: DataPath, listen: tuple) -> None:
    lsock, err = listen
    assert datapath.requests(lsock, err, True, None, time.monotonic()) == []


def test_unknown_requests_pass_with_their_ancillary_data(datapath: DataPath,
                                                         listen: tuple) -> None:
    lsock, err = listen
    port = lsock.getsockname()[1]
    with _udp() as c:
        me = c.getsockname()
        before = time.time()
        c.sendto(MISSING, ("127.0.0.2", port))
        (kind, refusal, e, data, src, dst, ifindex, arrival, _, _), = _read(
            datapath, lsock, err, None, 1)
    assert (kind, refusal, e, data) == (REQ_PASS, None, 0, MISSING)
    assert src == me
    assert dst == "127.0.0.2"  # where it was sent: a wildcard listener learns it
    assert ifindex == socket.if_nametoindex("lo")
    assert before - 1 <= arrival <= time.time() + 1


def test_known_miss_answered_from_the_address_asked(datapath: DataPath, listen: tuple,
                                                    tmp_path: Path) -> None:
    lsock, err = listen
    refusals = _known(datapath, tmp_path)
    port = lsock.getsockname()[1]
    with _udp() as c:
        me = c.getsockname()
        c.sendto(MISSING, ("127.0.0.3", port))
        events = _read(datapath, lsock, err, refusals, 1)
        reply, server = c.recvfrom(P.MAX_DATAGRAM)
    (kind, refusal, e, data, src, dst, _, arrival, answered, _), = events
    assert kind == REQ_ANSWERED and e == 0 and data == b""
    assert refusal is not None and refusal.note == "a note"
    assert src == me and dst == "127.0.0.3"
    assert reply == NOT_FOUND
    # A new TID, from the address the client asked (pktinfo), not the listen port.
    assert server == ("127.0.0.3", err.getsockname()[1])
    assert answered >= arrival > 0


def test_only_the_identical_request_is_answered(datapath: DataPath, listen: tuple,
                                                tmp_path: Path) -> None:
    lsock, err = listen
    refusals = _known(datapath, tmp_path)
    port = lsock.getsockname()[1]
    other = P.encode_rrq(b"pxelinux.cfg/01-52-54-00-12-34-56", "octet", {"tsize": "1"})
    with _udp() as c:
        for datagram in (other, MISSING[:-1], MISSING + b"x\0"):
            c.sendto(datagram, ("127.0.0.1", port))
        events = _read(datapath, lsock, err, refusals, 3)
    assert [ev[0] for ev in events] == [REQ_PASS] * 3


def test_a_changed_directory_or_an_expired_entry_passes(datapath: DataPath, listen: tuple,
                                                        tmp_path: Path) -> None:
    lsock, err = listen
    port = lsock.getsockname()[1]
    refusals = _known(datapath, tmp_path)  # pxelinux.cfg/ missing: stat fails
    with _udp() as c:
        c.sendto(MISSING, ("127.0.0.1", port))
        assert [ev[0] for ev in _read(datapath, lsock, err, refusals, 1)] == [REQ_ANSWERED]
        c.recvfrom(P.MAX_DATAGRAM)
        (tmp_path / "pxelinux.cfg").mkdir()  # now it may hold the name
        c.sendto(MISSING, ("127.0.0.1", port))
        assert [ev[0] for ev in _read(datapath, lsock, err, refusals, 1)] == [REQ_PASS]
        # Known again with the directory present; a file added to it is a change.
        # (Its mtime is set back first: file times tick coarsely, and within one tick
        # an added entry could leave it unchanged.)
        os.utime(tmp_path / "pxelinux.cfg", (1_000_000_000, 1_000_000_000))
        refusals = _known(datapath, tmp_path)
        c.sendto(MISSING, ("127.0.0.1", port))
        assert [ev[0] for ev in _read(datapath, lsock, err, refusals, 1)] == [REQ_ANSWERED]
        c.recvfrom(P.MAX_DATAGRAM)
        (tmp_path / "pxelinux.cfg" / "01-52-54-00-12-34-56").write_bytes(b"x")
        c.sendto(MISSING, ("127.0.0.1", port))
        assert [ev[0] for ev in _read(datapath, lsock, err, refusals, 1)] == [REQ_PASS]
        expired = _known(datapath, tmp_path, ttl=-1.0)
        c.sendto(MISSING, ("127.0.0.1", port))
        assert [ev[0] for ev in _read(datapath, lsock, err, expired, 1)] == [REQ_PASS]


def test_a_batch_mixes_answers_and_passes_in_order(datapath: DataPath, listen: tuple,
                                                   tmp_path: Path) -> None:
    lsock, err = listen
    refusals = _known(datapath, tmp_path)
    port = lsock.getsockname()[1]
    wanted = P.encode_rrq(b"nbp.efi", "octet", {"tsize": "0"})
    n = REQ_BATCH + 8  # more than one call's worth
    clients = [_udp() for _ in range(4)]
    try:
        for i in range(n):
            clients[i % 4].sendto(MISSING if i % 2 else wanted, ("127.0.0.1", port))
        events = _read(datapath, lsock, err, refusals, n)
        assert [ev[0] for ev in events] == [REQ_ANSWERED if i % 2 else REQ_PASS
                                            for i in range(n)]
        assert [ev[4] for ev in events] == [clients[i % 4].getsockname() for i in range(n)]
        assert all(ev[3] == wanted for ev in events if ev[0] == REQ_PASS)
        for i, c in enumerate(clients):
            mine = sum(1 for j in range(n) if j % 4 == i and j % 2)
            for _ in range(mine):
                assert c.recvfrom(P.MAX_DATAGRAM)[0] == NOT_FOUND
    finally:
        for c in clients:
            c.close()


def test_refusals_rebuild_keeps_the_live_entries(datapath: DataPath, listen: tuple,
                                                 tmp_path: Path) -> None:
    lsock, err = listen
    refusals = KnownAnswers(datapath, capacity=8)
    directory = str(tmp_path)
    ident = dir_identity(directory)
    far = time.monotonic() + 60
    names = [P.encode_rrq(f"guess-{i}".encode(), "octet", {}) for i in range(12)]
    for i, name in enumerate(names):
        refusals.put(name, NOT_FOUND, far if i != 9 else time.monotonic() - 1, directory,
                     ident, i)
    assert len(refusals) <= 4  # rebuilt to half capacity or less, the newest kept
    port = lsock.getsockname()[1]
    with _udp() as c:
        for name in names:
            c.sendto(name, ("127.0.0.1", port))
        events = _read(datapath, lsock, err, refusals, len(names))
    answered = [ev[1].note for ev in events if ev[0] == REQ_ANSWERED]
    # Exactly the entries kept: the newest, never the expired one.
    assert len(answered) == len(refusals) and 11 in answered and 9 not in answered
    assert answered == sorted(answered) and min(answered) >= 12 - 8
    # A request that misses again is refreshed in place, not entered twice.
    before = len(refusals)
    refusals.put(names[11], NOT_FOUND, far, directory, ident, "again")
    assert len(refusals) == before


def test_capacity_must_be_a_power_of_two(datapath: DataPath) -> None:
    with pytest.raises(ValueError):
        KnownAnswers(datapath, capacity=100)


def test_ipv6_known_miss_answered_from_the_address_asked(datapath: DataPath,
                                                         tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    from tftpd.worker import enable_pktinfo

    lsock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    err = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        try:
            lsock.bind(("::", 0))
            c.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        enable_pktinfo(lsock)
        err.bind(("::", 0))
        c.settimeout(WAIT)
        refusals = _known(datapath, tmp_path)
        port = lsock.getsockname()[1]
        wanted = P.encode_rrq(b"nbp.efi", "octet", {})
        c.sendto(wanted, ("::1", port))
        c.sendto(MISSING, ("::1", port))
        events = _read(datapath, lsock, err, refusals, 2)
        assert [ev[0] for ev in events] == [REQ_PASS, REQ_ANSWERED]
        for ev in events:
            assert ev[4][:2] == c.getsockname()[:2]
            assert ev[5] == "::1" and ev[6] == socket.if_nametoindex("lo")
        assert events[0][3] == wanted
        reply, server = c.recvfrom(P.MAX_DATAGRAM)
        assert reply == NOT_FOUND
        assert server[:2] == ("::1", err.getsockname()[1])
    finally:
        for s in (lsock, err, c):
            s.close()


def test_c_and_twin_report_and_answer_alike(tmp_path: Path) -> None:
    """The same datagrams (known misses, near misses, junk, empty, large) through the
    C reader and its Python twin: the same events and the same replies, in order."""
    import random

    need_ext("the twin is compared with C: ")
    from tftpd.worker import enable_pktinfo

    rng = random.Random(7)
    known = [P.encode_rrq(f"guess-{i}".encode(), "octet", {"tsize": "0"}) for i in range(5)]
    datagrams = []
    for _ in range(300):  # bounded
        pick = rng.random()
        if pick < 0.4:
            datagrams.append(rng.choice(known))
        elif pick < 0.6:
            k = rng.choice(known)
            datagrams.append(k[:-1] if rng.random() < 0.5 else k + b"x")
        elif pick < 0.9:
            datagrams.append(rng.randbytes(rng.randint(0, 600)))
        else:
            datagrams.append(rng.randbytes(rng.randint(1, 9000)))
    results = {}
    for name in ("c", "python"):
        dp = get_datapath(name)
        refusals = KnownAnswers(dp)
        for i, k in enumerate(known):
            refusals.put(k, P.encode_error(1, f"no {i}"), time.monotonic() + 60,
                         str(tmp_path), dir_identity(str(tmp_path)), i)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        lsock.bind(("127.0.0.1", 0))
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        enable_pktinfo(lsock)
        err = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        err.bind(("127.0.0.1", 0))
        c = _udp()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            events = []
            for d in datagrams:  # one at a time: no loss on loopback, order kept
                c.sendto(d, lsock.getsockname())
                events += _read(dp, lsock, err, refusals, 1)
            replies = []
            for _ in range(sum(1 for e in events if e[0] == REQ_ANSWERED)):
                replies.append(c.recvfrom(P.MAX_DATAGRAM)[0])
            results[name] = ([(e[0], e[1].note if e[1] else None, e[2], e[3])
                              for e in events], replies)
        finally:
            for s in (lsock, err, c):
                s.close()
    assert len(results["c"][0]) == len(datagrams)
    assert results["c"] == results["python"]
    answered = [d for d in datagrams if d in known]
    assert [e[1] for e in results["c"][0] if e[0] == REQ_ANSWERED] == \
        [known.index(d) for d in answered]


def test_the_tables_hash_is_siphash_under_a_random_key() -> None:
    # The known-answer table and the peer table are indexed by tftpd_hash: keyed,
    # a client cannot choose requests (or addresses) that all land in one chain.
    need_ext()
    import subprocess
    import sys

    from tftpd import _datapath  # type: ignore[attr-defined]

    lib = _datapath.lib
    # The reference vector of SipHash-2-4: key 00..0f, message 00..0e.
    lib.tftpd_hash_key(0x0706050403020100, 0x0F0E0D0C0B0A0908)
    try:
        assert lib.tftpd_hash(bytes(range(15)), 15) == 0xA129CA6149BE45E5
        assert lib.tftpd_hash(b"", 0) == 0x726FDB47DD0E0E31
    finally:
        lib.tftpd_hash_key(int.from_bytes(os.urandom(8), "little"),
                           int.from_bytes(os.urandom(8), "little"))
    # Each process that loads the data path draws its own key.
    code = ("from tftpd import datapath, _datapath; "
            "print(_datapath.lib.tftpd_hash(b'pxelinux.0', 10))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout for _ in range(3)}
    assert len(runs) == 3
