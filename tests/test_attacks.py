"""What an attacker on the network can try, against the real daemon on loopback.

Each test is one finding of an attack on the server: revoked permissions served from a
warm cache, transfer ports an attacker could predict, a silent address sent more than it
asked for, and log lines a stranger can multiply. Traffic is bounded in count and time.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import start_daemon

from tftpd import client
from tftpd import packet as P

PROBE = {"tsize": "0", "blksize": "1468", "windowsize": "64"}


def _udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2.0)
    return s


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting in the socket."""
    sock.settimeout(0)
    got = []
    while True:
        try:
            got.append(sock.recv(65536))
        except BlockingIOError:
            return got


def _probe_port(port: int, name: str = "f", options: dict[str, str] | None = None) -> int:
    """Send a probe (RRQ with tsize 0, then ERROR 8 on the OACK); the transfer port."""
    s = _udp()
    try:
        s.sendto(P.encode_rrq(name, "octet", options or PROBE), ("127.0.0.1", port))
        data, src = s.recvfrom(65536)
        assert isinstance(P.parse(data), P.OAck), data
        s.sendto(P.encode_error(P.E_OPTIONS, "probe done"), src)
        return int(src[1])
    finally:
        s.close()


# -- permissions are honoured at the moment of the request ------------------------------


