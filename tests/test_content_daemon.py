"""The content hook and per-client roots in the running daemon, over TFTP and HTTP.

Each test starts the real daemon on loopback (or on a veth pair into a network
namespace, for MACs) and asks with real clients: tftp-hpa, curl, the bundled client and
the storm generator.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Daemon, need, need_ext, start_daemon
from tests.test_http import get as http_get
from tests.test_http import http_port
from tftpd import client

TIMEOUT_S = 2.0  # --content-hook-timeout while a request waits for the slow hook
# The same while 100 PXE clients are served beside it: they must all be done before it
# runs out, on a slow machine too, and the hook's 5 s sleep must outlast it.
STORM_TIMEOUT_S = 4.0
CLIENT_TIMEOUT = 30  # s, for a client subprocess

HOOK = '''
import os
import time

VERSION = b"v1"


def content(request):
    name = request.filename
    if name == "bytes/hello":
        return b"hello " + request.client[0].encode() + b"\\n"
    if name == "alias":
        return "real.txt"
    if name == "info":
        return repr((request.protocol, request.mode, sorted(request.options),
                     request.client[0])).encode()
    if name == "version":
        return VERSION
    if name == "uid":
        return str(os.geteuid()).encode()
    if name == "raise":
        raise RuntimeError("the hook says no")
    if name == "weird":
        return 42
    if name == "slow":
        with open(os.path.join(os.path.dirname(__file__), "slow.calls"), "a") as f:
            f.write(request.protocol + "\\n")
        time.sleep(5)
        return b"too late"
    return None
'''


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    """A directory outside the root with the hook module and an (empty) config file:
    the daemon looks for the module beside its configuration."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "tftpd.conf").write_text("")
    (d / "testhook.py").write_text(HOOK)
    return d


@pytest.fixture
def files(root: Path) -> dict[str, bytes]:
    content = {"real.txt": b"the real file\n", "plain.txt": b"plain from the root\n"}
    for name, data in content.items():
        (root / name).write_bytes(data)
    return content


def start(root: Path, hook_dir: Path, *args: str, datapath: str = "c",
          host: str = "127.0.0.1") -> tuple[Daemon, int]:
    """The daemon with the test hook, TFTP and HTTP on `host`; (daemon, HTTP port)."""
    d = start_daemon(root, "--workers", "2", "-C", str(hook_dir / "tftpd.conf"),
                     "--content-hook", "testhook:content", "--http", f"{host}:0", *args,
                     env={"TFTPD_DATAPATH": datapath}, host=host)
    return d, http_port(d)


