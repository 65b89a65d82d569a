"""Operations: inetd and systemd start-up, reload, metrics, remap, JSON records, chroot."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Daemon, start_daemon

from tftpd import client
from tftpd import packet as P


# Only what really needs root is gated on it (CI runs as root): inetd's "wait root" line,
# systemd-socket-activate's `-u root`, chroot and dropping to nobody. Reload, metrics,
# map files and JSON records run as any user.
def needs_root(why: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root (CI has it): {why}")


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float = 15.0, what: str = "") -> object:
    """Poll `check` (bounded) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


def read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    """An executable that runs this checkout's tftpd, as inetd and systemd want one."""
    path = tmp_path / "tftpd.sh"
    path.write_text(f"#!/bin/sh\nexec env PYTHONPATH={REPO} {sys.executable} -m tftpd \"$@\"\n")
    path.chmod(0o755)
    return path


# -- inetd ---------------------------------------------------------------------------------

@needs_root("inetd's service line runs tftpd as root")
def test_inetd_wait_mode_forks_once_then_leaves_when_idle(root: Path, tmp_path: Path,
                                                         wrapper: Path) -> None:
    inetd = shutil.which("inetd")
    if inetd is None:
        pytest.skip("openbsd-inetd is not installed (.ci/run installs it)")
    (root / "f").write_bytes(b"served through inetd\n" * 100)
    port = free_port()
    log = tmp_path / "tftpd.log"
    conf = tmp_path / "inetd.conf"
    # The line an in.tftpd user already has, with our program in its place.
    conf.write_text(f"127.0.0.1:{port} dgram udp4 wait root {wrapper} tftpd -t 1 "
                    f"--log-file {log} -s {root}\n")
    proc = subprocess.Popen([inetd, "-d", "-R", "1000000", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5):  # the first request wakes tftpd; the rest reach the same pool
            r = client.get("127.0.0.1", port, "f", retries=10)
            assert r.data == (root / "f").read_bytes()
        masters = {ln.split("]")[0] for ln in read_text(log).splitlines()
                   if re.search(r"\(\d+ workers?, inetd\)", ln)}
        assert len(masters) == 1, read_text(log)  # one start for five requests
        wait_until(lambda: "idle for 1s" in read_text(log), what="the idle exit")
        wait_until(lambda: "stopped; totals" in read_text(log), what="the exit")
        r = client.get("127.0.0.1", port, "f", retries=10)  # inetd starts it again
        assert r.data == (root / "f").read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["pkill", "-f", f"--log-file {log}"], check=False)


# -- systemd -------------------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    yield sock, path
    sock.close()


def notes(sock: socket.socket, want: str, limit: int = 20) -> list[str]:
    """Datagrams from the notify socket until one contains `want` (bounded)."""
    seen = []
    for _ in range(limit):
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if want in msg:
            return seen
    raise AssertionError(f"no {want!r} in {seen}")


