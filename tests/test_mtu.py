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
