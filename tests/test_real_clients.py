"""Real TFTP clients against the real daemon: every byte must arrive, over both data paths.

curl, tftp-hpa's tftp, atftp, busybox tftp and our own client fetch random files whose
sizes sit on the edges of the protocol: empty (one empty DATA), exactly one block, an
exact multiple of the block size (the transfer ends with an empty block), one byte over,
a multiple of a whole window, and ~3 MB. Every client runs as a subprocess with a time
bound; the test checks the exit code, the file, and what the server logged it negotiated.
"""

from __future__ import annotations

import random
import re
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import Daemon, need, start_daemon

from tftpd import client

CLIENT_TIMEOUT = 60.0  # s, for any one client process
BIG = 3_000_000


def make_files(root: Path, blksize: int, window: int = 1, *, seed: int = 0,
               empty: bool = True) -> dict[str, bytes]:
    """Random files sized around `blksize` (and `window`) edges; name -> content."""
    rng = random.Random(f"{seed}-{blksize}-{window}")
    sizes = {1, blksize - 1, blksize, blksize + 1, 3 * blksize, 3 * blksize + 1,
             window * blksize, window * blksize + 1, 2 * window * blksize, BIG}
    if empty:
        sizes.add(0)
    files = {}
    for size in sorted(sizes):
        name = f"f{size}.bin"
        data = rng.randbytes(size)
        (root / name).write_bytes(data)
        files[name] = data
    return files


def run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, timeout=CLIENT_TIMEOUT,
                          check=False)


def assert_fetched(proc: subprocess.CompletedProcess[bytes], out: Path, want: bytes,
                   what: str) -> None:
    assert proc.returncode == 0, (f"{what}: exit {proc.returncode}; "
                                  f"stderr={proc.stderr[-500:]!r} stdout={proc.stdout[-500:]!r}")
    assert out.exists(), f"{what}: no output file"
    got = out.read_bytes()
    assert len(got) == len(want), f"{what}: {len(got)} bytes, want {len(want)}"
    assert got == want, f"{what}: content differs at byte " \
        f"{next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)}"


def served(daemon: Daemon, name: str, *, blksize: int | None = None, window: int | None = None,
           size: int | None = None) -> str:
    """Wait for the server's `outcome=ok` line for `name`; check what it negotiated."""
    rx = rf"file={re.escape(name)} protocol=tftp mode=\S+ "
    rx += rf"bytes={size} " if size is not None else r"bytes=\d+ "
    rx += rf"blksize={blksize} " if blksize is not None else r"blksize=\d+ "
    rx += rf"window={window} " if window is not None else r"window=\d+ "
    rx += r".*outcome=ok"
    return daemon.wait_for_log(rx)[-1]


# -- curl -------------------------------------------------------------------------------


@pytest.mark.parametrize("blksize", [512, 1468, 8192, 65464])
def test_curl(daemon: Daemon, tmp_path: Path, blksize: int) -> None:
    curl = need("curl")
    # An empty file is left out here: curl 7.88 refuses an OACK with "tsize 0" ("invalid
    # tsize -:0:- value in OACK packet", exit 71) although tsize 0 is the true size of an
    # empty file (RFC 2349). The empty file is fetched without options below.
    files = make_files(daemon.root, blksize, empty=False)
    for name, data in files.items():
        out = tmp_path / f"out-{name}"
        proc = run([curl, "-s", "-S", "--tftp-blksize", str(blksize),
                    f"tftp://127.0.0.1:{daemon.port}/{name}", "-o", str(out)], tmp_path)
        assert_fetched(proc, out, data, f"curl blksize {blksize} {name}")
        served(daemon, name, blksize=blksize, window=1, size=len(data))


def test_curl_no_options(daemon: Daemon, tmp_path: Path) -> None:
    curl = need("curl")
    files = make_files(daemon.root, 512)
    for name, data in files.items():
        out = tmp_path / f"out-{name}"
        proc = run([curl, "-s", "-S", "--tftp-no-options",
                    f"tftp://127.0.0.1:{daemon.port}/{name}", "-o", str(out)], tmp_path)
        assert_fetched(proc, out, data, f"curl --tftp-no-options {name}")
        served(daemon, name, blksize=512, window=1, size=len(data))


def test_curl_not_found(daemon: Daemon, tmp_path: Path) -> None:
    curl = need("curl")
    proc = run([curl, "-s", f"tftp://127.0.0.1:{daemon.port}/missing.bin", "-o",
                str(tmp_path / "x")], tmp_path)
    assert proc.returncode == 68  # CURLE_TFTP_NOTFOUND: the server said ERROR 1
    daemon.wait_for_log(r"file=missing\.bin .*outcome=notfound error=1")


# -- tftp-hpa -----------------------------------------------------------------------------


