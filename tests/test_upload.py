"""Uploads: in.tftpd's rules, nothing partial left behind, every real client."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon

from tftpd import client
from tftpd import packet as P
from tftpd.transfer import Commit, Finish, Send, Write, WriteTransfer

PEER = ("192.0.2.1", 2000)


def data(block: int, payload: bytes) -> bytes:
    return P.encode_data(block, payload)


# -- the state machine -------------------------------------------------------------------

def test_lock_step_then_dally() -> None:
    t = WriteTransfer(PEER, blksize=4, timeout=1.0)
    assert t.start(0.0) == [Send(P.encode_ack(0))]
    assert t.on_datagram(data(1, b"abcd"), PEER, 0.1) == [Write(0, b"abcd"),
                                                          Send(P.encode_ack(1))]
    assert t.on_datagram(data(1, b"abcd"), PEER, 0.2) == [Send(P.encode_ack(1))]  # repeat
    assert t.on_datagram(data(2, b"ef"), PEER, 0.3) == [Write(4, b"ef"), Commit(),
                                                        Send(P.encode_ack(2))]
    # Our last ACK was lost: the client sends DATA 2 again while we dally.
    assert t.on_datagram(data(2, b"ef"), PEER, 0.5) == [Send(P.encode_ack(2))]
    assert t.on_timer(1.4) == [Finish("ok")]
    assert t.size == 6


def test_window_acks_and_gap() -> None:
    t = WriteTransfer(PEER, blksize=4, windowsize=3, oack={"windowsize": "3"})
    assert t.start(0.0) == [Send(P.encode_oack({"windowsize": "3"}))]
    assert t.on_datagram(data(1, b"aaaa"), PEER, 0.1) == [Write(0, b"aaaa")]
    # Block 2 lost: ACK the last in order once, not once per stray.
    assert t.on_datagram(data(3, b"cccc"), PEER, 0.1) == [Send(P.encode_ack(1))]
    assert t.on_datagram(data(4, b"dddd"), PEER, 0.1) == []
    assert t.on_datagram(data(2, b"bbbb"), PEER, 0.2) == [Write(4, b"bbbb")]
    assert t.on_datagram(data(3, b"cccc"), PEER, 0.2) == [Write(8, b"cccc")]
    assert t.on_datagram(data(4, b"dddd"), PEER, 0.2) == [Write(12, b"dddd"),
                                                          Send(P.encode_ack(4))]


def test_timeouts_resend_the_last_ack_then_give_up() -> None:
    t = WriteTransfer(PEER, blksize=4, timeout=1.0, retries=2)
    t.start(0.0)
    assert t.on_timer(1.0) == [Send(P.encode_ack(0))]
    assert t.on_timer(3.0) == [Send(P.encode_ack(0))]
    assert t.on_timer(7.0) == [Finish("failed", "timeout: client stopped sending")]


def test_size_limit_and_client_error() -> None:
    t = WriteTransfer(PEER, blksize=4, max_size=6)
    t.start(0.0)
    t.on_datagram(data(1, b"abcd"), PEER, 0.1)
    out = t.on_datagram(data(2, b"efgh"), PEER, 0.2)
    assert out[0] == Send(P.encode_error(P.E_DISK_FULL, "Upload exceeds the size limit"))
    assert isinstance(out[1], Finish) and out[1].outcome == "failed"
    t = WriteTransfer(PEER)
    t.start(0.0)
    assert t.on_datagram(P.encode_error(0, "cancel"), PEER, 0.1)[0].outcome == "aborted"


def test_a_dallying_upload_ends_ok_however_it_ends() -> None:
    """After its last block the file is in place; the dally only guards the final ACK,
    so whatever ends it from outside (a new request from the same port, an ERROR, a
    socket error) leaves the upload ok. Before that, the same ends are what they say."""
    def committed() -> WriteTransfer:
        t = WriteTransfer(PEER, blksize=4, timeout=1.0)
        t.start(0.0)
        assert Commit() in t.on_datagram(data(1, b"ab"), PEER, 0.1)
        return t
    assert committed().end("aborted", "superseded by a new request") == Finish("ok")
    assert committed().end("failed", "socket error: Connection refused") == Finish("ok")
    # The worker could not carry out the commit: that is the transfer's own failure.
    assert committed().fail("File already exists") == Finish("failed", "File already exists")
    assert committed().on_datagram(P.encode_error(0, "bye"), PEER, 0.2) == [Finish("ok")]
    t = WriteTransfer(PEER, blksize=4, timeout=1.0)
    t.start(0.0)
    t.on_datagram(data(1, b"abcd"), PEER, 0.1)
    assert t.end("aborted", "superseded by a new request") == Finish(
        "aborted", "superseded by a new request")


# -- the daemon ---------------------------------------------------------------------------

@pytest.fixture
def updaemon(root: Path, datapath: str) -> Daemon:
    d = start_daemon(root, "--workers", "2", "-c", "--max-upload", "5000000",
                     env={"TFTPD_DATAPATH": datapath})
    yield d  # type: ignore[misc]
    d.stop()


def leftovers(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("."))


def test_uploads_from_every_client(updaemon: Daemon, root: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    payload = os.urandom(200_000)
    src.write_bytes(payload)
    port = str(updaemon.port)
    runs = {"ours": None}
    client.put("127.0.0.1", updaemon.port, "ours", payload, options={"blksize": "1468"})
    if shutil.which("curl"):
        runs["curl"] = ["curl", "-s", "-T", str(src), f"tftp://127.0.0.1:{port}/curl"]
    if shutil.which("tftp"):
        runs["hpa"] = ["tftp", "127.0.0.1", port, "-m", "binary", "-c", "put", str(src), "hpa"]
    if shutil.which("atftp"):
        runs["atftp"] = ["atftp", "-p", "-l", str(src), "-r", "atftp", "--option",
                         "windowsize 8", "127.0.0.1", port]
    if shutil.which("busybox"):
        runs["bb"] = ["busybox", "tftp", "-p", "-l", str(src), "-r", "bb", "-b", "1024",
                      "127.0.0.1", port]
    for name, argv in runs.items():
        if argv:
            subprocess.run(argv, check=True, timeout=60, capture_output=True)
        got = root / name
        assert got.read_bytes() == payload, name
        assert stat.S_IMODE(got.stat().st_mode) == 0o644  # 0666 less the default umask
    updaemon.wait_for_log(r"file=atftp .* window=8 .*outcome=ok" if "atftp" in runs
                          else r"file=ours .*outcome=ok")
    assert leftovers(root) == []


def test_an_upload_superseded_while_dallying_is_recorded_ok(updaemon: Daemon,
                                                           root: Path) -> None:
    """A client's next request can come from the port its finished upload used (an
    ephemeral port reused, or one client doing both): the upload stays ok."""
    (root / "next").write_bytes(b"the next file")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(("127.0.0.1", 0))
        s.sendto(P.encode_wrq("dallied", options={"timeout": "5"}),
                 ("127.0.0.1", updaemon.port))
        oack, server = s.recvfrom(P.MAX_DATAGRAM)
        assert P.parse(oack) == P.OAck({"timeout": "5"})
        s.sendto(data(1, b"all of it"), server)
        ack, _ = s.recvfrom(P.MAX_DATAGRAM)
        assert ack == P.encode_ack(1)
        # Within the 5 s dally, a new request from the same address and port.
        s.sendto(P.encode_rrq("next"),
                 ("127.0.0.1", updaemon.port))
        first, _ = s.recvfrom(P.MAX_DATAGRAM)
        assert first == P.encode_data(1, b"the next file")
    assert (root / "dallied").read_bytes() == b"all of it"
    line, = updaemon.wait_for_log(r"file=dallied ")
    assert "outcome=ok" in line, line


def test_an_upload_whose_commit_fails_is_recorded_failed(updaemon: Daemon,
                                                         root: Path) -> None:
    """Two clients upload the same new name at once: the second's last block arrives
    after the first has put the file in place, so its commit fails. That upload failed
    (its client hears ERROR 6), though it had entered its dally."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        tids = []
        for s in socks:
            s.settimeout(5)
            s.bind(("127.0.0.1", 0))
            s.sendto(P.encode_wrq("twice.bin"), ("127.0.0.1", updaemon.port))
            ack0, tid = s.recvfrom(P.MAX_DATAGRAM)
            assert ack0 == P.encode_ack(0)
            tids.append(tid)
        socks[0].sendto(data(1, b"first"), tids[0])
        assert socks[0].recvfrom(P.MAX_DATAGRAM)[0] == P.encode_ack(1)
        socks[1].sendto(data(1, b"second"), tids[1])
        err = P.parse(socks[1].recvfrom(P.MAX_DATAGRAM)[0])
        assert isinstance(err, P.Error) and err.code == P.E_EXISTS
        late = socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()
    assert (root / "twice.bin").read_bytes() == b"first"
    line, = updaemon.wait_for_log(rf"127\.0\.0\.1:{late} file=twice\.bin ")
    assert "outcome=failed" in line, line


