"""The daemon as processes: the pool, a worker killed mid-storm, SIGTERM's drain, startup
errors, and the per-transfer log lines for merged requests, probes and vanished clients.
"""

from __future__ import annotations

import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, Daemon, start_daemon

import tftpd
from tftpd import client
from tftpd import packet as P


def warm_up(daemon: Daemon, n: int) -> None:
    """Return once each of the `n` workers has answered a request (so it runs its loop
    with its own signal handlers). Requests from fresh ports spread over the workers."""
    pids = set(daemon.wait_workers(n))
    for i in range(200):  # bounded; SO_REUSEPORT hashing reaches every worker long before
        with udp() as sock:
            sock.sendto(P.encode_rrq(f"warm-up-{i}".encode(), "octet", {}),
                        (daemon.host, daemon.port))
            sock.recvfrom(P.MAX_DATAGRAM)
        lines = daemon.wait_for_log(rf"file=warm-up-{i} ")
        m = re.match(r"tftpd\[(\d+)\]", lines[0])
        assert m, lines[0]
        pids.discard(int(m.group(1)))
        if not pids:
            return
    raise AssertionError(f"workers {sorted(pids)} never answered")


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3.0)
    return sock


def daemon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tftpd", *args]


def daemon_env(datapath: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if datapath:
        env["TFTPD_DATAPATH"] = datapath
    return env


def run_until_exit(cmd: list[str], timeout: float = 15.0,
                   env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run a daemon that should refuse to start: (exit code, stderr).

    Returns (None, stderr) if it printed "listening on" or outlived `timeout` instead; the
    process is killed then (by its own PID).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env or daemon_env(), cwd=REPO, start_new_session=True)
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                return proc.wait(5), out.decode(errors="replace")
            out += chunk
            if b"listening on" in out:
                break
        return None, out.decode(errors="replace")
    finally:
        sel.close()
        if proc.poll() is None:
            # Its own session: the group is this daemon and the workers it forked.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


@pytest.fixture
def vdaemon(root: Path, datapath: str) -> Iterator[Daemon]:
    """The daemon with -v: it also logs every request and every merged repeat."""
    d = start_daemon(root, "--workers", "2", "-v", env={"TFTPD_DATAPATH": datapath})
    try:
        yield d
    finally:
        d.stop()


# -- the pool --------------------------------------------------------------------------------


def test_three_workers(root: Path) -> None:
    d = start_daemon(root, "--workers", "3")
    try:
        pids = d.wait_workers(3)
        assert d.proc.pid not in pids
        out = subprocess.run(["ps", "-o", "pid=,ppid=", "--ppid", str(d.proc.pid)],
                             capture_output=True, text=True, check=True).stdout.split()
        assert sorted(int(p) for p in out[0::2]) == pids
        assert {int(p) for p in out[1::2]} == {d.proc.pid}
        # The master serves nothing itself; three workers, and they stay three.
        (root / "f").write_bytes(b"x" * 3000)
        for _ in range(6):
            assert client.get("127.0.0.1", d.port, "f").data == b"x" * 3000
        assert sorted(d.worker_pids()) == pids
    finally:
        assert d.stop() == 0


STORM = 100


def _fetch_with_retry(port: int, name: str, want: bytes, stats: dict[str, int],
                      lock: threading.Lock) -> client.Result:
    """One storm client: a whole new RRQ when its transfer died with its worker."""
    deadline = time.monotonic() + 60
    last: Exception | None = None
    for _attempt in range(6):
        if time.monotonic() > deadline:
            break
        try:
            return client.get("127.0.0.1", port, name, options={"blksize": "1024"},
                              timeout=0.5, retries=3)
        except client.TftpError as err:
            last = err
            with lock:
                stats["restarts"] += 1
    raise AssertionError(f"{name}: no complete fetch: {last}")


def test_worker_killed_during_storm(root: Path, datapath: str) -> None:
    files = {f"s{i}.bin": random.Random(i).randbytes(150_000 + i * 997) for i in range(10)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    d = start_daemon(root, "--workers", "3", "-v", env={"TFTPD_DATAPATH": datapath})
    try:
        before = d.wait_workers(3)
        stats = {"restarts": 0}
        lock = threading.Lock()
        names = [f"s{i % 10}.bin" for i in range(STORM)]
        with ThreadPoolExecutor(max_workers=STORM) as pool:
            futures = [pool.submit(_fetch_with_retry, d.port, n, files[n], stats, lock)
                       for n in names]
            # Kill the worker that took the latest request: it has transfers in flight.
            lines = d.wait_for_log(r"request RRQ s\d\.bin", count=STORM // 3, timeout=30)
            m = re.match(r"tftpd\[(\d+)\]", lines[-1])
            assert m, lines[-1]
            victim = int(m.group(1))
            assert victim in before
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            after = d.wait_workers(3, timeout=2.0, exclude=frozenset({victim}))
            replaced_in = time.monotonic() - killed_at
            results = [f.result(timeout=90) for f in futures]
        for name, got in zip(names, results, strict=True):
            assert got.data == files[name], name
        new = set(after) - set(before)
        assert len(new) == 1, (before, after)
        assert set(after) - new == set(before) - {victim}, "a worker other than the victim died"
        assert replaced_in <= 2.0
        d.wait_for_log(rf"\(pid {victim}\) killed by SIGKILL; replacing")
        # Every complete fetch has its record, unless the victim served it: a client can
        # take the last block in the moment between the kill and the record.
        for res in results:
            port = res.local[1]
            peer = rf"127\.0\.0\.1:{port}"
            d.wait_for_log(rf"{peer} file=s\d\.bin .* outcome=ok"
                           rf"|^tftpd\[{victim}\]: request RRQ s\d\.bin octet from {peer} ")
        # The victim had transfers running: some clients had to start again.
        assert stats["restarts"] >= 1
        assert sorted(d.worker_pids()) == after  # nobody else died during the storm
    finally:
        assert d.stop() == 0


# -- SIGTERM drain ---------------------------------------------------------------------------


def _listening(d: Daemon) -> bool:
    """Whether the daemon (its master or a worker) holds a UDP socket bound to its port.
    Another process's socket on that port number (a client's, anywhere on the machine)
    does not count: the sockets are matched by inode to the daemon's descriptors."""
    mine: set[str] = set()
    for pid in (d.proc.pid, *d.worker_pids()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                mine.add(target[8:-1])
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == d.port and fields[9] in mine:
                        return True
        except FileNotFoundError:
            continue
    return False


def test_sigterm_drains_running_transfer(daemon: Daemon) -> None:
    data = random.Random(4).randbytes(512 * 30 + 11)
    (daemon.root / "slow.bin").write_bytes(data)
    # Both workers up and serving first: a SIGTERM during startup is another test's case.
    warm_up(daemon, 2)
    a = udp()
    try:
        a.sendto(P.encode_rrq(b"slow.bin", "octet", {}), (daemon.host, daemon.port))
        raw, tid = a.recvfrom(P.MAX_DATAGRAM)
        assert P.parse(raw) == P.Data(1, data[:512])
        got = [data[:512]]
        assert _listening(daemon)
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for_log(r"SIGTERM: no new requests")
        deadline = time.monotonic() + 3.0
        while _listening(daemon) and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded polling of socket state
        assert not _listening(daemon), "listen port still bound after SIGTERM"
        # A new request gets no answer now.
        c = udp()
        try:
            c.connect((daemon.host, daemon.port))
            c.send(P.encode_rrq(b"slow.bin", "octet", {}))
            c.settimeout(1.0)
            with pytest.raises((ConnectionRefusedError, TimeoutError)):
                c.recv(P.MAX_DATAGRAM)
        finally:
            c.close()
        assert daemon.proc.poll() is None, "the daemon quit with a transfer running"
        # The running transfer continues, ACK by ACK, to its end.
        block = 1
        a.sendto(P.encode_ack(1), tid)
        for _ in range(200):  # bounded: 31 blocks plus a few retransmissions
            raw, src = a.recvfrom(P.MAX_DATAGRAM)
            pkt = P.parse(raw)
            assert src == tid and isinstance(pkt, P.Data), pkt
            if pkt.block != block + 1:
                continue
            block += 1
            got.append(pkt.payload)
            a.sendto(P.encode_ack(block), tid)
            if len(pkt.payload) < 512:
                break
        assert b"".join(got) == data
    finally:
        a.close()
    assert daemon.proc.wait(10) == 0
    daemon.wait_for_log(r"file=slow\.bin .*bytes=15371 .*outcome=ok")


def test_sigterm_right_after_start(root: Path) -> None:
    """SIGTERM as soon as the daemon says it listens (what a supervisor may do).

    Several daemons start at once, so that the signal lands at every point of the
    startup: before the master's handlers are installed, and while workers are being
    forked (a worker still running with the master's inherited handler would lose it).
    Every one must exit 0, promptly, and leave no worker behind.
    """
    def one(_: int) -> tuple[int | None, list[int], str]:
        d = start_daemon(root, "--workers", "2")
        d.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | None = d.proc.wait(8)
        except subprocess.TimeoutExpired:
            rc = None
        left = d.worker_pids()
        if rc is None:
            os.killpg(d.proc.pid, signal.SIGKILL)  # its own session: master and workers
            d.proc.wait()
        if d._reader:
            d._reader.join(5)
        return rc, left, d.log_text()[-400:]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    bad = [r for r in results if r[0] != 0]
    assert not bad, "\n".join(
        (f"exit {rc}" if rc is not None else "still running 8 s after SIGTERM")
        + f", workers {left}; log:\n{log}" for rc, left, log in bad)


# -- startup -----------------------------------------------------------------------------------


def test_port_in_use_by_another_tftpd(daemon: Daemon) -> None:
    rc, err = run_until_exit(daemon_cmd("-L", "-a", f"127.0.0.1:{daemon.port}",
                                        str(daemon.root)))
    assert rc is not None, f"a second daemon started on the port of a running one:\n{err}"
    assert rc != 0
    assert "in use" in err, err


def test_port_in_use_by_another_program(root: Path) -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        rc, err = run_until_exit(daemon_cmd("-L", "-a", f"127.0.0.1:{port}", str(root)))
    finally:
        holder.close()
    assert rc is not None and rc != 0, err
    assert "in use" in err, err


def test_missing_root(tmp_path: Path) -> None:
    rc, err = run_until_exit(daemon_cmd("-L", "-a", "127.0.0.1:0", str(tmp_path / "nope")))
    assert rc is not None and rc != 0, err
    assert "nope" in err and "does not exist" in err, err
    (tmp_path / "file").write_bytes(b"")
    rc, err = run_until_exit(daemon_cmd("-L", "-a", "127.0.0.1:0", str(tmp_path / "file")))
    assert rc is not None and rc != 0, err
    assert "not a directory" in err, err


def test_version(datapath: str) -> None:
    proc = subprocess.run(daemon_cmd("--version"), capture_output=True, text=True, timeout=30,
                          env=daemon_env(datapath), cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert tftpd.__version__ in proc.stdout
    assert f"({datapath} data path" in proc.stdout, proc.stdout


def test_unknown_flag(root: Path) -> None:
    rc, err = run_until_exit(daemon_cmd("-L", "--no-such-flag", str(root)))
    assert rc is not None and rc != 0, err
    assert "--no-such-flag" in err, err


# -- one line per transfer ----------------------------------------------------------------------


@pytest.mark.parametrize("copies,options", [
    (2, {}),  # legacy PXE ROMs: the RRQ twice
    (3, {"blksize": "1468", "tsize": "0"}),  # Raspberry Pi: three identical RRQs
])
def test_repeated_rrq_is_one_transfer(vdaemon: Daemon, copies: int,
                                      options: dict[str, str]) -> None:
    data = random.Random(8).randbytes(20_000)
    (vdaemon.root / "rep.bin").write_bytes(data)
    blksize = int(options.get("blksize", 512))
    sock = udp()
    try:
        port = sock.getsockname()[1]
        rrq = P.encode_rrq(b"rep.bin", "octet", options)
        for i in range(copies):
            if i:
                time.sleep(0.001)  # the spacing real clients use, not synchronisation
            sock.sendto(rrq, (vdaemon.host, vdaemon.port))
        sources: list[tuple] = []
        firsts: list[tuple] = []  # (source, packet) of every OACK and DATA 1
        got: list[bytes] = []
        block = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            raw, src = sock.recvfrom(P.MAX_DATAGRAM)
            pkt = P.parse(raw)
            sources.append(src)
            if isinstance(pkt, P.OAck) or (isinstance(pkt, P.Data) and pkt.block == 1):
                firsts.append((src, pkt))
            if isinstance(pkt, P.OAck):
                assert pkt.options == {"blksize": "1468", "tsize": str(len(data))}
                sock.sendto(P.encode_ack(0), src)
                continue
            assert isinstance(pkt, P.Data), pkt
            if pkt.block != block + 1:
                continue
            block += 1
            got.append(pkt.payload)
            sock.sendto(P.encode_ack(block), src)
            if len(pkt.payload) < blksize:
                break
        assert b"".join(got) == data
        vdaemon.wait_for_log(rf"merged repeated request from 127\.0\.0\.1:{port} ",
                             count=copies - 1)
        vdaemon.wait_for_log(rf"127\.0\.0\.1:{port} file=rep\.bin .*outcome=ok")
        # A second transfer would be sending its first packet by now.
        sock.settimeout(0.5)
        for _ in range(50):
            try:
                _, src = sock.recvfrom(P.MAX_DATAGRAM)
            except TimeoutError:
                break
            sources.append(src)
    finally:
        sock.close()
    assert len(set(sources)) == 1, f"answers from several TIDs: {set(sources)}"
    assert len({src for src, _ in firsts}) == 1
    text = vdaemon.log_text()
    assert len(re.findall(rf"request RRQ rep\.bin octet from 127\.0\.0\.1:{port} ", text)) == 1
    assert len(re.findall(rf"127\.0\.0\.1:{port} file=rep\.bin .*outcome=", text)) == 1


@pytest.mark.parametrize("abort_code", [8, 0, 9])
def test_probe_logged(daemon: Daemon, abort_code: int) -> None:
    data = random.Random(9).randbytes(1_234_567)
    (daemon.root / "probe.bin").write_bytes(data)
    res = client.probe("127.0.0.1", daemon.port, "probe.bin", options={"blksize": "1468"},
                       abort_code=abort_code)
    assert res.oack == {"tsize": "1234567", "blksize": "1468"}
    line = daemon.wait_for_log(r"file=probe\.bin .*outcome=probe")[0]
    assert "outcome=failed" not in daemon.log_text()
    m = re.search(r"duration=([\d.]+)s", line)
    assert m and float(m.group(1)) < 1.0, line  # ends at once, no timeout in between


def test_probe_netascii_tsize(daemon: Daemon) -> None:
    text = b"one\ntwo\r\nthree\r" * 100
    (daemon.root / "t.txt").write_bytes(text)
    res = client.get("127.0.0.1", daemon.port, "t.txt", mode="netascii",
                     options={"tsize": "0"}, probe=True)
    converted = text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    assert res.oack == {"tsize": str(len(converted))}
    daemon.wait_for_log(r"file=t\.txt protocol=tftp mode=netascii .*outcome=probe")


@pytest.mark.parametrize("options", [{}, {"blksize": "1024"}])
def test_vanished_client_fails_after_retries(root: Path, datapath: str,
                                             options: dict[str, str]) -> None:
    (root / "v.bin").write_bytes(random.Random(10).randbytes(5000))
    d = start_daemon(root, "-T", "100000", "--retries", "2", "--workers", "1",
                     env={"TFTPD_DATAPATH": datapath})
    try:
        sock = udp()
        try:
            port = sock.getsockname()[1]
            started = time.monotonic()
            sock.sendto(P.encode_rrq(b"v.bin", "octet", options), (d.host, d.port))
            firsts = []
            sock.settimeout(0.5)
            for _ in range(20):  # bounded: 1 + 2 retransmissions expected
                try:
                    raw, _src = sock.recvfrom(P.MAX_DATAGRAM)
                except TimeoutError:
                    break
                firsts.append(P.parse(raw))
            line = d.wait_for_log(rf"127\.0\.0\.1:{port} file=v\.bin .*outcome=")[0]
            elapsed = time.monotonic() - started
        finally:
            sock.close()
        want = P.OAck({"blksize": "1024"}) if options else P.Data(1, (root / "v.bin")
                                                                  .read_bytes()[:512])
        assert firsts == [want] * 3, firsts  # the first send and --retries 2 resends
        assert "outcome=failed" in line, line
        assert "retransmits=2" in line, line
        assert "timeout" in line, line
        assert elapsed < 3.0  # 100 ms, backed off: 0.1 + 0.2 + 0.4 s
    finally:
        assert d.stop() == 0
