"""Hostile requests over raw UDP: refused with the right ERROR, never outside the root.

Each request is built by hand (`packet.encode_rrq` with raw bytes names) and sent from a
plain socket, so nothing in our client can soften it. Malformed datagrams must cost a
worker nothing: afterwards the same worker processes serve a normal fetch.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Daemon

from tftpd import client
from tftpd import packet as P

SECRET = b"TOP-SECRET-CONTENT-0123456789"
REPLY_TIMEOUT = 3.0  # s for any one answer


@contextmanager
def udp(family: int = socket.AF_INET) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.settimeout(REPLY_TIMEOUT)
    try:
        yield sock
    finally:
        sock.close()


def ask(daemon: Daemon, datagram: bytes) -> tuple[P.Packet, tuple, list[bytes]]:
    """Send one request; return the first answer, where from, and every datagram seen.

    After the first answer the socket is read until it has been quiet for 0.3 s, so a
    server that errs and then sends data anyway is caught. A transfer that started is
    ended at once with ERROR 0 (so it does not linger until the daemon stops).
    """
    with udp() as sock:
        sock.sendto(datagram, (daemon.host, daemon.port))
        data, src = sock.recvfrom(P.MAX_DATAGRAM)
        seen = [data]
        if data[:2] != b"\x00\x05":
            sock.sendto(P.encode_error(0, "test done"), src)
        sock.settimeout(0.3)
        for _ in range(100):  # bounded: a refusal is one datagram
            try:
                more, _ = sock.recvfrom(P.MAX_DATAGRAM)
            except TimeoutError:
                break
            seen.append(more)
        return P.parse(data), src, seen


def refused(daemon: Daemon, name: bytes, code: int, mode: str = "octet",
            options: dict[str, str] | None = None) -> P.Error:
    pkt, src, seen = ask(daemon, P.encode_rrq(name, mode, options or {}))
    assert isinstance(pkt, P.Error), f"{name!r}: answered {pkt!r}, want ERROR {code}"
    assert pkt.code == code, f"{name!r}: ERROR {pkt.code} {pkt.message!r}, want {code}"
    assert src[1] != daemon.port, "the refusal must come from a new TID"
    assert len(seen) == 1, f"{name!r}: more than the ERROR arrived: {seen[1:3]!r}"
    assert not any(SECRET in d for d in seen)
    return pkt


@pytest.fixture
def secret(root: Path) -> Path:
    """A file next to the root (in its parent) that must never be served."""
    path = root.parent / "secret"
    path.write_bytes(SECRET)
    return path


# -- names that try to leave the root -----------------------------------------------------


@pytest.mark.parametrize("name", [
    b"../secret",
    b"a/../../secret",
    b"..\\..\\secret",
    b"..\\secret",
    b"./../secret",
    b"sub/../../secret",
    b"/../secret",
    b"..",
    b"sub/..",
])
def test_dotdot_refused(daemon: Daemon, secret: Path, name: bytes) -> None:
    (daemon.root / "sub").mkdir()
    refused(daemon, name, P.E_ACCESS)
    daemon.wait_for_log(r"outcome=denied error=2")


@pytest.mark.parametrize("name", [b"/etc/passwd", b"//etc//passwd", b"\\etc\\passwd"])
def test_absolute_path_maps_into_root(daemon: Daemon, name: bytes) -> None:
    err = refused(daemon, name, P.E_NOT_FOUND)
    assert b"root:" not in err.message.encode()
    # With an etc/passwd inside the root, that one is served: absolute means the root.
    (daemon.root / "etc").mkdir()
    (daemon.root / "etc" / "passwd").write_bytes(b"the root's own passwd\n")
    assert client.get("127.0.0.1", daemon.port, name).data == b"the root's own passwd\n"


def test_symlink_out_of_root_refused(daemon: Daemon, secret: Path) -> None:
    (daemon.root / "link").symlink_to(secret)
    (daemon.root / "rel").symlink_to("../secret")
    (daemon.root / "dirlink").symlink_to(secret.parent)
    refused(daemon, b"link", P.E_ACCESS)
    refused(daemon, b"rel", P.E_ACCESS)
    refused(daemon, b"dirlink/secret", P.E_ACCESS)
    daemon.wait_for_log(r"file=link .*outcome=denied error=2")


def test_symlink_inside_root_served(daemon: Daemon) -> None:
    data = random.Random(1).randbytes(5000)
    (daemon.root / "sub").mkdir()
    (daemon.root / "sub" / "real.bin").write_bytes(data)
    (daemon.root / "alias.bin").symlink_to("sub/real.bin")
    (daemon.root / "subalias").symlink_to("sub")
    assert client.get("127.0.0.1", daemon.port, "alias.bin").data == data
    assert client.get("127.0.0.1", daemon.port, "subalias/real.bin").data == data


@pytest.mark.parametrize("name", [b"\x01evil", b"\x1b[31mred\x1b[0m", b"tab\there", b"del\x7f"])
def test_control_bytes_refused_and_escaped(daemon: Daemon, name: bytes) -> None:
    (daemon.root / name.decode("latin-1")).write_bytes(b"should not be served")
    refused(daemon, name, P.E_ACCESS)
    daemon.wait_for_log(r"outcome=denied error=2")
    text = daemon.log_text()
    for raw in name:
        if raw < 0x20 or raw == 0x7F:
            assert chr(raw) not in text, f"raw byte {raw:#x} in the log"
            assert f"\\x{raw:02x}" in text, f"escaped {raw:#x} missing from the log"


def test_overlong_names_refused(daemon: Daemon) -> None:
    err = refused(daemon, b"a" * 2000, P.E_ACCESS)
    assert err.message
    refused(daemon, b"a" * 300, P.E_ACCESS)
    refused(daemon, b"sub/" + b"b" * 300 + b"/c", P.E_ACCESS)
    daemon.wait_for_log(r"outcome=denied error=2 reason=filename component too long", count=2)
    # The name in the log line is bounded, not 2000 bytes.
    assert all(len(line) < 600 for line in daemon.lines)


def test_directory_refused(daemon: Daemon) -> None:
    (daemon.root / "sub").mkdir()
    refused(daemon, b"sub", P.E_ACCESS)
    refused(daemon, b"sub/", P.E_ACCESS)
    refused(daemon, b"/", P.E_ACCESS)
    refused(daemon, b".", P.E_ACCESS)


def test_fifo_refused_without_blocking(daemon: Daemon) -> None:
    os.mkfifo(daemon.root / "fifo")
    (daemon.root / "ok.bin").write_bytes(b"ok" * 1000)
    start = time.monotonic()
    refused(daemon, b"fifo", P.E_ACCESS)
    # The answer, plus ask()'s quiet 0.3 s; an open that blocked would never answer.
    assert time.monotonic() - start < 3.0
    # Both workers still serve (a blocked one would stall every other request).
    for _ in range(8):
        assert client.get("127.0.0.1", daemon.port, "ok.bin", timeout=0.5, retries=1).data \
            == b"ok" * 1000


def test_missing_file(daemon: Daemon) -> None:
    refused(daemon, b"nothing-here", P.E_NOT_FOUND)
    refused(daemon, b"no/such/dir/file", P.E_NOT_FOUND)
    daemon.wait_for_log(r"file=nothing-here protocol=tftp mode=octet outcome=notfound error=1")


def test_write_refused(daemon: Daemon) -> None:
    pkt, _, seen = ask(daemon, P.encode_wrq(b"upload.bin", "octet", {}))
    assert isinstance(pkt, P.Error) and pkt.code == P.E_ACCESS, pkt
    assert len(seen) == 1
    assert not (daemon.root / "upload.bin").exists()
    with pytest.raises(client.TftpError) as err:
        client.put("127.0.0.1", daemon.port, "upload2.bin", b"data")
    assert err.value.code == P.E_ACCESS
    assert not (daemon.root / "upload2.bin").exists()
    daemon.wait_for_log(r"file=upload\.bin .*outcome=denied error=2")


@pytest.mark.parametrize("mode", ["mail", "MAIL", "bogus", "octet\x01", "binary"])
def test_bad_mode_refused(daemon: Daemon, mode: str) -> None:
    (daemon.root / "f.txt").write_bytes(b"text\n")
    refused(daemon, b"f.txt", P.E_ILLEGAL_OP, mode=mode)
    daemon.wait_for_log(r"file=f\.txt .*outcome=denied error=4")
    assert "\x01" not in daemon.log_text()


def test_mode_is_case_insensitive(daemon: Daemon) -> None:
    (daemon.root / "f.txt").write_bytes(b"a\nb")
    pkt, _, _ = ask(daemon, P.encode_rrq(b"f.txt", "OCTET", {}))
    assert pkt == P.Data(1, b"a\nb")
    pkt, _, _ = ask(daemon, P.encode_rrq(b"f.txt", "NetASCII", {}))
    assert pkt == P.Data(1, b"a\r\nb")


@pytest.mark.parametrize("name", [b"sub\\file.txt", b"/sub/file.txt", b"\\sub\\file.txt",
                                  b"sub//file.txt", b"./sub/./file.txt"])
def test_name_forms_served(daemon: Daemon, name: bytes) -> None:
    (daemon.root / "sub").mkdir()
    (daemon.root / "sub" / "file.txt").write_bytes(b"inside sub\n")
    assert client.get("127.0.0.1", daemon.port, name).data == b"inside sub\n"


def test_absolute_name_spelling_the_root_served(daemon: Daemon) -> None:
    (daemon.root / "x.bin").write_bytes(b"x")
    name = os.path.realpath(daemon.root) + "/x.bin"
    assert client.get("127.0.0.1", daemon.port, name).data == b"x"


# -- malformed datagrams --------------------------------------------------------------------


def test_malformed_packets_do_not_kill_workers(daemon: Daemon) -> None:
    data = random.Random(2).randbytes(70_000)
    (daemon.root / "ok.bin").write_bytes(data)
    before = daemon.wait_workers(2)
    many = b"".join(f"opt{i}".encode() + b"\0" + b"1\0" for i in range(1000))
    dropped = [
        b"",
        b"\x00",
        b"\x00\x63" + b"junk" * 10,  # opcode 99
        b"\x00\x01ok.bin octet",  # RRQ without a single NUL
        b"\x00\x01ok.bin\x00",  # RRQ without a mode
        b"\x00\x01\x00octet\x00",  # empty filename
        b"\xff" * 65000,
        bytes(65000),  # opcode 0
    ]
    n_sockets = 8  # several source ports: SO_REUSEPORT spreads them over the workers
    with udp() as s1:
        socks = [s1]
        extra = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n_sockets - 1)]
        try:
            for s in extra:
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            for s in socks:
                for junk in dropped:
                    s.sendto(junk, (daemon.host, daemon.port))
                # DATA, ACK, ERROR and OACK on the listen port are ignored too.
                for stray in (P.encode_data(1, b"x"), P.encode_ack(0),
                              P.encode_error(0, "x"), P.encode_oack({"blksize": "8"})):
                    s.sendto(stray, (daemon.host, daemon.port))
            # Every malformed datagram is dropped with one log line.
            daemon.wait_for_log(r"dropped malformed packet", count=n_sockets * len(dropped))
            # 1000 option pairs: parsed (the first 32 looked at), answered, no crash.
            for s in socks:
                s.settimeout(REPLY_TIMEOUT)
                s.sendto(P.encode_rrq(b"missing.bin", "octet", {}) + many,
                         (daemon.host, daemon.port))
                reply, _ = s.recvfrom(P.MAX_DATAGRAM)
                assert P.parse(reply) == P.Error(P.E_NOT_FOUND, "File not found")
            s1.sendto(P.encode_rrq(b"ok.bin", "octet", {}) + many
                      + b"blksize\0" + b"1024\0", (daemon.host, daemon.port))
            reply, tid = s1.recvfrom(P.MAX_DATAGRAM)
            # blksize is pair 1001: past the parsing bound, so not negotiated.
            assert P.parse(reply) == P.Data(1, data[:512])
            s1.sendto(P.encode_error(0, "enough"), tid)
            daemon.wait_for_log(r"file=ok\.bin .*outcome=aborted")
        finally:
            for s in extra:
                s.close()
    for i in range(4):
        assert client.get("127.0.0.1", daemon.port, "ok.bin",
                          options={"blksize": str(1024 + i)}).data == data
    assert sorted(daemon.worker_pids()) == before
    text = daemon.log_text()
    assert "Traceback" not in text, text[-3000:]
    assert not re.search(r"request from .* failed", text), text[-3000:]
    assert "killed" not in text and "replacing" not in text


def test_unknown_tid_gets_error_5(daemon: Daemon) -> None:
    data = random.Random(5).randbytes(512 * 20 + 7)
    (daemon.root / "multi.bin").write_bytes(data)
    with udp() as a, udp() as b:
        a.sendto(P.encode_rrq(b"multi.bin", "octet", {"blksize": "512"}),
                 (daemon.host, daemon.port))
        raw, tid = a.recvfrom(P.MAX_DATAGRAM)
        assert P.parse(raw) == P.OAck({"blksize": "512"})
        a.sendto(P.encode_ack(0), tid)
        raw, src = a.recvfrom(P.MAX_DATAGRAM)
        assert src == tid and P.parse(raw) == P.Data(1, data[:512])
        # A stranger acknowledges to the server's TID: ERROR 5 to it, the transfer goes on.
        b.sendto(P.encode_ack(1), tid)
        raw, src = b.recvfrom(P.MAX_DATAGRAM)
        assert src == tid
        err = P.parse(raw)
        assert isinstance(err, P.Error) and err.code == P.E_UNKNOWN_TID, err
        got = [data[:512]]
        block = 1
        a.sendto(P.encode_ack(1), tid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            raw, src = a.recvfrom(P.MAX_DATAGRAM)
            pkt = P.parse(raw)
            assert src == tid
            assert isinstance(pkt, P.Data), pkt
            if pkt.block != block + 1:
                continue  # a retransmission
            block += 1
            got.append(pkt.payload)
            a.sendto(P.encode_ack(block), tid)
            if len(pkt.payload) < 512:
                break
        assert b"".join(got) == data
        daemon.wait_for_log(r"file=multi\.bin .*bytes=10247 .*outcome=ok")
        daemon.wait_for_log(rf"ERROR 5 to foreign TID 127\.0\.0\.1:{b.getsockname()[1]}\b")
        b.settimeout(0.3)
        with pytest.raises(TimeoutError):
            b.recvfrom(P.MAX_DATAGRAM)  # one ERROR, no data for the stranger


def test_repeated_misses_answered_every_time_until_the_name_appears(daemon: Daemon) -> None:
    """Known misses are answered by the data path (C: without Python); each one still
    gets its ERROR 1 from a new TID and its log line, and the name served once it is
    there: a new directory or file is a change of the directory the miss was in."""
    name = b"pxelinux.cfg/C0A80A05"
    rrq = P.encode_rrq(name, "octet", {"tsize": "0"})
    n = 12
    with udp() as a, udp() as b:
        for _ in range(n):
            for s in (a, b):
                s.sendto(rrq, (daemon.host, daemon.port))
                reply, src = s.recvfrom(P.MAX_DATAGRAM)
                assert P.parse(reply) == P.Error(P.E_NOT_FOUND, "File not found")
                assert src[1] != daemon.port
        daemon.wait_for_log(r"file=pxelinux\.cfg/C0A80A05 protocol=tftp mode=octet "
                            r"outcome=notfound error=1", count=2 * n)
        # All but the first in each worker came from the negative cache.
        cached = daemon.wait_for_log(r"C0A80A05 .*reason=No such file \(cached\)")
        assert len(cached) >= 2 * n - 2
        (daemon.root / "pxelinux.cfg").mkdir()
        (daemon.root / "pxelinux.cfg" / "C0A80A05").write_bytes(b"menu")
        for s in (a, b):
            s.sendto(rrq, (daemon.host, daemon.port))
            reply, src = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(reply) == P.OAck({"tsize": "4"})
            s.sendto(P.encode_error(8, "probe done"), src)


def test_a_known_miss_supersedes_the_live_transfer_of_its_port(daemon: Daemon) -> None:
    (daemon.root / "big.bin").write_bytes(b"b" * 5000)
    miss = P.encode_rrq(b"loader.conf.local", "octet", {})
    with udp() as s:
        for _ in range(2):  # the second is answered from the cache of the same worker
            s.sendto(miss, (daemon.host, daemon.port))
            assert P.parse(s.recvfrom(P.MAX_DATAGRAM)[0]).code == P.E_NOT_FOUND
        s.sendto(P.encode_rrq(b"big.bin", "octet", {}), (daemon.host, daemon.port))
        data, tid = s.recvfrom(P.MAX_DATAGRAM)
        assert P.parse(data) == P.Data(1, b"b" * 512)
        s.sendto(miss, (daemon.host, daemon.port))  # the client moved on
        assert P.parse(s.recvfrom(P.MAX_DATAGRAM)[0]).code == P.E_NOT_FOUND
        daemon.wait_for_log(r"file=big\.bin .*outcome=aborted reason=superseded")


def test_the_same_request_sees_a_changed_file(daemon: Daemon) -> None:
    """Parsing and negotiation are remembered per request datagram; the answer
    still follows the file: a rewritten file gets its new tsize at once."""
    f = daemon.root / "grows.bin"
    rrq = P.encode_rrq(b"grows.bin", "octet", {"tsize": "0", "blksize": "1456"})
    for size in (1000, 5000, 1000, 70000):
        f.write_bytes(b"g" * size)
        for _ in range(2):
            # A new port each time: the same request from a port whose transfer is
            # still live would be merged with it, not answered again.
            with udp() as s:
                s.sendto(rrq, (daemon.host, daemon.port))
                reply, tid = s.recvfrom(P.MAX_DATAGRAM)
                assert P.parse(reply) == P.OAck({"tsize": str(size), "blksize": "1456"})
                s.sendto(P.encode_error(8, "probe"), tid)


@pytest.mark.parametrize("bind", ["::1", "::"])
def test_ipv6_transfers_probes_and_known_misses(root: Path, datapath: str, bind: str) -> None:
    """Over IPv6 (a wildcard bind learns each request's destination): a download, a
    probe, and a miss answered again and again, each from ::1 and a new TID."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        with udp(socket.AF_INET6):
            pass
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    from conftest import start_daemon

    (root / "six.bin").write_bytes(os.urandom(3000))
    d = start_daemon(root, "--workers", "2", env={"TFTPD_DATAPATH": datapath}, host=bind)
    try:
        assert client.get("::1", d.port, "six.bin").data == (root / "six.bin").read_bytes()
        miss = P.encode_rrq(b"pxelinux.cfg/default", "octet", {"tsize": "0"})
        probe = P.encode_rrq(b"six.bin", "octet", {"tsize": "0"})
        with udp(socket.AF_INET6) as s:
            for _ in range(5):
                s.sendto(miss, ("::1", d.port))
                reply, src = s.recvfrom(P.MAX_DATAGRAM)
                assert P.parse(reply) == P.Error(P.E_NOT_FOUND, "File not found")
                assert src[0] == "::1" and src[1] != d.port
            s.sendto(probe, ("::1", d.port))
            reply, tid = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(reply) == P.OAck({"tsize": "3000"})
            s.sendto(P.encode_error(8, "probe"), tid)
        d.wait_for_log(r"file=six\.bin .*outcome=probe")
        d.wait_for_log(r"file=pxelinux\.cfg/default .*outcome=notfound", count=5)
    finally:
        d.stop()


def test_a_transfer_port_serves_one_client_only(root: Path, datapath: str) -> None:
    """A finished transfer's port is never the next one's (one worker: the next
    transfer gets another TID). A ROM that probes and then reads from the same port,
    and repeats its ERROR 8, cannot end its download with the repeat."""
    from conftest import start_daemon

    (root / "a.bin").write_bytes(b"a" * 700)
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    try:
        with udp() as rom, udp() as other:
            rom.sendto(P.encode_rrq(b"a.bin", "octet", {"tsize": "0"}), (d.host, d.port))
            reply, tid = rom.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(reply) == P.OAck({"tsize": "700"})
            rom.sendto(P.encode_error(8, "probe"), tid)
            d.wait_for_log(r"file=a\.bin .*outcome=probe")
            rom.sendto(P.encode_error(8, "probe"), tid)  # the repeat, to a closed port
            rom.sendto(P.encode_rrq(b"a.bin", "octet", {}), (d.host, d.port))
            reply, tid2 = rom.recvfrom(P.MAX_DATAGRAM)
            assert tid2 != tid, "a probe's port was handed to the next transfer"
            assert P.parse(reply) == P.Data(1, b"a" * 512)
            other.sendto(P.encode_ack(1), tid2)  # a stranger on the new transfer's port
            assert P.parse(other.recvfrom(P.MAX_DATAGRAM)[0]).code == P.E_UNKNOWN_TID
            rom.sendto(P.encode_ack(1), tid2)
            assert P.parse(rom.recvfrom(P.MAX_DATAGRAM)[0]) == P.Data(2, b"a" * 188)
            rom.sendto(P.encode_ack(2), tid2)
        d.wait_for_log(r"file=a\.bin .*bytes=700 .*outcome=ok")
    finally:
        d.stop()


def test_a_last_ack_and_a_new_request_read_together(root: Path, datapath: str) -> None:
    """The final ACK of one transfer and the same client's next RRQ, read in the same
    turn (the worker is stopped while both arrive): the first transfer ends ok, and
    the second is served whole, not taken for the first's end (slots are reused)."""
    import signal as sig

    from conftest import start_daemon

    (root / "one.bin").write_bytes(b"1" * 100)
    (root / "two.bin").write_bytes(b"2" * 700)
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    try:
        (worker,) = d.wait_workers(1)
        with udp() as s:
            s.sendto(P.encode_rrq(b"one.bin", "octet", {}), (d.host, d.port))
            data, tid = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(data) == P.Data(1, b"1" * 100)
            os.kill(worker, sig.SIGSTOP)
            try:
                s.sendto(P.encode_ack(1), tid)
                s.sendto(P.encode_rrq(b"two.bin", "octet", {}), (d.host, d.port))
            finally:
                os.kill(worker, sig.SIGCONT)
            data, tid2 = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(data) == P.Data(1, b"2" * 512)
            s.sendto(P.encode_ack(1), tid2)
            data, _ = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(data) == P.Data(2, b"2" * 188)
            s.sendto(P.encode_ack(2), tid2)
        d.wait_for_log(r"file=one\.bin .*bytes=100 .*outcome=ok")
        d.wait_for_log(r"file=two\.bin .*bytes=700 .*outcome=ok")
    finally:
        d.stop()


def test_the_root_renamed_while_serving(tmp_path: Path, datapath: str) -> None:
    """A transfer running when the root is renamed is served whole (its file is
    open); requests meanwhile are refused with a log line that names the cause; once
    the root is back, it is served again."""
    from conftest import start_daemon

    root = tmp_path / "root"
    root.mkdir()
    big = random.Random(5).randbytes(300_000)
    (root / "big").write_bytes(big)
    (root / "small").write_bytes(b"small")
    d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath})
    try:
        with udp() as s:
            s.sendto(P.encode_rrq(b"big", "octet", {"blksize": "1024"}), (d.host, d.port))
            reply, tid = s.recvfrom(P.MAX_DATAGRAM)
            assert P.parse(reply) == P.OAck({"blksize": "1024"})
            s.sendto(P.encode_ack(0), tid)
            got = [P.parse(s.recvfrom(P.MAX_DATAGRAM)[0])]  # block 1: the file is open
            root.rename(tmp_path / "moved")
            with pytest.raises(client.TftpError) as err:
                client.get(d.host, d.port, "small")
            assert err.value.code == P.E_NOT_FOUND
            d.wait_for_log(r"file=small .*outcome=notfound .*reason=the root \S+ is missing")
            while len(got[-1].payload) == 1024:  # type: ignore[union-attr]
                s.sendto(P.encode_ack(len(got)), tid)
                got.append(P.parse(s.recvfrom(P.MAX_DATAGRAM)[0]))
            s.sendto(P.encode_ack(len(got)), tid)
        assert b"".join(g.payload for g in got) == big  # type: ignore[union-attr]
        d.wait_for_log(r"file=big .*outcome=ok")
        (tmp_path / "moved").rename(root)
        assert client.get(d.host, d.port, "small").data == b"small"
    finally:
        d.stop()