@needs_root("the service runs with -u root")
def test_systemd_socket_activation_and_notify(root: Path, tmp_path: Path, wrapper: Path,
                                              notify_socket: tuple[socket.socket, str]) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    (root / "f").write_bytes(os.urandom(10_000))
    port = free_port()
    sock, path = notify_socket
    log = tmp_path / "log"
    proc = subprocess.Popen([activate, "-d", "-l", f"127.0.0.1:{port}", "-E",
                             f"NOTIFY_SOCKET={path}", str(wrapper), "--log-file", str(log),
                             "-u", "root", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        r = client.get("127.0.0.1", port, "f", options={"blksize": "1468"}, retries=10)
        assert r.data == (root / "f").read_bytes()
        assert any("READY=1" in n for n in notes(sock, "READY=1"))
        assert "listening on" not in read_text(log)  # not bound by us: inherited
        proc.send_signal(signal.SIGHUP)
        seen = notes(sock, "READY=1")
        assert any("RELOADING=1" in n and "MONOTONIC_USEC=" in n for n in seen)
        proc.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in n for n in notes(sock, "STOPPING=1"))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unit_files_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The unit names the installed program; point it at this interpreter, and let
    # man(1) find our pages, which verify checks through Documentation=.
    for name in ("tftpd.service", "tftpd.socket"):
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/tftpd",
                                                  f"{sys.executable} -m tftpd"))
    man = tmp_path / "man"
    for section, page in (("man8", "tftpd.8"), ("man5", "tftpd.conf.5")):
        (man / section).mkdir(parents=True)
        shutil.copy(REPO / "man" / page, man / section / page)
    out = subprocess.run([analyze, "verify", str(tmp_path / "tftpd.socket"),
                          str(tmp_path / "tftpd.service")], capture_output=True, text=True,
                         env={**os.environ, "MANPATH": str(man)}, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr


# -- reload ----------------------------------------------------------------------------------

def start_reading(port: int, name: str) -> tuple[socket.socket, tuple, bytes]:
    """Start an RRQ by hand and hold it after DATA 1: a transfer we control."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(P.encode_rrq(name), ("127.0.0.1", port))
    data, server = s.recvfrom(1000)
    pkt = P.parse(data)
    assert isinstance(pkt, P.Data) and pkt.block == 1
    return s, server, pkt.payload


def finish_reading(s: socket.socket, server: tuple, first: bytes) -> bytes:
    got = [first]
    block = 1
    while len(got[-1]) == 512:
        s.sendto(P.encode_ack(block), server)
        while True:
            pkt = P.parse(s.recvfrom(1000)[0])
            if isinstance(pkt, P.Data) and pkt.block == (block + 1) & 0xFFFF:
                break
        got.append(pkt.payload)
        block += 1
    s.sendto(P.encode_ack(block), server)
    s.close()
    return b"".join(got)


def test_sighup_reloads_config_and_keeps_running_transfers(root: Path, tmp_path: Path) -> None:
    payload = os.urandom(20_000)
    (root / "big").write_bytes(payload)
    conf = tmp_path / "tftpd.conf"
    conf.write_text("blocksize = 1024\n")
    d = start_daemon(root, "--workers", "2", "-C", str(conf))
    try:
        assert client.get("127.0.0.1", d.port, "big", options={"blksize": "8192"}
                          ).oack["blksize"] == "1024"
        old_workers = set(wait_until(lambda: len(d.worker_pids()) == 2 and d.worker_pids()))
        held = start_reading(d.port, "big")
        conf.write_text("blocksize = 600\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded")
        r = client.get("127.0.0.1", d.port, "big", options={"blksize": "8192"})
        assert r.oack["blksize"] == "600" and r.data == payload
        # The old worker holding our transfer is still there, and finishes it.
        assert old_workers & set(d.worker_pids())
        assert finish_reading(*held) == payload
        wait_until(lambda: not old_workers & set(d.worker_pids()), what="old workers to exit")
        # A configuration that does not parse is reported, and the running one kept.
        conf.write_text("blocksize = [\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"configuration not reloaded")
        assert client.get("127.0.0.1", d.port, "big", options={"blksize": "8192"}
                          ).oack["blksize"] == "600"
    finally:
        assert d.stop() == 0


def test_sighup_in_a_storm_loses_no_client(root: Path) -> None:
    payload = os.urandom(200_000)
    (root / "nbp.efi").write_bytes(payload)
    d = start_daemon(root, "--workers", "2")
    failures: list[str] = []
    done = threading.Event()

    def boot() -> None:
        try:
            client.probe("127.0.0.1", d.port, "nbp.efi", retries=8)
            r = client.get("127.0.0.1", d.port, "nbp.efi", options={"blksize": "1456"},
                           retries=8)
            if r.data != payload:
                failures.append("bad data")
        except Exception as err:  # noqa: BLE001 - every failure counts
            failures.append(repr(err))

    try:
        threads = [threading.Thread(target=boot) for _ in range(60)]
        for i, t in enumerate(threads):
            t.start()
            if i == 30:
                os.kill(d.proc.pid, signal.SIGHUP)  # in the middle of the storm
        for t in threads:
            t.join(120)
        done.set()
        assert not [t for t in threads if t.is_alive()]
        assert failures == []
        d.wait_for_log(r"SIGHUP: reloaded")
    finally:
        d.stop()


# -- metrics -----------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_match_what_happened(root: Path) -> None:
    (root / "f").write_bytes(os.urandom(5000))
    mport = free_port(socket.SOCK_STREAM)
    d = start_daemon(root, "--workers", "2", "--metrics", f"127.0.0.1:{mport}")
    try:
        for _ in range(3):
            client.get("127.0.0.1", d.port, "f")
        for _ in range(2):
            client.probe("127.0.0.1", d.port, "f")
        with pytest.raises(client.TftpError):
            client.get("127.0.0.1", d.port, "missing")
        # A worker counts an answer just after sending it: wait for the last one.
        ok = 'tftpd_transfers_total{protocol="tftp",outcome="ok"}'
        m = wait_until(lambda: (lambda m: m if m[ok] == 3
                                and m["tftpd_probes_total"] == 2
                                and m["tftpd_first_answer_seconds_count"] >= 6
                                else None)(scrape(mport)),
                       what="the counters")
        assert isinstance(m, dict)
        assert m['tftpd_requests_total{protocol="tftp"}'] == 6
        assert m['tftpd_misses_total{protocol="tftp"}'] == 1
        assert m['tftpd_bytes_total{protocol="tftp"}'] == 3 * 5000
        assert m["tftpd_active_transfers"] == 0
        assert m["tftpd_first_answer_seconds_count"] == 6
        assert m['tftpd_transfer_duration_seconds_count{protocol="tftp"}'] == 5
        assert m['tftpd_transfer_duration_seconds_bucket{protocol="tftp",le="+Inf"}'] == 5
        # Totals survive a worker's death.
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        d.wait_for_log(r"replacing")
        assert scrape(mport)[ok] == 3
        assert wait_until(lambda: scrape(mport)["tftpd_worker_restarts_total"] == 1)
    finally:
        d.stop()


# -- remap, JSON records, chroot -------------------------------------------------------------

def test_map_file_in_tftp_hpa_syntax(root: Path, tmp_path: Path) -> None:
    (root / "images").mkdir()
    (root / "images" / "kernel").write_bytes(b"kernel")
    (root / "127.0.0.1").mkdir()
    (root / "127.0.0.1" / "pxelinux.cfg").write_bytes(b"per-client config")
    rules = tmp_path / "map"
    rules.write_text(
        "# from a tftp-hpa setup\n"
        "rg \\\\ /              # Convert backslashes to slashes\n"
        "r ^/?boot/(.*) images/\\1\n"
        "a secret\n"
        "r ^pxelinux\\.cfg \\i/\\0  # a root per client address\n")
    d = start_daemon(root, "-m", str(rules))
    try:
        assert client.get("127.0.0.1", d.port, "boot\\kernel").data == b"kernel"
        assert client.get("127.0.0.1", d.port, "pxelinux.cfg").data == b"per-client config"
        with pytest.raises(client.TftpError) as exc:
            client.get("127.0.0.1", d.port, "secret.txt")
        assert exc.value.code == P.E_ACCESS
        # Rules run before confinement: a rule cannot lead outside the root.
        rules.write_text("r .* ../../etc/passwd\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded")
        with pytest.raises(client.TftpError) as exc:
            client.get("127.0.0.1", d.port, "anything")
        assert exc.value.code == P.E_ACCESS
    finally:
        d.stop()


def test_json_records(root: Path, tmp_path: Path) -> None:
    (root / "f").write_bytes(b"x" * 3000)
    log = tmp_path / "records.jsonl"
    d = start_daemon(root, "--log-format", "json", "--log-file", str(log))
    try:
        client.get("127.0.0.1", d.port, "f", options={"blksize": "1024", "tsize": "0"})
        client.probe("127.0.0.1", d.port, "f")
        with pytest.raises(client.TftpError):
            client.get("127.0.0.1", d.port, "nope")

        def records() -> list[dict]:
            rows = [json.loads(line) for line in read_text(log).splitlines()]
            return [r for r in rows if "outcome" in r]

        got = wait_until(lambda: len(records()) == 3 and records(), what="three records")
        assert isinstance(got, list)
        by = {r["outcome"]: r for r in got}
        assert by["ok"]["bytes"] == 3000 and by["ok"]["granted"] == {"blksize": "1024",
                                                                       "tsize": "3000"}
        assert by["ok"]["options"] == {"blksize": "1024", "tsize": "0"}
        assert by["probe"]["file"] == "f" and by["notfound"]["error"] == 1
        assert {r["protocol"] for r in got} == {"tftp"}  # HTTP's records say "http"
    finally:
        d.stop()


def test_json_lines_carry_the_traceback_of_an_error() -> None:
    """A failing content hook is logged with its traceback: in JSON too, on one line."""
    import logging

    from tftpd.cli import JsonFormatter

    try:
        raise RuntimeError("the inventory is unreadable")
    except RuntimeError as err:
        record = logging.LogRecord("tftpd", logging.ERROR, __file__, 1, "hook failed: %s",
                                   (err,), (type(err), err, err.__traceback__))
    line = JsonFormatter().format(record)
    assert "\n" not in line
    got = json.loads(line)
    assert got["msg"] == "hook failed: the inventory is unreadable"
    assert got["traceback"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: the inventory is unreadable" in got["traceback"]


@needs_root("chroot and the switch to nobody")
def test_secure_mode_chroots_and_drops_root_by_default(
        daemon_factory: Callable[..., Daemon], root: Path) -> None:
    import pwd

    (root / "f").write_bytes(b"inside")
    d = daemon_factory("-s")  # started as root, no -u: serves as nobody, like in.tftpd
    assert client.get("127.0.0.1", d.port, "f").data == b"inside"
    pids = wait_until(lambda: d.worker_pids())
    assert isinstance(pids, list)
    nobody = pwd.getpwnam("nobody").pw_uid
    for pid in [d.proc.pid, *pids]:
        assert os.readlink(f"/proc/{pid}/root") == str(root.resolve())
        uids = next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("Uid:"))
        assert uids.split()[1:] == [str(nobody)] * 4  # real, effective, saved, fs


@needs_root("chroot and the switch to nobody")
def test_sighup_under_chroot_rereads_the_files_outside_it(
        daemon_factory: Callable[..., Daemon], root: Path, tmp_path: Path) -> None:
    """-s puts the master in the root too, where /etc/tftpd.conf and the map file are
    out of sight: SIGHUP still reads them afresh (and the workers cannot reach them)."""
    (root / "images").mkdir()
    (root / "images" / "kernel").write_bytes(b"kernel")
    (root / "big").write_bytes(os.urandom(5000))
    etc, real = tmp_path / "etc", tmp_path / "real"
    etc.mkdir()
    real.mkdir()
    # The configuration is an absolute symlink, as /etc's often are: after the chroot
    # the same path would lead into the served root, where a client may write.
    (etc / "tftpd.conf").symlink_to(real / "tftpd.conf")
    conf, rules = real / "tftpd.conf", etc / "map"
    planted = root / str(conf).lstrip("/")
    planted.parent.mkdir(parents=True)
    planted.write_text("blocksize = 513\n")
    conf.write_text("blocksize = 1024\n")
    rules.write_text("r ^old$ images/kernel\n")
    d = daemon_factory("-s", "-C", str(etc / "tftpd.conf"), "-m", str(rules))
    assert client.get("127.0.0.1", d.port, "old").data == b"kernel"
    conf.write_text("blocksize = 600\n")
    rules.write_text("r ^new$ images/kernel\n")
    os.kill(d.proc.pid, signal.SIGHUP)
    d.wait_for_log(r"SIGHUP: reloaded")
    assert client.get("127.0.0.1", d.port, "new").data == b"kernel"
    assert client.get("127.0.0.1", d.port, "big", options={"blksize": "8192"}
                      ).oack["blksize"] == "600"
    pids = wait_until(lambda: d.worker_pids())
    assert isinstance(pids, list)
    for pid in pids:  # a worker holds nothing that reaches outside the chroot
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            assert not target.startswith(str(etc)), target


@pytest.fixture
def daemon_factory(root: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(*args: str) -> Daemon:
        d = start_daemon(root, *args)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@needs_root("the default user applies when started as root")
def test_default_user_falls_back_to_root_when_nobody_cannot_read(tmp_path: Path) -> None:
    private = tmp_path / "private"  # pytest's own directories are 0700: nobody is locked out
    private.mkdir(mode=0o700)
    (private / "f").write_bytes(b"secret boot file")
    os.chmod(tmp_path, 0o700)
    d = start_daemon(private, "--workers", "1", "-v")  # no -u: the default applies
    try:
        assert client.get("127.0.0.1", d.port, "f").data == b"secret boot file"
        d.wait_for_log(r"nobody cannot read .* stays root")
    finally:
        d.stop()