@pytest.mark.parametrize("datapath", ["c", "python"])
def test_revoked_permission_is_honoured_by_a_warm_worker(root: Path, datapath: str) -> None:
    # -s: chrooted and serving as nobody, as in.tftpd does when started as root.
    f = root / "f"
    f.write_bytes(b"boot file " * 300)
    f.chmod(0o644)
    d = start_daemon(root, "-s", "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    try:
        for _ in range(3):  # warm: the open-file cache and, on the C path, C's starts
            assert client.get("127.0.0.1", d.port, "f", options=PROBE).data == f.read_bytes()
            assert client.get("127.0.0.1", d.port, "f").data == f.read_bytes()
        f.chmod(0o600)  # root's alone now: nobody may not read it
        for options in (PROBE, None):
            with pytest.raises(client.TftpError) as err:
                client.get("127.0.0.1", d.port, "f", options=options)
            assert err.value.code == P.E_ACCESS
        f.chmod(0o644)  # given back: served again
        assert client.get("127.0.0.1", d.port, "f", options=PROBE).data == f.read_bytes()
    finally:
        d.stop()


# -- transfer ports are unpredictable ---------------------------------------------------


@pytest.mark.parametrize("datapath", ["c", "python"])
@pytest.mark.parametrize("port_range", [None, "20000:59999"])
def test_transfer_ports_are_random_and_never_the_one_just_freed(
        root: Path, datapath: str, port_range: str | None) -> None:
    (root / "f").write_bytes(os.urandom(5000))
    args = ["--workers", "1"] + (["-R", port_range] if port_range else [])
    d = start_daemon(root, *args, env={"TFTPD_DATAPATH": datapath})
    try:
        ports = [_probe_port(d.port) for _ in range(20)]
        # The transfer that follows a probe is served from a port of its own too.
        got = client.get("127.0.0.1", d.port, "f", options={"blksize": "1468"})
        ports.append(got.server[1])
    finally:
        d.stop()
    assert all(a != b for a, b in zip(ports, ports[1:], strict=False)), ports
    # 21 draws from thousands of ports: two alike is a ~1 % chance, three a vanishing one.
    assert len(set(ports)) >= 19, ports
    if port_range:
        lo, hi = map(int, port_range.split(":"))
        assert all(lo <= p <= hi for p in ports), ports
    # Not a counter either: successive ports are not a step apart.
    steps = {b - a for a, b in zip(ports, ports[1:], strict=False)}
    assert len(steps) > 10, ports


# -- an address that has not proved it is there is sent little --------------------------


@pytest.mark.parametrize("datapath", ["c", "python"])
def test_a_peer_that_acknowledges_no_data_gets_about_two_windows(root: Path,
                                                                 datapath: str) -> None:
    # The attack: spoof an RRQ and its ACK 0 from a victim, then let the victim stay
    # silent. Here the "victim" is a socket that reads and never answers.
    (root / "big").write_bytes(os.urandom(4 << 20))
    d = start_daemon(root, "--workers", "1", "--retries", "4",
                     env={"TFTPD_DATAPATH": datapath})
    window, blksize = 64, 1468
    victim = _udp()
    try:
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        asked = {"blksize": str(blksize), "windowsize": str(window), "timeout": "1"}
        victim.sendto(P.encode_rrq("big", "octet", asked), ("127.0.0.1", d.port))
        oack, tid = victim.recvfrom(65536)
        assert P.parse(oack) == P.OAck(asked)
        victim.sendto(P.encode_ack(0), tid)
        d.wait_for_log(r"file=big .*outcome=failed", timeout=30)
        received = sum(max(0, len(data) - 4) for data in _drain(victim))
    finally:
        victim.close()
        d.stop()
    # The window, the window again, then block 1 on each of the (4 - 1) later tries.
    sent = window * blksize
    assert received == 2 * sent + 3 * blksize, (received, sent)


def test_a_silent_lock_step_peer_gets_a_few_blocks(root: Path) -> None:
    (root / "big").write_bytes(os.urandom(1 << 20))
    d = start_daemon(root, "--workers", "1", "-T", "100000")
    victim = _udp()
    try:
        victim.sendto(P.encode_rrq("big", "octet", {}), ("127.0.0.1", d.port))
        d.wait_for_log(r"file=big .*outcome=failed", timeout=30)
        got = _drain(victim)
        assert all(P.parse(data) == P.Data(1, data[4:]) for data in got)
        blocks = len(got)
    finally:
        victim.close()
        d.stop()
    assert 1 <= blocks <= 4


# -- a stranger cannot multiply our log lines -------------------------------------------


def _lines(d: object, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for ln in d.log_text().splitlines() if rx.search(ln))  # type: ignore[attr-defined]


@pytest.mark.parametrize("datapath", ["c", "python"])
def test_log_lines_one_address_can_cause_are_bounded(root: Path, datapath: str) -> None:
    (root / "big").write_bytes(os.urandom(8 << 20))
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    flood = 3000
    try:
        # A transfer to aim at, kept going: its port gets datagrams from foreign TIDs.
        real = _udp()
        real.sendto(P.encode_rrq("big", "octet", {"blksize": "512"}), ("127.0.0.1", d.port))
        _, tid = real.recvfrom(65536)
        real.sendto(P.encode_ack(0), tid)
        real.settimeout(0)
        stranger = _udp()
        deadline = time.monotonic() + 30
        for i in range(flood):
            assert time.monotonic() < deadline
            stranger.sendto(P.encode_ack(1), tid)                       # ERROR 5
            stranger.sendto(b"\x00\x09garbage", ("127.0.0.1", d.port))   # malformed
            stranger.sendto(P.encode_rrq(f"missing-{i}", "octet", {}),  # misses
                            ("127.0.0.1", d.port))
            stranger.sendto(P.encode_rrq("x", "mail", {}), ("127.0.0.1", d.port))
            try:
                while True:
                    data = real.recv(65536)
                    real.sendto(P.encode_ack(int.from_bytes(data[2:4], "big")), tid)
            except BlockingIOError:
                pass
            if i % 500 == 499:  # let the worker catch up: the flood is read, not dropped
                assert client.get("127.0.0.1", d.port, "big", timeout=5).data
        d.wait_for_log(r"more like this from 127\.0\.0\.1", timeout=30)
        real.close()
        stranger.close()
    finally:
        d.stop()
    text = d.log_text()
    total = len(text.splitlines())
    # 12,000 datagrams of bad input from one address: a bounded number of lines, the
    # rest summarised as counts.
    assert total < 1500, (total, text[-3000:])
    summarised = sum(int(n) for n in re.findall(r"(\d+) more like this from 127\.0\.0\.1",
                                                text))
    assert summarised > 3 * flood - 1500, (summarised, text[-3000:])


@pytest.mark.parametrize("datapath", ["c", "python"])
def test_a_transfer_port_tells_strangers_nothing(root: Path, datapath: str) -> None:
    """The random transfer port is what keeps a spoofer from acknowledging blocks for
    its victim. Answered with ERROR 5, a scan from another address finds it in a second;
    a transfer's port therefore answers no other host, and the client's own host (RFC
    1350's stray datagram) a few times only: no oracle, and no reflector."""
    from tftpd.transfer import FOREIGN_REPLIES

    (root / "big").write_bytes(os.urandom(1 << 20))
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    real, stranger, neighbour = _udp(), _udp("127.0.0.2"), _udp()
    try:
        real.sendto(P.encode_rrq("big", "octet", {"blksize": "1024"}), ("127.0.0.1", d.port))
        raw, tid = real.recvfrom(65536)
        assert P.parse(raw) == P.OAck({"blksize": "1024"})
        for sock in (stranger, neighbour):
            for _ in range(10):
                sock.sendto(P.encode_ack(0), tid)
        stranger.settimeout(0.5)
        with pytest.raises(TimeoutError):
            stranger.recvfrom(65536)
        answers = []
        neighbour.settimeout(0.5)
        try:
            while len(answers) <= FOREIGN_REPLIES:
                answers.append(P.parse(neighbour.recvfrom(65536)[0]))
        except TimeoutError:
            pass
        assert answers == [P.Error(5, "Unknown transfer ID")] * FOREIGN_REPLIES
        # None of it was taken for the client's ACK: the transfer waits for the client.
        real.settimeout(0.3)
        with pytest.raises(TimeoutError):
            while True:
                assert P.parse(real.recvfrom(65536)[0]) == P.OAck({"blksize": "1024"})
        real.settimeout(5.0)
        real.sendto(P.encode_ack(0), tid)
        assert P.parse(real.recvfrom(65536)[0]).block == 1  # type: ignore[union-attr]
        real.sendto(P.encode_error(0, "enough"), tid)
        d.wait_for_log(r"file=big .*outcome=aborted")
    finally:
        for sock in (real, stranger, neighbour):
            sock.close()
        d.stop()


def test_transfer_records_are_bounded_in_all_too() -> None:
    """Records of answered transfers are bounded per address, and in all: one host can
    answer from as many addresses as its IPv6 /64 holds. A storm's thousand clients stay
    well inside the bound (pxe: 2 records a client, mfs: 11)."""
    from tftpd.http.server import HttpTally
    from tftpd.worker.records import RECORDS_TOTAL, TransferLog

    assert RECORDS_TOTAL >= 11 * 1000
    for throttle in (TransferLog(memoryview(bytearray(4096)), None, False).records,  # type: ignore[arg-type]
                     HttpTally(None, 1).records):
        allowed = sum(throttle.allow(f"2001:db8::{i:x}", 0.0) for i in range(RECORDS_TOTAL + 5))
        assert allowed == RECORDS_TOTAL


def test_a_narrow_port_range_is_warned_about(root: Path) -> None:
    """Transfer ports are what keeps a spoofer from acknowledging for a client; a range
    of a few ports makes them guessable, and the operator hears so at the start."""
    d = start_daemon(root, "-R", "40000:40099")
    try:
        d.wait_for_log(r"--port-range 40000:40099 holds 100 ports: .*guess")
    finally:
        d.stop()
    wide = start_daemon(root, "-R", "20000:59999")
    try:
        wide.wait_for_log(r"serving .* on 127\.0\.0\.1:")  # past the start's warnings
    finally:
        wide.stop()
    assert "--port-range" not in wide.log_text()
