"""HTTP (--http): the real daemon on loopback, spoken to with curl and raw sockets."""

from __future__ import annotations

import email.utils
import gzip
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, need, start_daemon
from tftpd import client
from tftpd.http import BadRequest, decode_target, listen_socket, parse_range

HTTP_ON = re.compile(r"http on (\S+):(\d+)")
BIG = 1 << 20


def http_port(d: Daemon) -> int:
    m = HTTP_ON.search(d.wait_for_log(r"http on")[0])
    assert m, d.log_text()
    return int(m.group(2))


def start_http(root: Path, *args: str, host: str = "127.0.0.1") -> tuple[Daemon, int]:
    where = f"[{host}]:0" if ":" in host else f"{host}:0"
    d = start_daemon(root, "--workers", "2", "--http", where, *args, host=host)
    return d, http_port(d)


@pytest.fixture
def files(root: Path) -> dict[str, bytes]:
    content = {"big.bin": os.urandom(BIG), "hello.txt": b"hello over http\n",
               "empty": b""}
    for name, data in content.items():
        (root / name).write_bytes(data)
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_bytes(b"inner\n")
    return content


@pytest.fixture
def served(root: Path, files: dict[str, bytes]) -> Iterator[tuple[Daemon, int]]:
    d, port = start_http(root)
    try:
        yield d, port
    finally:
        d.stop()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def read_reply(sock: socket.socket, head_only: bool = False, timeout: float = 10.0) -> Reply:
    """One response from a socket: its head, then Content-Length bytes of body."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in
               (ln.split(":", 1) for ln in lines[1:])}
    want = 0 if head_only or status == 304 else int(headers.get("content-length", "0"))
    while len(body) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Reply(status, headers, body)


def ask(port: int, request: bytes, head_only: bool = False,
        host: str = "127.0.0.1") -> Reply:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(request)
        return read_reply(s, head_only)


def get(port: int, target: str, *headers: str) -> Reply:
    extra = "".join(f"{h}\r\n" for h in headers)
    return ask(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (bytes it
    sends first, an error response, are read and dropped)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


# -- requests and answers --------------------------------------------------------------


def test_get_and_head_with_curl(served: tuple[Daemon, int], files: dict[str, bytes]) -> None:
    curl = need("curl")
    d, port = served
    out = subprocess.run([curl, "-sS", "-D", "-", f"http://127.0.0.1:{port}/big.bin"],
                         capture_output=True, timeout=30, check=True).stdout
    head, body = out.split(b"\r\n\r\n", 1)
    assert body == files["big.bin"]
    text = head.decode()
    assert text.startswith("HTTP/1.1 200")
    assert f"Content-Length: {BIG}" in text
    assert "Server: tftpd/" in text and "Accept-Ranges: bytes" in text
    mtime = int((d.root / "big.bin").stat().st_mtime)
    assert f"Last-Modified: {email.utils.formatdate(mtime, usegmt=True)}" in text
    date = re.search(r"Date: (.+)\r", text)
    assert date and abs(email.utils.parsedate_to_datetime(date.group(1)).timestamp()
                        - time.time()) < 60
    head_only = subprocess.run([curl, "-sS", "-I", f"http://127.0.0.1:{port}/hello.txt"],
                               capture_output=True, timeout=30, check=True).stdout.decode()
    assert head_only.startswith("HTTP/1.1 200")
    assert f"Content-Length: {len(files['hello.txt'])}" in head_only
    assert subprocess.run([curl, "-s", f"http://127.0.0.1:{port}/empty"],
                          capture_output=True, timeout=30, check=True).stdout == b""
    d.wait_for_log(r"127\.0\.0\.1:\d+ file=big\.bin protocol=http method=GET status=200 "
                   rf"bytes={BIG} duration=\S+s outcome=ok$")


def test_tftp_and_http_records_name_their_protocol(served: tuple[Daemon, int],
                                                   files: dict[str, bytes]) -> None:
    d, port = served
    assert client.get("127.0.0.1", d.port, "hello.txt").data == files["hello.txt"]
    with pytest.raises(client.TftpError):
        client.get("127.0.0.1", d.port, "not-there")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=10) as r:
        assert r.read() == files["hello.txt"]
    d.wait_for_log(r"127\.0\.0\.1:\d+ file=hello\.txt protocol=tftp mode=octet bytes=\d+ ")
    d.wait_for_log(r"file=not-there protocol=tftp mode=octet outcome=notfound error=1 ")
    d.wait_for_log(r"127\.0\.0\.1:\d+ file=hello\.txt protocol=http method=GET status=200 ")


def test_head_sends_no_body(served: tuple[Daemon, int]) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"HEAD /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        # Both answers may come in one read: gather until the second one is whole.
        data = b""
        s.settimeout(10)
        while not data.endswith(b"\r\n\r\nhello over http\n"):
            chunk = s.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"\r\ncontent-length: {BIG}\r\n".encode() in head.lower() + b"\r\n"
        # What follows on the connection is the next answer, not a body.
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.count(b"HTTP/1.1 ") == 1


def test_single_ranges(served: tuple[Daemon, int], files: dict[str, bytes]) -> None:
    _, port = served
    data = files["big.bin"]
    for spec, first, last in (("bytes=10-19", 10, 19), ("bytes=-5", BIG - 5, BIG - 1),
                              (f"bytes={BIG - 3}-", BIG - 3, BIG - 1),
                              (f"bytes=0-{BIG * 2}", 0, BIG - 1)):
        r = get(port, "/big.bin", f"Range: {spec}")
        assert r.status == 206, spec
        assert r.headers["content-range"] == f"bytes {first}-{last}/{BIG}"
        assert r.body == data[first:last + 1]
    for spec in (f"bytes={BIG}-", "bytes=-0", f"bytes={BIG + 10}-{BIG + 20}"):
        r = get(port, "/big.bin", f"Range: {spec}")
        assert r.status == 416, spec
        assert r.headers["content-range"] == f"bytes */{BIG}"
    # Several ranges: the whole file (RFC 9110 14.2 lets a server ignore Range).
    r = get(port, "/big.bin", "Range: bytes=0-1,5-6")
    assert r.status == 200 and r.body == data
    # A Range that is not a byte range is ignored too.
    assert get(port, "/hello.txt", "Range: lines=1-2").status == 200
    # If-Range with another date: the whole file.
    r = get(port, "/big.bin", "Range: bytes=0-0", "If-Range: Sat, 01 Jan 2000 00:00:00 GMT")
    assert r.status == 200 and len(r.body) == BIG


def test_keep_alive_and_close(served: tuple[Daemon, int], files: dict[str, bytes]) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for name in ("hello.txt", "big.bin", "hello.txt"):
            s.sendall(f"GET /{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            r = read_reply(s)
            assert r.status == 200 and r.body == files[name]
        s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = read_reply(s)
        assert r.headers["connection"] == "close" and r.body == files["hello.txt"]
        assert closed_by_server(s, 5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
        r = read_reply(s)
        assert r.status == 200 and r.body == files["hello.txt"]
        assert closed_by_server(s, 5)


def test_pipelined_requests_are_answered_in_order(served: tuple[Daemon, int]) -> None:
    _, port = served
    n = 3000  # more than the interpreter's recursion limit: answered in a loop
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(f"GET /hello.txt?{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                           for i in range(n)))
        data = b""
        s.settimeout(10)
        while data.count(b"\r\n\r\nhello over http\n") < n:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {data.count(b'HTTP/1.1 200 OK')} answers"
            data += chunk
        assert data.count(b"HTTP/1.1 200 OK\r\n") == n
        assert data.endswith(b"\r\n\r\nhello over http\n")
        s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(s).body == b"hello over http\n"


def test_curl_reuses_the_connection(served: tuple[Daemon, int]) -> None:
    curl = need("curl")
    _, port = served
    url = f"http://127.0.0.1:{port}/hello.txt"
    out = subprocess.run([curl, "-s", "-o", "/dev/null", "-o", "/dev/null", "-w",
                          "%{http_code} %{num_connects}\n", url, url],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split("\n")[:2] == ["200 1", "200 0"]


def test_if_modified_since(served: tuple[Daemon, int]) -> None:
    _, port = served
    last = get(port, "/hello.txt").headers["last-modified"]
    r = get(port, "/hello.txt", f"If-Modified-Since: {last}")
    assert r.status == 304 and r.body == b"" and "content-length" not in r.headers
    r = get(port, "/hello.txt", "If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT")
    assert r.status == 200 and r.body == b"hello over http\n"
    r = get(port, "/hello.txt", "If-Modified-Since: not a date")
    assert r.status == 200
    # A recipient accepts the three date forms of RFC 9110 5.6.7: IMF, RFC 850, asctime.
    when = email.utils.parsedate_to_datetime(last)
    for form in (when.strftime("%A, %d-%b-%y %H:%M:%S GMT"),
                 when.strftime("%a %b ") + f"{when.day:2d}" + when.strftime(" %H:%M:%S %Y")):
        assert get(port, "/hello.txt", f"If-Modified-Since: {form}").status == 304, form
        r = get(port, "/hello.txt", "Range: bytes=0-1", f"If-Range: {form}")
        assert (r.status, r.body) == (206, b"he"), form
    # If-Range with an entity tag: we send none, so it never matches.
    assert get(port, "/hello.txt", "Range: bytes=0-1", 'If-Range: "x"').status == 200
    # A date in another zone, or none that HTTP knows, is no validator: the whole file
    # (a resumed download must not join two versions), and no 304 either.
    local = when.strftime("%a, %d %b %Y %H:%M:%S")
    for odd in (f"{local} CET", f"{local} -0000", f"{local}",
                "Sun, 06 Nov 99999999999999999999 08:49:37 GMT"):
        r = get(port, "/hello.txt", "Range: bytes=0-1", f"If-Range: {odd}")
        assert (r.status, r.body) == (200, b"hello over http\n"), odd
        assert get(port, "/hello.txt", f"If-Modified-Since: {odd}").status == 200, odd


def test_misses_and_directories(served: tuple[Daemon, int]) -> None:
    _, port = served
    assert get(port, "/nothing-here").status == 404
    assert get(port, "/dir").status == 403  # no listings: a directory is refused
    assert get(port, "/dir/").status == 403
    assert get(port, "/").status == 403
    assert get(port, "/dir/inner.txt").body == b"inner\n"
    # A query string is dropped; percent-encoding is decoded once.
    assert get(port, "/hello.txt?x=1").body == b"hello over http\n"
    assert get(port, "/hell%6f.txt").body == b"hello over http\n"
    assert get(port, "/hello%252etxt").status == 404  # decoded once: 'hello%2etxt'


def test_traversal_is_refused(root: Path, tmp_path: Path, files: dict[str, bytes]) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"SECRET-OUTSIDE-THE-ROOT")
    (root / "escape").symlink_to(secret)
    (root / "escape-dir").symlink_to(tmp_path)
    d, port = start_http(root)
    try:
        for target in ("/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt",
                       "/dir/../../secret.txt", "/..%2f..%2fetc/passwd", "//etc/passwd",
                       "/../etc/passwd", f"/{tmp_path}/secret.txt", "/escape",
                       "/escape-dir/secret.txt", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                       "http://x/../secret.txt"):
            r = get(port, target)
            assert r.status in (403, 404), target
            assert b"SECRET" not in r.body and b"root:" not in r.body, target
        assert get(port, "/../secret.txt").status == 403
        assert get(port, "/escape").status == 403
        assert get(port, "//etc/passwd").status == 404  # the root's etc/passwd
    finally:
        d.stop()


@pytest.mark.parametrize("request_bytes,status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /hello.txt%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /a%2 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET hello.txt HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000 + b"\r\n\r\n", 431),
    (b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000, 431),  # never ends
    (b"POST /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"DELETE /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n", 405),
], ids=["garbage", "bad-escape", "nul", "short-escape", "not-a-path", "no-host", "body",
        "bad-header", "huge-head", "huge-unfinished-head", "post", "delete"])
def test_malformed_requests(served: tuple[Daemon, int], request_bytes: bytes,
                            status: int) -> None:
    d, port = served
    r = ask(port, request_bytes)
    assert r.status == status
    if status == 405:
        assert r.headers["allow"] == "GET, HEAD"
    assert b"hello over http" not in r.body
    # The worker goes on serving.
    assert get(port, "/hello.txt").body == b"hello over http\n"


def test_the_head_bound_is_exact(served: tuple[Daemon, int]) -> None:
    """A request head of MAX_HEAD bytes, request line and blank line counted, is read;
    one byte more is 431."""
    from tftpd.http.message import MAX_HEAD

    _, port = served
    base = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nX: \r\n\r\n"
    fill = MAX_HEAD - len(base)
    fits = base.replace(b"X: ", b"X: " + b"y" * fill)
    assert len(fits) == MAX_HEAD
    assert ask(port, fits).status == 200
    assert ask(port, fits.replace(b"X: ", b"X: y")).status == 431


def test_slow_head_is_closed_at_the_deadline(root: Path, files: dict[str, bytes]) -> None:
    d, port = start_http(root, "--http-head-timeout", "1", "--http-idle-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHo")
            assert closed_by_server(s, 5)
            took = time.monotonic() - started
            assert 0.8 <= took <= 4, took
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            started = time.monotonic()
            # Sending a byte at a time does not extend the deadline.
            for _ in range(40):
                try:
                    s.sendall(b"X")
                except OSError:
                    break
                if closed_by_server(s, 0.1):
                    break
            took = time.monotonic() - started
            assert took <= 4, took
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s).status == 200
            assert closed_by_server(s, 5)  # idle keep-alive ends after 1 s
        d.wait_for_log(r"http: 127\.0\.0\.1:\d+ closed: no complete request in 1s")
        assert get(port, "/hello.txt").status == 200
    finally:
        d.stop()


@pytest.mark.parametrize("threads", [1, 4])
def test_too_many_connections_are_refused(root: Path, files: dict[str, bytes],
                                          threads: int) -> None:
    """The bound is the worker's, however many HTTP threads share its connections."""
    d = start_daemon(root, "--workers", "1", "--http", "127.0.0.1:0",
                     "--http-max-connections", "2", "--http-threads", str(threads))
    port = http_port(d)
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(s)
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s).status == 200  # accepted and kept open
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                r = read_reply(s)
                assert r.status == 503 and r.headers["connection"] == "close"
                assert closed_by_server(s, 5)
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the close on its next turn
            r = get(port, "/hello.txt")
            if r.status == 200 or time.monotonic() > deadline:
                break
        assert r.status == 200
    finally:
        for s in held:
            s.close()
        d.stop()


