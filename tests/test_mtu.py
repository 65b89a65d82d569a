"""blksize never makes a DATA datagram larger than the arrival interface's MTU.

In a network namespace of our own, loopback gets the MTU of an Ethernet NIC; a client
there asking for blksize 8192 must be granted 1468 (1500 - 20 IP - 8 UDP - 4 TFTP).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def netns() -> Iterator[str]:
    pyroute2 = pytest.importorskip("pyroute2", reason="pyroute2 creates the namespace")
    name = f"tftpd-test-{uuid.uuid4().hex[:8]}"
    pyroute2.netns.create(name)
    try:
        with pyroute2.NetNS(name) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, mtu=1500, state="up")
        yield name
    finally:
        pyroute2.netns.remove(name)


def run_in(ns: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, check=False)


def test_blksize_capped_by_interface_mtu(netns: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(100_000)
    (root / "f").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "tftpd",
                               "-L", "-a", "127.0.0.1:6969", "--workers", "1", "-u", "root",
                               str(root)],
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert server.stderr is not None
        for line in server.stderr:  # the ready line: bound, requests may come
            if "listening on" in line:
                break
        script = ("from tftpd import client; import sys\n"
                  "r = client.get('127.0.0.1', 6969, 'f', options={'blksize': '8192'})\n"
                  "sys.stdout.write(r.oack['blksize'] + ' ' + str(len(r.data)))\n")
        out = run_in(netns, sys.executable, "-c", script)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1468", str(len(data))]
        script2 = script.replace("8192", "1024")  # below the cap: granted as asked
        out = run_in(netns, sys.executable, "-c", script2)
        assert out.stdout.split() == ["1024", str(len(data))]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_route_that_refuses_segmentation_costs_only_its_transfers(netns: str) -> None:
    # 127.0.0.2 is reached by a route of MTU 576: a segmented window of 1 KiB blocks
    # cannot take it, and the kernel refuses. Its transfer falls back to plain
    # datagrams; a transfer to 127.0.0.1 (the MTU of lo, 1500) keeps segmentation,
    # and so does the data path.
    subprocess.run(["ip", "-n", netns, "route", "add", "local", "127.0.0.2/32", "dev", "lo",
                    "mtu", "lock", "576", "table", "local"], check=True)
    script = r"""
import os, socket, sys
from tftpd import packet as P
from tftpd.datapath import encode_sockaddr, get_datapath
from tftpd.transfer import XferState
data = os.urandom(20_000)
fd = os.memfd_create("f")
os.write(fd, data)
for path in ("c", "python"):
    dp = get_datapath(path)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    for host, gso_after in (("127.0.0.2", 0), ("127.0.0.1", 1), ("127.0.0.2", 0)):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind((host, 0))
        r.settimeout(2)
        st = XferState()
        st.gso = 1
        for first in (1, 9):  # twice: the second window knows the route
            n = dp.send_window(s, r.getsockname(), encode_sockaddr(r.getsockname()), fd,
                               first, 8, 1024, len(data), 0, None, st)
            assert n == 8, (path, host, n)
            for k in range(first, first + 8):
                got = r.recv(2000)
                assert got == P.encode_data(k, data[(k - 1) * 1024:k * 1024]), (path, host, k)
        assert (st.gso, dp.gso) == (gso_after, True), (path, host, st.gso, dp.gso)
print("ok")
"""
    out = run_in(netns, sys.executable, "-c", script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_an_oack_learned_over_ipv4_is_not_replayed_to_ipv6(netns: str, tmp_path: Path) -> None:
    # One worker listens on both families of lo (MTU 1500): 1468-byte blocks fit
    # IPv4, IPv6's 20 more bytes of header leave 1448. C answers a request it has
    # seen with the OACK Python negotiated for it, but only to the family it was
    # negotiated for: the same bytes over IPv6 get IPv6's own answer.
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(50_000)
    (root / "f").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TFTPD_DATAPATH": "c"}
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "tftpd",
                               "-L", "-a", "127.0.0.1:6969", "-a", "[::1]:6969",
                               "--workers", "1", "-u", "root", str(root)],
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if "listening on" in line:
                break
        script = ("from tftpd import client; import sys\n"
                  "for host in ['127.0.0.1'] * 3 + ['::1'] * 2:\n"
                  "    r = client.get(host, 6969, 'f', options={'blksize': '8192', "
                  "'tsize': '0'})\n"
                  "    sys.stdout.write(r.oack['blksize'] + ' ' + str(len(r.data)) + ' ')\n")
        out = run_in(netns, sys.executable, "-c", script)
        assert out.returncode == 0, out.stderr
        n = str(len(data))
        assert out.stdout.split() == ["1468", n] * 3 + ["1448", n] * 2
    finally:
        server.terminate()
        server.wait(timeout=30)