def test_existing_files_are_kept_unless_allowed(root: Path) -> None:
    (root / "keep").write_bytes(b"precious")
    (root / "shared").write_bytes(b"old")
    os.chmod(root / "shared", 0o666)
    d = start_daemon(root, "-c")
    try:
        with pytest.raises(client.TftpError) as exc:
            client.put("127.0.0.1", d.port, "keep", b"overwritten")
        assert exc.value.code == P.E_EXISTS
        assert (root / "keep").read_bytes() == b"precious"
        client.put("127.0.0.1", d.port, "shared", b"new")  # world-writable: in.tftpd's rule
        assert (root / "shared").read_bytes() == b"new"
        (root / "link").symlink_to(root / "keep")
        with pytest.raises(client.TftpError):
            client.put("127.0.0.1", d.port, "link", b"through a link")
        assert (root / "keep").read_bytes() == b"precious"
        with pytest.raises(client.TftpError) as exc:
            client.put("127.0.0.1", d.port, "nodir/x", b"x")
        assert exc.value.code == P.E_NOT_FOUND
    finally:
        d.stop()
    d = start_daemon(root, "-c", "-p", "-U", "077")
    try:
        client.put("127.0.0.1", d.port, "keep", b"replaced")  # --permissive
        assert (root / "keep").read_bytes() == b"replaced"
        client.put("127.0.0.1", d.port, "private", b"p")
        assert stat.S_IMODE((root / "private").stat().st_mode) == 0o600
    finally:
        d.stop()