def test_tftp_hpa_binary(daemon: Daemon, tmp_path: Path) -> None:
    # tftp-hpa 5.2's client sends no options at all (no blksize, no tsize): plain RFC 1350.
    tftp = need("tftp")
    files = make_files(daemon.root, 512)
    for name, data in files.items():
        out = tmp_path / f"out-{name}"
        proc = run([tftp, "127.0.0.1", str(daemon.port), "-m", "binary", "-c", "get", name,
                    str(out)], tmp_path)
        # tftp-hpa exits 0 even after an ERROR packet; it prints the error instead.
        assert b"Error" not in proc.stdout + proc.stderr, proc
        assert_fetched(proc, out, data, f"tftp-hpa {name}")
        served(daemon, name, blksize=512, window=1, size=len(data))


def test_tftp_hpa_verbose(daemon: Daemon, tmp_path: Path) -> None:
    tftp = need("tftp")
    data = random.Random(7).randbytes(100_000)
    (daemon.root / "v.bin").write_bytes(data)
    out = tmp_path / "v.out"
    proc = run([tftp, "-v", "127.0.0.1", str(daemon.port), "-m", "octet", "-c", "get",
                "v.bin", str(out)], tmp_path)
    assert_fetched(proc, out, data, "tftp-hpa -v")
    assert b"Received 100000 bytes" in proc.stdout, proc.stdout


# -- atftp --------------------------------------------------------------------------------


ATFTP_CASES = {
    "plain": ([], 512, 1),
    "blksize1468": (["--option", "blksize 1468"], 1468, 1),
    "tsize0": (["--option", "tsize 0"], 512, 1),
    "window8": (["--option", "blksize 1468", "--option", "windowsize 8"], 1468, 8),
    "all": (["--option", "tsize 0", "--option", "blksize 8192", "--option", "windowsize 4"],
            8192, 4),
}


@pytest.mark.parametrize("case", list(ATFTP_CASES))
def test_atftp(daemon: Daemon, tmp_path: Path, case: str) -> None:
    atftp = need("atftp")
    args, blksize, window = ATFTP_CASES[case]
    files = make_files(daemon.root, blksize, window)
    for name, data in files.items():
        out = tmp_path / f"out-{name}"
        proc = run([atftp, *args, "-g", "-r", name, "-l", str(out), "127.0.0.1",
                    str(daemon.port)], tmp_path)
        assert_fetched(proc, out, data, f"atftp {case} {name}")
        # atftp 0.8.0 negotiates windowsize (RFC 7440): the server must have run with it.
        served(daemon, name, blksize=blksize, window=window, size=len(data))


# -- busybox ------------------------------------------------------------------------------


@pytest.mark.parametrize("blksize", [512, 1468])
def test_busybox(daemon: Daemon, tmp_path: Path, blksize: int) -> None:
    busybox = need("busybox")
    files = make_files(daemon.root, blksize)
    for name, data in files.items():
        out = tmp_path / f"out-{name}"
        proc = run([busybox, "tftp", "-g", "-r", name, "-l", str(out), "-b", str(blksize),
                    "127.0.0.1", str(daemon.port)], tmp_path)
        assert_fetched(proc, out, data, f"busybox -b {blksize} {name}")
        served(daemon, name, blksize=blksize, window=1, size=len(data))


# -- our client ---------------------------------------------------------------------------