def test_tftp_goes_on_during_an_http_download(root: Path, files: dict[str, bytes]) -> None:
    data = os.urandom(16 << 20)
    (root / "large.bin").write_bytes(data)
    d, port = start_http(root)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /large.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(1024)  # the download has begun and stalls on our reading
        assert first.startswith(b"HTTP/1.1 200")
        for _ in range(3):
            assert client.get("127.0.0.1", d.port, "big.bin").data == files["big.bin"]
        got = bytearray(first.split(b"\r\n\r\n", 1)[1])
        s.settimeout(20)
        while len(got) < len(data):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        s.close()
        assert bytes(got) == data
    finally:
        d.stop()


def test_map_file_applies(root: Path, tmp_path: Path, files: dict[str, bytes]) -> None:
    rules = tmp_path / "map"
    rules.write_text("r ^/?boot/(.*) \\1\na secret\nr ^escape ../../etc/passwd\n")
    (root / "secret.txt").write_bytes(b"not for anyone")
    d, port = start_http(root, "-m", str(rules))
    try:
        # The map file sees the name without its leading '/', as a TFTP name.
        assert get(port, "/boot/hello.txt").body == b"hello over http\n"
        assert get(port, "/secret.txt").status == 403
        r = get(port, "/escape")  # rewritten to ../../etc/passwd: confinement refuses
        assert r.status == 403 and b"root:" not in r.body
    finally:
        d.stop()