def curl(port: int, name: str, *extra: str, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """GET with curl: (status, headers, body)."""
    proc = subprocess.run([need("curl"), "-sS", "-i", *extra, f"http://{host}:{port}/{name}"],
                          capture_output=True, timeout=CLIENT_TIMEOUT, check=True)
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in
               (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def tftp_hpa(port: int, name: str, out: Path, host: str = "127.0.0.1") -> bytes:
    proc = subprocess.run([need("tftp"), host, str(port), "-m", "binary", "-c", "get", name,
                           str(out)], capture_output=True, timeout=CLIENT_TIMEOUT, check=False,
                          cwd=out.parent)
    # tftp-hpa exits 0 even after an ERROR packet; it prints the error instead.
    assert proc.returncode == 0 and b"Error" not in proc.stdout + proc.stderr, proc
    return out.read_bytes()


def waiting_for(path: Path, lines: int, within: float = 10.0) -> None:
    """Poll until `path` has `lines` lines (what the hook writes as it is called)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.01)  # polls the condition above, bounded by the deadline
    raise AssertionError(f"{path}: fewer than {lines} lines in {within}s")


def metrics_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hook_failures(mport: int, want: dict[str, int], within: float = 10.0) -> None:
    """Poll /metrics until tftpd_content_hook_failures_total has the values `want`
    (by label text), and fail if it does not get there in time."""
    import urllib.request

    deadline = time.monotonic() + within
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            text = r.read().decode()
        seen = {m.group(1): int(m.group(2)) for m in re.finditer(
            r"^tftpd_content_hook_failures_total\{(.*)\} (\d+)$", text, re.M)}
        if all(seen.get(k) == v for k, v in want.items()):
            return
        time.sleep(0.05)  # polls the condition above, bounded by the deadline
    raise AssertionError(f"hook failure metrics {seen}, want {want}")


def tftp_error(port: int, name: str, **kw: object) -> client.TftpError:
    with pytest.raises(client.TftpError) as info:
        client.get("127.0.0.1", port, name, **kw)  # type: ignore[arg-type]
    return info.value


# -- what the hook returns -----------------------------------------------------------------


@pytest.mark.parametrize("datapath", ["c", "python"])
def test_hook_answers_over_tftp_and_http(root: Path, hook_dir: Path, files: dict[str, bytes],
                                         tmp_path: Path, datapath: str) -> None:
    if datapath == "c":
        need_ext()
    d, hport = start(root, hook_dir, datapath=datapath)
    try:
        hello = b"hello 127.0.0.1\n"
        # bytes: served as the file; tsize and Content-Length are their length.
        res = client.get("127.0.0.1", d.port, "bytes/hello", options={"tsize": "0"})
        assert res.data == hello and res.oack["tsize"] == str(len(hello))
        assert tftp_hpa(d.port, "bytes/hello", tmp_path / "hello.out") == hello
        status, headers, body = curl(hport, "bytes/hello")
        assert (status, body) == (200, hello)
        assert headers["content-length"] == str(len(hello))
        # netascii: the bytes are converted like a file's.
        res = client.get("127.0.0.1", d.port, "bytes/hello", mode="netascii",
                         options={"tsize": "0"})
        assert res.data == b"hello 127.0.0.1\r\n" and res.oack["tsize"] == "17"
        # A path: that file instead.
        assert client.get("127.0.0.1", d.port, "alias").data == files["real.txt"]
        assert tftp_hpa(d.port, "alias", tmp_path / "alias.out") == files["real.txt"]
        assert curl(hport, "alias")[2] == files["real.txt"]
        # None: the name asked, from the root; a miss is a miss.
        assert client.get("127.0.0.1", d.port, "plain.txt").data == files["plain.txt"]
        assert curl(hport, "plain.txt")[2] == files["plain.txt"]
        # A request that closes the connection after it is answered too, whatever the
        # hook says (HTTP/1.0, Connection: close).
        assert curl(hport, "plain.txt", "-0", "-m", "5")[2] == files["plain.txt"]
        assert curl(hport, "bytes/hello", "-H", "Connection: close", "-m", "5")[2] == hello
        assert curl(hport, "raise", "-H", "Connection: close", "-m", "5")[0] == 500
        # One that offers to switch protocols (h11 pauses there) gets its answer too.
        assert curl(hport, "bytes/hello", "-H", "Upgrade: websocket", "-H",
                    "Connection: Upgrade", "-m", "5")[2] == hello
        assert tftp_error(d.port, "missing").code == 1
        assert curl(hport, "missing")[0] == 404
        # What the hook was told, by protocol.
        got = client.get("127.0.0.1", d.port, "info", options={"blksize": "1024", "tsize": "0"})
        assert got.data == b"('tftp', 'octet', ['blksize', 'tsize'], '127.0.0.1')"
        assert curl(hport, "info")[2] == b"('http', 'octet', [], '127.0.0.1')"
        # A name refused before the hook is asked.
        assert tftp_error(d.port, "../etc/passwd").code == 2
        assert curl(hport, "..%2fetc/passwd")[0] in (400, 403)
    finally:
        d.stop()


def test_a_failing_hook_fails_its_request_only(root: Path, hook_dir: Path,
                                               files: dict[str, bytes]) -> None:
    mport = metrics_port()
    d, hport = start(root, hook_dir, "--metrics", f"127.0.0.1:{mport}")
    try:
        pids = set(d.wait_workers(2))
        for name in ("raise", "weird"):
            err = tftp_error(d.port, name)
            assert (err.code, err.message) == (0, "content hook failed")
            assert curl(hport, name)[0] == 500
        d.wait_for_log(r"content hook failed for 127\.0\.0\.1 asking raise: RuntimeError: "
                       r"the hook says no")
        d.wait_for_log(r"TypeError: returned a int, not None, bytes or a path")
        assert "Traceback" in d.log_text()  # the hook's own traceback, for its author
        # The workers go on serving, the same ones.
        assert client.get("127.0.0.1", d.port, "plain.txt").data == files["plain.txt"]
        assert curl(hport, "bytes/hello")[2] == b"hello 127.0.0.1\n"
        assert set(d.worker_pids()) == pids
        hook_failures(mport, {'protocol="tftp",reason="failed"': 2,
                              'protocol="tftp",reason="timed_out"': 0,
                              'protocol="http",reason="failed"': 2})
    finally:
        d.stop()


def test_a_slow_hook_delays_its_own_request_only(root: Path, hook_dir: Path) -> None:
    """One name's hook call sleeps 5 s; with a 4 s timeout its TFTP request gets
    ERROR 0 and its HTTP request 504 after about 4 s, while 100 PXE clients asking
    other names are all served before that."""
    need_ext()
    from tftpd.storm.content import build_root
    from tftpd.storm.engine import run_storm
    from tftpd.storm.workload import load

    wl = load("pxe")
    build_root(wl, root)
    mport = metrics_port()
    d, hport = start(root, hook_dir, "--content-hook-timeout", str(STORM_TIMEOUT_S),
                     "--metrics", f"127.0.0.1:{mport}")
    try:
        slow: dict[str, tuple[object, float]] = {}

        def ask_tftp() -> None:
            t = time.monotonic()
            try:
                # The client asks again each second: those repeats are merged.
                client.get("127.0.0.1", d.port, "slow", timeout=1.0, retries=10)
                slow["tftp"] = ("served", time.monotonic())
            except client.TftpError as err:
                slow["tftp"] = ((err.code, err.message, time.monotonic() - t),
                                time.monotonic())

        def ask_http() -> None:
            t = time.monotonic()
            status = http_get(hport, "/slow").status
            slow["http"] = ((status, time.monotonic() - t), time.monotonic())

        threads = [threading.Thread(target=ask_tftp), threading.Thread(target=ask_http)]
        for th in threads:
            th.start()
        waiting_for(hook_dir / "slow.calls", 2)  # both requests are with the hook now
        res = run_storm(("127.0.0.1", d.port), wl, 100, deadline_s=30)
        storm_done = time.monotonic()
        for th in threads:
            th.join(CLIENT_TIMEOUT)
        assert res.ok == 100 and not res.failed, res.summary()
        (code, message, tftp_wait), tftp_at = slow["tftp"]  # type: ignore[misc]
        (status, http_wait), http_at = slow["http"]  # type: ignore[misc]
        assert (code, message) == (0, "content hook timed out")
        assert status == 504
        for waited in (tftp_wait, http_wait):
            assert STORM_TIMEOUT_S - 0.3 <= waited <= STORM_TIMEOUT_S + 2.5
        # Every PXE client was served while the slow requests were still waiting.
        assert storm_done < min(tftp_at, http_at)
        d.wait_for_log(r"content hook, 127\.0\.0\.1 asking slow: content hook took longer")
        hook_failures(mport, {'protocol="tftp",reason="timed_out"': 1,
                              'protocol="tftp",reason="failed"': 0,
                              'protocol="http",reason="timed_out"': 1})
    finally:
        d.stop()
    # The TFTP client asked again each second: those repeats were merged, not queued.
    merged = re.search(r"merged=(\d+)", d.log_text())
    assert merged is not None and int(merged.group(1)) >= 1


def test_requests_waiting_for_the_hook_count_and_are_replaced(root: Path, hook_dir: Path,
                                                              files: dict[str, bytes]) -> None:
    """A read waiting for the hook takes room like a transfer (a slow hook cannot pile
    requests up), and a client that asks something else meanwhile is answered that."""
    from tftpd import packet as P

    d = start_daemon(root, "--workers", "1", "--max-transfers", "2", "-C",
                     str(hook_dir / "tftpd.conf"), "--content-hook", "testhook:content",
                     "--content-hook-timeout", str(TIMEOUT_S))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
            a.settimeout(5)
            b.settimeout(5)
            server = ("127.0.0.1", d.port)
            a.sendto(P.encode_rrq("slow", "octet", {}), server)
            b.sendto(P.encode_rrq("slow", "octet", {}), server)
            waiting_for(hook_dir / "slow.calls", 2)
            # Full: two requests wait for the hook in this worker of two transfers.
            err = tftp_error(d.port, "plain.txt", retries=0)
            assert (err.code, err.message) == (0, "Server busy, try again later")
            # `a` moves on before the hook answers: its new request replaces the old.
            a.sendto(P.encode_rrq("plain.txt", "octet", {}), server)
            data, tid = a.recvfrom(P.MAX_DATAGRAM)
            assert data == P.encode_data(1, files["plain.txt"]) and tid != server
            a.sendto(P.encode_ack(1), tid)
            # `b` is still waiting, and gets the timeout; `a` hears nothing of "slow".
            data, _ = b.recvfrom(P.MAX_DATAGRAM)
            assert data == P.encode_error(0, "content hook timed out")
            a.settimeout(1.0)
            with pytest.raises(TimeoutError):
                a.recvfrom(P.MAX_DATAGRAM)
        # Room again once the hook has answered.
        assert client.get("127.0.0.1", d.port, "plain.txt").data == files["plain.txt"]
    finally:
        d.stop()


def test_reload_loads_the_edited_hook(root: Path, hook_dir: Path) -> None:
    d, hport = start(root, hook_dir)
    try:
        before = set(d.wait_workers(2))
        assert client.get("127.0.0.1", d.port, "version").data == b"v1"
        assert curl(hport, "version")[2] == b"v1"
        # Same size, same second: a cached .pyc would not see the change.
        (hook_dir / "testhook.py").write_text(HOOK.replace('b"v1"', 'b"v2"'))
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded")
        # From the reload on, new workers answer (the old ones listen no more).
        assert client.get("127.0.0.1", d.port, "version").data == b"v2"
        assert curl(hport, "version")[2] == b"v2"
        assert set(d.worker_pids()) - before  # served by workers of the new generation
    finally:
        d.stop()


def test_the_hook_runs_as_the_worker_after_privileges_are_dropped(tmp_path: Path) -> None:
    import pwd
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root, to drop privileges")
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")
    base = Path(tempfile.mkdtemp(prefix="tftpd-hook-", dir="/tmp"))
    try:
        base.chmod(0o755)
        (base / "root").mkdir(mode=0o755)
        (base / "etc").mkdir(mode=0o755)
        (base / "etc" / "tftpd.conf").write_text("")
        (base / "etc" / "testhook.py").write_text(HOOK)
        for f in (base / "etc").iterdir():
            f.chmod(0o644)
        d, hport = start(base / "root", base / "etc", "-u", "nobody")
        try:
            assert client.get("127.0.0.1", d.port, "uid").data == str(nobody).encode()
            assert curl(hport, "uid")[2] == str(nobody).encode()
        finally:
            d.stop()
    finally:
        shutil.rmtree(base)


# -- per-client roots --------------------------------------------------------------------


def test_per_client_roots_by_ip(root: Path, tmp_path: Path) -> None:
    (root / "name.txt").write_bytes(b"shared\n")
    (root / "127.0.0.2").mkdir()
    (root / "127.0.0.2" / "name.txt").write_bytes(b"for 127.0.0.2\n")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret\n")
    (root / "evil.txt").write_bytes(b"shared evil\n")
    (root / "127.0.0.2" / "evil.txt").symlink_to(outside)
    d = start_daemon(root, "--workers", "2", "--root-per-client", "ip", "--http",
                     "127.0.0.1:0")
    hport = http_port(d)
    try:
        mine = client.get("127.0.0.1", d.port, "name.txt", options={"tsize": "0"},
                          local="127.0.0.2")
        assert mine.data == b"for 127.0.0.2\n" and mine.oack["tsize"] == "14"
        assert client.get("127.0.0.1", d.port, "name.txt", local="127.0.0.3").data \
            == b"shared\n"
        assert curl(hport, "name.txt", "--interface", "127.0.0.2")[2] == b"for 127.0.0.2\n"
        assert curl(hport, "name.txt", "--interface", "127.0.0.3")[2] == b"shared\n"
        # A per-client file that is refused is refused, not replaced by the shared one.
        err = tftp_error(d.port, "evil.txt", local="127.0.0.2")
        assert err.code == 2
        assert curl(hport, "evil.txt", "--interface", "127.0.0.2")[0] == 403
        assert client.get("127.0.0.1", d.port, "evil.txt", local="127.0.0.3").data \
            == b"shared evil\n"
    finally:
        d.stop()


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0"])
def test_known_answers_stay_off_with_per_client_roots(root: Path, listen: str) -> None:
    """C answers a request it has seen by its bytes alone (a miss, an OACK); with
    per-client roots the same bytes from another address must get that address's file,
    within the same second. On a wildcard listener C would start transfers itself."""
    need_ext()
    (root / "127.0.0.2").mkdir()
    (root / "127.0.0.3").mkdir()
    (root / "127.0.0.2" / "only2").write_bytes(b"only for .2\n")
    (root / "127.0.0.2" / "cfg").write_bytes(b"config of .2\n")
    (root / "127.0.0.3" / "cfg").write_bytes(b"config of the third, longer\n")
    (root / "cfg").write_bytes(b"shared config\n")
    d = start_daemon(root, "--workers", "1", "--root-per-client", "ip",
                     env={"TFTPD_DATAPATH": "c"}, host=listen)
    try:
        opts = {"tsize": "0", "blksize": "1024"}
        for _ in range(3):  # identical datagrams, back to back
            assert tftp_error(d.port, "only2", options=opts, local="127.0.0.3").code == 1
            got = client.get("127.0.0.1", d.port, "only2", options=opts, local="127.0.0.2")
            assert got.data == b"only for .2\n"
        for _ in range(3):
            for ip, want in (("127.0.0.2", b"config of .2\n"),
                             ("127.0.0.3", b"config of the third, longer\n"),
                             ("127.0.0.4", b"shared config\n")):
                got = client.get("127.0.0.1", d.port, "cfg", options=opts, local=ip)
                assert got.data == want and got.oack["tsize"] == str(len(want))
    finally:
        d.stop()
    totals = re.search(r"c_starts=(\d+)", d.log_text())
    assert totals is not None and totals.group(1) == "0"  # C started none itself


# -- per-client roots by MAC: a client in a network namespace of its own ------------------


NS_MAC = "02:00:5e:10:20:30"


@pytest.fixture
def veth() -> Iterator[tuple[str, str, str]]:
    """A veth pair into a new network namespace: (namespace, host address, client
    address); the client's side has NS_MAC. Removed afterwards."""
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (ip) for a network namespace")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, ns_if = f"tftpd-t{tag}", f"tvh{tag}", f"tvn{tag}"
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    steps = [
        [ip, "netns", "add", ns],
        [ip, "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        [ip, "link", "set", ns_if, "netns", ns],
        [ip, "addr", "add", f"{net}.1/24", "dev", host_if],
        [ip, "link", "set", host_if, "up"],
        [ip, "-n", ns, "link", "set", ns_if, "address", NS_MAC],
        [ip, "-n", ns, "addr", "add", f"{net}.2/24", "dev", ns_if],
        [ip, "-n", ns, "link", "set", ns_if, "up"],
        [ip, "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=10,
                                  check=False)
            if proc.returncode != 0:
                pytest.skip(f"cannot make a network namespace: {' '.join(step)}: "
                            f"{proc.stderr.strip()}")
        yield ns, f"{net}.1", f"{net}.2"
    finally:
        subprocess.run([ip, "link", "del", host_if], capture_output=True, check=False)
        subprocess.run([ip, "netns", "del", ns], capture_output=True, check=False)


@pytest.mark.parametrize("chroot", [False, True], ids=["plain", "chroot"])
def test_per_client_roots_by_mac(root: Path, veth: tuple[str, str, str], tmp_path: Path,
                                 chroot: bool) -> None:
    """The neighbour table gives the MAC, also in a worker chrooted into the root (-s):
    the master loaded what reads it before the chroot."""
    ns, server_ip, _ = veth
    prefix = "01-" + NS_MAC.replace(":", "-")
    (root / "pxelinux.cfg").mkdir()
    (root / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT shared\n")
    (root / prefix / "pxelinux.cfg").mkdir(parents=True)
    (root / prefix / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT mine\n")
    d = start_daemon(root, *(["-s"] if chroot else []), "--workers", "1",
                     "--root-per-client", "mac", "--http", f"{server_ip}:0", host=server_ip)
    hport = http_port(d)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = tmp_path / "default.out"
        proc = subprocess.run(["ip", "netns", "exec", ns, "python3", "-m", "tftpd.client",
                               f"{server_ip}:{d.port}", "pxelinux.cfg/default", "-o",
                               str(out)], capture_output=True, text=True, env=env,
                              timeout=CLIENT_TIMEOUT, check=False)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes() == b"DEFAULT mine\n"
        proc = subprocess.run(["ip", "netns", "exec", ns, need("curl"), "-sS",
                               f"http://{server_ip}:{hport}/pxelinux.cfg/default"],
                              capture_output=True, timeout=CLIENT_TIMEOUT, check=True)
        assert proc.stdout == b"DEFAULT mine\n"
        # The host itself (no MAC on this link: its own address) gets the shared file.
        assert client.get(server_ip, d.port, "pxelinux.cfg/default").data \
            == b"DEFAULT shared\n"
    finally:
        d.stop()


def test_mac_roots_turned_on_by_sighup_under_chroot(root: Path, veth: tuple[str, str, str],
                                                   tmp_path: Path) -> None:
    """A reload can turn MAC roots on under -s too: the chrooted master could not
    import what reads the neighbour table then, so it did so before the chroot."""
    ns, server_ip, _ = veth
    prefix = "01-" + NS_MAC.replace(":", "-")
    (root / "default").write_bytes(b"DEFAULT shared\n")
    (root / prefix).mkdir()
    (root / prefix / "default").write_bytes(b"DEFAULT mine\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "tftpd.conf"
    conf.write_text("")
    d = start_daemon(root, "-s", "--workers", "1", "-C", str(conf), host=server_ip)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def fetch_from_namespace() -> bytes:
        out = tmp_path / "default.out"
        proc = subprocess.run(["ip", "netns", "exec", ns, "python3", "-m", "tftpd.client",
                               f"{server_ip}:{d.port}", "default", "-o", str(out)],
                              capture_output=True, text=True, env=env,
                              timeout=CLIENT_TIMEOUT, check=False)
        assert proc.returncode == 0, proc.stderr
        return out.read_bytes()

    try:
        assert fetch_from_namespace() == b"DEFAULT shared\n"
        conf.write_text('root-per-client = "mac"\n')
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded")
        assert fetch_from_namespace() == b"DEFAULT mine\n"
    finally:
        d.stop()