def test_uploads_are_off_by_default(daemon: Daemon, root: Path) -> None:
    with pytest.raises(client.TftpError) as exc:
        client.put("127.0.0.1", daemon.port, "x", b"data")
    assert exc.value.code == P.E_ACCESS
    assert not (root / "x").exists()


def test_announced_size_over_the_limit(root: Path) -> None:
    d = start_daemon(root, "-c", "--max-upload", "1000")
    try:
        with pytest.raises(client.TftpError) as exc:
            client.put("127.0.0.1", d.port, "big", b"x" * 10, options={"tsize": "5000"})
        assert exc.value.code == P.E_DISK_FULL
        with pytest.raises(client.TftpError) as exc:  # no tsize: stopped at the limit
            client.put("127.0.0.1", d.port, "big", b"x" * 3000)
        assert exc.value.code == P.E_DISK_FULL
        assert os.listdir(root) == []
    finally:
        d.stop()


def test_upload_cut_halfway_leaves_nothing(root: Path) -> None:
    d = start_daemon(root, "-c", "-T", "100000", "--retries", "2")
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        sock.sendto(P.encode_wrq("half.bin"), ("127.0.0.1", d.port))
        ack, server = sock.recvfrom(100)
        assert P.parse(ack) == P.Ack(0)
        for block in range(1, 11):  # 10 full blocks, then the client dies
            sock.sendto(data(block, bytes(512)), server)
            while P.parse(sock.recvfrom(100)[0]) != P.Ack(block):
                pass
        sock.close()
        d.wait_for_log(r"file=half.bin .*outcome=failed", timeout=10)
        assert os.listdir(root) == []  # neither the file nor a temporary
    finally:
        d.stop()


def test_disk_full_is_error_3_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = tmp_path / "small"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = start_daemon(root, "-c")
        try:
            with pytest.raises(client.TftpError) as exc:
                client.put("127.0.0.1", d.port, "big", os.urandom(300_000))
            assert exc.value.code == P.E_DISK_FULL
            d.wait_for_log(r"file=big .*outcome=failed reason=disk full")
            deadline = time.monotonic() + 5
            while os.listdir(root) and time.monotonic() < deadline:
                time.sleep(0.05)  # bounded poll of the directory, not a stand-in sleep
            assert os.listdir(root) == []
        finally:
            d.stop()
    finally:
        subprocess.run(["umount", str(root)], check=False)