def test_gz_both_ways(root: Path, tmp_path: Path) -> None:
    plain = b"kernel image " * 5000
    (root / "kernel").write_bytes(plain)
    (root / "initrd.gz").write_bytes(gzip.compress(b"initrd " * 3000))
    d, port = start_http(root, "--gz", "--gz-cache", str(tmp_path / "gzcache"))
    try:
        assert gzip.decompress(get(port, "/kernel.gz").body) == plain
        assert get(port, "/initrd").body == b"initrd " * 3000
        assert get(port, "/kernel").body == plain
    finally:
        d.stop()


def test_records_and_metrics(root: Path, files: dict[str, bytes]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    d, port = start_http(root, "--metrics", f"127.0.0.1:{mport}", "--log-format", "json")
    try:
        assert get(port, "/hello.txt").status == 200
        assert get(port, "/missing").status == 404
        assert client.get("127.0.0.1", d.port, "hello.txt").data == files["hello.txt"]
        d.wait_for_log(r'"file":"missing","protocol":"http","op":"GET","status":404')
        d.wait_for_log(r'"file":"hello.txt","protocol":"tftp","mode":"octet"')

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                return r.read().decode()

        deadline = time.monotonic() + 10
        text = scrape()
        while 'tftpd_transfers_total{protocol="http",outcome="notfound"} 1' not in text \
                and time.monotonic() < deadline:
            text = scrape()
        assert 'tftpd_transfers_total{protocol="http",outcome="ok"} 1' in text
        assert 'tftpd_transfers_total{protocol="http",outcome="notfound"} 1' in text
        assert f'tftpd_bytes_total{{protocol="http"}} {len(files["hello.txt"])}' in text
        assert 'tftpd_transfers_total{protocol="tftp",outcome="ok"} 1' in text
        assert 'tftpd_transfer_duration_seconds_count{protocol="http"} 2' in text
    finally:
        d.stop()
    # The totals said at the stop count HTTP's answers beside TFTP's.
    totals = d.log_text()[d.log_text().rindex("totals:"):]
    assert " ok=1 " in totals and " http_requests=2 " in totals and " http_ok=1 " in totals
    assert " http_notfound=1 " in totals


def test_ipv6(root: Path, files: dict[str, bytes]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 on this machine")
    d, port = start_http(root, host="::1")
    try:
        r = ask(port, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n", host="::1")
        assert r.status == 200 and r.body == files["hello.txt"]
        d.wait_for_log(r"\[::1\]:\d+ file=hello\.txt protocol=http")
    finally:
        d.stop()


def test_drain_finishes_a_running_download(root: Path, files: dict[str, bytes]) -> None:
    data = os.urandom(8 << 20)
    (root / "large.bin").write_bytes(data)
    d, port = start_http(root)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /large.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    got = bytearray(s.recv(1024))
    assert got.startswith(b"HTTP/1.1 200")
    d.proc.send_signal(15)
    d.wait_for_log(r"SIGTERM: no new requests")
    # New connections are refused, not queued where nobody will answer them.
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "connections still taken while draining"
        time.sleep(0.05)  # retries the connect, bounded by the deadline
    got = got.split(b"\r\n\r\n", 1)[1]
    s.settimeout(20)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    s.close()
    assert bytes(got) == data
    assert d.stop() == 0


# -- pure parts -----------------------------------------------------------------------


def test_decode_target() -> None:
    assert decode_target(b"/a/b%20c?x=%zz") == b"a/b c"
    assert decode_target(b"http://host:80/x") == b"x"
    assert decode_target(b"/%2e%2e/x") == b"../x"
    assert decode_target(b"/%25") == b"%"
    for bad in (b"x", b"*", b"/%", b"/%g0", b"/%00"):
        with pytest.raises(BadRequest):
            decode_target(bad)


def test_parse_range() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=1-2,4-5", 10) is None
    assert parse_range("bytes=5-3", 10) is None
    assert parse_range("bytes=-", 10) is None
    for spec, size in (("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0)):
        with pytest.raises(BadRequest) as exc:
            parse_range(spec, size)
        assert exc.value.status == 416


def test_log_lines_from_two_threads_are_all_written() -> None:
    """A line appended by one thread while another flushes is written, not lost."""
    from tftpd.logs import BatchingHandler

    out = io.StringIO()
    h = BatchingHandler(out)
    h.batching = True
    h.setFormatter(logging.Formatter("%(message)s"))
    lg = logging.getLogger("tftpd.test-threads")
    lg.addHandler(h)
    lg.propagate = False
    lg.setLevel(logging.INFO)
    n = 20000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(3):
            out.seek(0)
            out.truncate()

            def write() -> None:
                for i in range(n):
                    lg.info("line %d", i)

            t = threading.Thread(target=write)
            t.start()
            while t.is_alive():
                h.flush()
            t.join()
            h.flush()
            assert out.getvalue().count("\n") == n
    finally:
        sys.setswitchinterval(old)
        lg.removeHandler(h)


def test_systemd_stream_socket_is_served_over_http(root: Path, files: dict[str, bytes]) -> None:
    """A listening stream socket among LISTEN_FDS (ListenStream= in tftpd.socket) is
    served over HTTP beside the datagram socket."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = socket.create_server(("127.0.0.1", 0))
    tport, hport = udp.getsockname()[1], tcp.getsockname()[1]
    launcher = (
        "import os, sys\n"
        f"os.dup2({udp.fileno()}, 3); os.dup2({tcp.fileno()}, 4)\n"
        "os.environ.update(LISTEN_FDS='2', LISTEN_PID=str(os.getpid()))\n"
        f"os.execv(sys.executable, [sys.executable, '-m', 'tftpd', '-L', {str(root)!r}])\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=env,
                            pass_fds=(udp.fileno(), tcp.fileno()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    udp.close()
    tcp.close()
    try:
        r = ask(hport, b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.status == 200 and r.body == files["hello.txt"]
        assert client.get("127.0.0.1", tport, "hello.txt").data == files["hello.txt"]
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_settings(tmp_path: Path) -> None:
    from tftpd.config import from_argv

    conf = tmp_path / "tftpd.conf"
    conf.write_text('http = ["127.0.0.1:8080", "[::1]"]\nhttp-head-timeout = 5\n')
    cfg = from_argv(["-C", str(conf)])
    assert [str(a) for a in cfg.http] == ["127.0.0.1:8080", "[::1]:80"]
    assert cfg.http_head_timeout == 5 and cfg.http_max_connections == 512
    cfg = from_argv(["--http", "0.0.0.0", "--http", ":81", "--http-idle-timeout", "2"])
    assert [str(a) for a in cfg.http] == ["0.0.0.0:80", "0.0.0.0:81"]
    assert cfg.http_idle_timeout == 2


class DeferringContent:
    """A content resolver that answers later, from another thread, as the content hook
    of tftpd.content does (begin -> an object with a future; complete -> Resolution)."""

    def __init__(self, inner: object, delay: float) -> None:
        self.inner = inner
        self.cache = inner.cache  # type: ignore[attr-defined]
        self.delay = delay
        self.asked: list[bytes] = []

    def begin(self, filename: bytes, mode: str, client: tuple[str, int], protocol: str,
              options: dict[str, str]) -> object:
        import concurrent.futures
        import types

        self.asked.append(filename)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        threading.Timer(self.delay, fut.set_result, (filename,)).start()
        return types.SimpleNamespace(future=fut, args=(filename, mode, client, protocol,
                                                       options))

    def complete(self, pending: object) -> object:
        assert pending.future.done()  # type: ignore[attr-defined]
        return self.inner.begin(*pending.args)  # type: ignore[attr-defined]


def test_a_deferred_answer_is_waited_for(root: Path, files: dict[str, bytes]) -> None:
    import dataclasses

    from tftpd.config import Address, Config
    from tftpd.content import ContentResolver
    from tftpd.files import FileCache, Root
    from tftpd.http import HttpServer

    cfg = dataclasses.replace(Config(), http_head_timeout=2)
    lst = listen_socket(Address(socket.AF_INET, "127.0.0.1", 0))
    port = lst.getsockname()[1]
    content = DeferringContent(ContentResolver(FileCache(Root(str(root)))), 0.3)
    server = HttpServer(cfg, [lst], Root(str(root)), content=content)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
            r = read_reply(s)
            assert r.status == 200 and r.body == files["hello.txt"]
            assert time.monotonic() - started >= 0.25  # it did wait for the answer
            assert read_reply(s).status == 404
            s.sendall(b"HEAD /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            r = read_reply(s, head_only=True)
            assert r.status == 200 and r.headers["content-length"] == str(BIG)
        assert content.asked == [b"hello.txt", b"missing", b"big.bin"]
        # A client that leaves while its answer is pending costs nothing after.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get(port, "/hello.txt").body == files["hello.txt"]
    finally:
        server.stop()
        lst.close()


def test_reload_hands_http_to_the_new_workers(root: Path, files: dict[str, bytes]) -> None:
    import signal

    d, port = start_http(root)
    try:
        before = set(d.wait_workers(2))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s).status == 200
            os.kill(d.proc.pid, signal.SIGHUP)
            d.wait_for_log(r"SIGHUP: reloaded")
            # The old worker closed this idle keep-alive connection as it drained.
            assert closed_by_server(s, 10)
        deadline = time.monotonic() + 10
        for _ in range(1000):  # served all along, while the old generation leaves
            if not set(d.worker_pids()) & before or time.monotonic() > deadline:
                break
            assert get(port, "/hello.txt").body == files["hello.txt"]
            time.sleep(0.01)  # paces the requests; the condition above is polled
        assert not set(d.worker_pids()) & before  # the old generation is gone
        for _ in range(4):
            assert get(port, "/hello.txt").body == files["hello.txt"]
    finally:
        d.stop()


def test_bench_load_generator_against_the_daemon(root: Path) -> None:
    """bench/httpload.c keeps connections busy; every response is whole (no errors)."""
    need("cc")
    from bench.build import BuildError
    from bench.http import httpload_binary

    try:
        binary = httpload_binary()
    except BuildError as err:
        pytest.fail(str(err))
    (root / "boot").mkdir()
    (root / "boot" / "img").write_bytes(os.urandom(BIG))
    d, port = start_http(root)
    try:
        out = subprocess.run([str(binary), "127.0.0.1", str(port), "/boot/img", "4", "1"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        res = json.loads(out)
        assert res["errors"] == 0 and res["requests"] >= 4
        # Whole responses, and what the 4 connections had of their last when time was up.
        assert res["requests"] * BIG <= res["bytes"] < (res["requests"] + 4) * BIG
    finally:
        d.stop()


def test_a_failing_resolver_ends_one_connection_only(root: Path,
                                                     files: dict[str, bytes]) -> None:

    from tftpd.config import Address, Config
    from tftpd.content import ContentResolver
    from tftpd.files import FileCache, Root
    from tftpd.http import HttpServer

    class Failing(ContentResolver):
        def begin(self, filename: bytes, *args: object) -> object:  # type: ignore[override]
            if filename == b"boom":
                raise RuntimeError("resolver failed")
            return super().begin(filename, *args)  # type: ignore[arg-type]

    lst = listen_socket(Address(socket.AF_INET, "127.0.0.1", 0))
    port = lst.getsockname()[1]
    server = HttpServer(Config(), [lst], Root(str(root)),
                        content=Failing(FileCache(Root(str(root)))))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_server(s, 5)
        assert get(port, "/hello.txt").body == files["hello.txt"]
    finally:
        server.stop()
        lst.close()


def test_threads_never_make_the_shared_listening_socket_blocking(root: Path) -> None:
    """Every worker's threads accept from one open file (the master's socket, inherited),
    and one that loses the race must get EAGAIN, not block in accept(). A second worker
    making its threads' descriptors must not clear O_NONBLOCK under the first."""
    from tftpd.config import Address, Config
    from tftpd.files import Root
    from tftpd.http import HttpThreads

    lst = listen_socket(Address(socket.AF_INET, "127.0.0.1", 0))  # blocking, as made
    first = HttpThreads(Config(), [lst], Root(str(root)), 2)
    first.start()
    try:
        deadline = time.monotonic() + 10
        while os.get_blocking(lst.fileno()) and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the threads' start, bounded by the deadline
        assert not os.get_blocking(lst.fileno())
        second = HttpThreads(Config(), [lst], Root(str(root)), 2)  # the next worker's
        assert not os.get_blocking(lst.fileno())
        for server in second.servers:
            for copy in server.listeners:
                copy.close()
    finally:
        first.stop()
        lst.close()


def test_a_connection_lost_at_accept_gives_its_count_back(root: Path, files: dict[str, bytes],
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Setting up an accepted socket can fail (the client is gone): the thread goes on,
    and the connection bound does not keep counting it."""
    import dataclasses

    from tftpd.config import Address, Config
    from tftpd.files import Root
    from tftpd.http import HttpThreads

    real = socket.socket.setsockopt

    def failing(self: socket.socket, level: int, name: int, *value: object) -> None:
        if name == socket.TCP_NODELAY:
            raise ConnectionResetError("reset by the test")
        real(self, level, name, *value)  # type: ignore[arg-type]

    lst = listen_socket(Address(socket.AF_INET, "127.0.0.1", 0))
    port = lst.getsockname()[1]
    cfg = dataclasses.replace(Config(), http_max_connections=1)
    service = HttpThreads(cfg, [lst], Root(str(root)), 1)
    monkeypatch.setattr(socket.socket, "setsockopt", failing)
    service.start()
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert closed_by_server(s, 5)
        monkeypatch.setattr(socket.socket, "setsockopt", real)
        assert get(port, "/hello.txt").body == files["hello.txt"]
    finally:
        service.stop()
        lst.close()


def test_log_bounds_are_the_workers_however_many_threads(root: Path,
                                                         files: dict[str, bytes]) -> None:
    """Malformed requests from one address write at most NOISE_PER_ADDRESS lines per
    interval from a worker, not that many from each of its HTTP threads."""
    from tftpd.http.server import NOISE_PER_ADDRESS

    d = start_daemon(root, "--workers", "1", "--http", "127.0.0.1:0", "--http-threads", "4")
    port = http_port(d)
    try:
        for _ in range(NOISE_PER_ADDRESS * 5 // 2):
            assert ask(port, b"NONSENSE\r\n\r\n").status == 400
        # Lines are written in the order they were made: once this record is out, every
        # line about the malformed requests before it is too.
        assert get(port, "/hello.txt").status == 200
        d.wait_for_log(r"file=hello\.txt protocol=http method=GET status=200")
        lines = [ln for ln in d.lines if "malformed request" in ln]
        assert len(lines) == NOISE_PER_ADDRESS, len(lines)
    finally:
        d.stop()


def test_a_dead_workers_connections_leave_the_gauge(root: Path,
                                                    files: dict[str, bytes]) -> None:
    """A worker killed with connections open cannot lower its own gauge: the master
    does, so the metrics do not report connections nobody holds."""
    import signal

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        mport = probe.getsockname()[1]
    d = start_daemon(root, "--workers", "1", "--http", "127.0.0.1:0",
                     "--metrics", f"127.0.0.1:{mport}")
    port = http_port(d)
    held: list[socket.socket] = []

    def http_connections(want: str) -> str:
        """The gauge, once it reads `want` or 10 s have passed."""
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                text = r.read().decode()
            m = re.search(r'tftpd_connections\{protocol="http"\} (\d+)', text)
            got = m.group(1) if m else "absent"
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.05)  # polls the metrics, bounded by the deadline

    try:
        (worker,) = d.wait_workers(1)
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(s)
            s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s).status == 200  # served, and kept open
        assert http_connections("3") == "3"
        os.kill(worker, signal.SIGKILL)
        d.wait_workers(1, exclude=frozenset({worker}))
        assert http_connections("0") == "0"
    finally:
        for s in held:
            s.close()
        d.stop()