@pytest.mark.parametrize("blksize", [512, 1456, 8192])
@pytest.mark.parametrize("window", [4, 16, 64])
def test_own_client_windowed(daemon: Daemon, blksize: int, window: int) -> None:
    files = make_files(daemon.root, blksize, window)
    # The server grants at most --window-bytes (128 KiB) a window: one burst that a
    # default receive buffer holds.
    granted = min(window, max(1, (128 * 1024) // blksize))
    for name, data in files.items():
        res = client.get("127.0.0.1", daemon.port, name,
                         options={"blksize": str(blksize), "windowsize": str(window),
                                  "tsize": "0"})
        assert res.oack == {"blksize": str(blksize), "windowsize": str(granted),
                            "tsize": str(len(data))}
        assert res.data == data, f"{name}: {len(res.data)} bytes, want {len(data)}"
        assert res.foreign == 0
        served(daemon, name, blksize=blksize, window=granted, size=len(data))


def test_own_client_plain(daemon: Daemon) -> None:
    files = make_files(daemon.root, 512)
    for name, data in files.items():
        res = client.get("127.0.0.1", daemon.port, name)
        assert res.oack == {}
        assert res.data == data, name
        assert res.server[1] != daemon.port  # a new TID, not the listen port
        served(daemon, name, blksize=512, window=1, size=len(data))


def test_own_client_cli(daemon: Daemon, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(200_001)
    (daemon.root / "cli.bin").write_bytes(data)
    out = tmp_path / "cli.out"
    proc = run(["python3", "-m", "tftpd.client", f"127.0.0.1:{daemon.port}", "cli.bin",
                "-b", "1456", "-w", "16", "-t", "-o", str(out)], Path(__file__).parent.parent)
    assert_fetched(proc, out, data, "tftp-get -b 1456 -w 16")
    served(daemon, "cli.bin", blksize=1456, window=16, size=len(data))
    proc = run(["python3", "-m", "tftpd.client", f"127.0.0.1:{daemon.port}", "cli.bin",
                "--probe"], Path(__file__).parent.parent)
    assert proc.returncode == 0, proc
    assert proc.stdout.strip() == b"200001"


# -- netascii -----------------------------------------------------------------------------


def to_netascii(data: bytes) -> bytes:
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def netascii_files(root: Path) -> dict[str, bytes]:
    rng = random.Random(11)
    small = b"line one\nbare CR\rthen CRLF\r\nend\n\n\r\r\n\rx"
    # Many line ends, so that CR NUL and CR LF pairs straddle block boundaries.
    big = bytes(rng.choice(b"ab\r\n \t.") for _ in range(20_000))
    # A CR as the very last byte of the first 512-byte block of the converted stream.
    edge = b"a" * 511 + b"\r" + b"b" * 10 + b"\n"
    files = {"small.txt": small, "big.txt": big, "edge.txt": edge, "empty.txt": b"",
             "plain.txt": b"no line ends at all"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def test_netascii_own_client(daemon: Daemon) -> None:
    for name, data in netascii_files(daemon.root).items():
        want = to_netascii(data)
        res = client.get("127.0.0.1", daemon.port, name, mode="netascii",
                         options={"tsize": "0"})
        assert res.data == want, name
        # tsize is the size of the converted stream (RFC 2349 with netascii).
        assert res.oack == {"tsize": str(len(want))}, name
        served(daemon, name, size=len(want))
        # The same file in octet mode is untouched.
        assert client.get("127.0.0.1", daemon.port, name).data == data


def test_netascii_tftp_hpa(daemon: Daemon, tmp_path: Path) -> None:
    # tftp-hpa converts netascii back to local (Unix) text: CR LF -> LF, CR NUL -> CR,
    # so the original file comes back byte for byte.
    tftp = need("tftp")
    for name, data in netascii_files(daemon.root).items():
        out = tmp_path / f"out-{name}"
        proc = run([tftp, "127.0.0.1", str(daemon.port), "-m", "netascii", "-c", "get", name,
                    str(out)], tmp_path)
        assert b"Error" not in proc.stdout + proc.stderr, proc
        assert_fetched(proc, out, data, f"tftp-hpa netascii {name}")
        served(daemon, name, size=len(to_netascii(data)))


# -- block number rollover ------------------------------------------------------------------

ROLLOVER_SIZE = 34 * 2**20 + 100  # 69633 blocks of 512: block numbers pass 65535


def rollover_file(root: Path) -> bytes:
    """A repeated 4 KiB pattern with each 512-byte block's index in its first 4 bytes.

    Block k and block k + 65536 would otherwise be identical: a server that wraps to the
    wrong offset, or a client that accepts a stale block, is caught.
    """
    pattern = random.Random(99).randbytes(4096)
    nblocks = -(-ROLLOVER_SIZE // 512)
    chunks = [struct.pack(">I", k) + pattern[(k % 8) * 512 + 4:(k % 8 + 1) * 512]
              for k in range(nblocks)]
    data = b"".join(chunks)[:ROLLOVER_SIZE]
    (root / "roll.bin").write_bytes(data)
    return data


def test_rollover_own_client(daemon: Daemon) -> None:
    data = rollover_file(daemon.root)
    res = client.get("127.0.0.1", daemon.port, "roll.bin", options={"blksize": "512"},
                     timeout=2.0)
    assert len(res.data) == len(data)
    assert res.data == data
    served(daemon, "roll.bin", blksize=512, window=1, size=len(data))


def test_rollover_curl(daemon: Daemon, tmp_path: Path) -> None:
    curl = need("curl")
    data = rollover_file(daemon.root)
    out = tmp_path / "roll.out"
    proc = run([curl, "-s", "-S", "--tftp-blksize", "512",
                f"tftp://127.0.0.1:{daemon.port}/roll.bin", "-o", str(out)], tmp_path)
    assert_fetched(proc, out, data, "curl rollover")
    served(daemon, "roll.bin", blksize=512, window=1, size=len(data))


# -- IPv6 -------------------------------------------------------------------------------------


def test_ipv6(root: Path, tmp_path: Path, datapath: str) -> None:
    curl = need("curl")
    data = random.Random(6).randbytes(123_457)
    (root / "six.bin").write_bytes(data)
    try:
        d = start_daemon(root, "--workers", "1", env={"TFTPD_DATAPATH": datapath}, host="::1")
    except AssertionError as err:
        if "Cannot assign requested address" in str(err) or "no interface" in str(err):
            pytest.skip("no IPv6 loopback on this machine")
        raise
    try:
        res = client.get("::1", d.port, "six.bin", options={"blksize": "1456",
                                                             "windowsize": "8"})
        assert res.data == data
        assert res.server[0] == "::1"
        served(d, "six.bin", blksize=1456, window=8, size=len(data))
        assert "[::1]:" in d.log_text()
        out = tmp_path / "six.out"
        proc = run([curl, "-s", "-S", "-g", f"tftp://[::1]:{d.port}/six.bin", "-o", str(out)],
                   tmp_path)
        assert_fetched(proc, out, data, "curl over IPv6")
    finally:
        d.stop()
