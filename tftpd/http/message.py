"""HTTP messages: what a request asks for, and the response to it (through h11).

Pure functions of a request's bytes and a file (tftpd.http.server does the I/O), and the
state of one connection.
"""

from __future__ import annotations

import datetime
import email.utils
import os
import re
import selectors
import socket
import time
from typing import Any

import h11

from tftpd import __version__
from tftpd.files import OpenFile

MAX_HEAD = 8192  # bytes: a request head beyond this is answered 431
SERVER = f"tftpd/{__version__}"
ALLOW = "GET, HEAD"
REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           504: "Gateway Timeout"}
_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")  # a '%' not followed by two hex digits
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BadRequest(Exception):
    """A request that cannot be served as asked: its status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def decode_target(target: bytes) -> bytes:
    """The name a request target asks for: the path without query, percent-decoded
    once, without its leading '/'. BadRequest for what is not a path."""
    if target.startswith((b"http://", b"https://")):  # absolute-form (RFC 9112 3.2.2)
        slash = target.find(b"/", target.index(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        raise BadRequest(400, "request target is not a path")
    if _ESCAPE.search(path):
        raise BadRequest(400, "bad percent-encoding")
    parts = path.split(b"%")
    raw = parts[0] + b"".join(bytes([int(p[:2], 16)]) + p[2:] for p in parts[1:])
    if b"\x00" in raw:
        raise BadRequest(400, "NUL in path")
    return raw[1:]


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """The one byte range [first, last] asked for, or None to serve the whole file.

    Several ranges are answered with the whole file (RFC 9110 14.2: a server MAY
    ignore Range), as is a value that is not a byte range. BadRequest(416) when the
    one range asked for is not satisfiable."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise BadRequest(416, "range not satisfiable")
        return max(0, size - n), size - 1
    lo = int(first)
    if last and int(last) < lo:
        return None  # invalid: ignored
    if lo >= size:
        raise BadRequest(416, "range not satisfiable")
    return lo, min(int(last), size - 1) if last else size - 1


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def mtime_of(f: OpenFile) -> int:
    """Seconds since the epoch the file (a derived file's source) was last changed."""
    if len(f.ident) > 3:
        return int(f.ident[3] // 1_000_000_000)
    return int(os.fstat(f.fd).st_mtime)


# asctime's form, the one HTTP date without a zone (it is GMT): Sun Nov  6 08:49:37 1994
_ASCTIME = re.compile(r"[A-Za-z]{3} [A-Za-z]{3} [ \d]\d \d\d:\d\d:\d\d \d{4}")


def http_time(value: str) -> float | None:
    """Seconds since the epoch of an HTTP date in any of RFC 9110's three forms (IMF,
    RFC 850, asctime), or None for anything else, a date in an unknown zone included."""
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # no zone, -0000 or a name email.utils does not know
            if not _ASCTIME.fullmatch(value.strip()):
                return None
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def not_modified(since: str, mtime: int) -> bool:
    when = http_time(since)  # an invalid date is ignored (RFC 9110 13.1.3)
    return when is not None and mtime <= when


def range_applies(if_range: str | None, mtime: int) -> bool:
    """Whether a Range holds under If-Range: no If-Range, or the file's own date (an
    entity tag never matches: no ETag is sent)."""
    return if_range is None or http_time(if_range) == mtime


def raw_response(status: int, reason: str) -> bytes:
    """A complete error response, with no connection state behind it; it says close."""
    body = f"{status} {REASONS.get(status, '')}: {reason}\n".encode()
    extra = f"Allow: {ALLOW}\r\n" if status == 405 else ""
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nDate: {http_date(time.time())}"
            f"\r\nServer: {SERVER}\r\nContent-Type: text/plain\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


# A connection waits for the bytes of a request (READING), for the content resolver's
# deferred answer (WAITING: a content hook), for the socket (SENDING), or for the next
# request (IDLE: no byte of it yet).
READING, SENDING, IDLE, WAITING = 0, 1, 2, 3


class Conn:
    __slots__ = ("sock", "fd", "peer", "h", "phase", "deadline", "out", "file", "offset",
                 "remaining", "sent", "started", "name", "method", "status", "span",
                 "detail", "close_after", "events", "pending", "headers", "read_whole")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.h = new_parser()
        self.phase = IDLE
        self.deadline = deadline
        self.out = memoryview(b"")
        self.file: OpenFile | None = None
        self.offset = 0
        self.remaining = 0
        self.sent = 0  # body bytes of this response sent
        self.started = 0.0
        self.name = ""
        self.method = ""
        self.status = 0
        self.span = ""  # "first-last" of a 206
        self.detail = ""
        self.close_after = False  # close once this response is out
        self.events = selectors.EVENT_READ
        self.pending: Any = None  # the resolver's PendingContent while WAITING
        self.read_whole = False  # the current request's end has been read
        self.headers: dict[str, str] = {}  # of the request being answered


_date = (0, "")


def date_now() -> str:
    """The Date header's value, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, http_date(now))
    return _date[1]


def prepare_file(c: Conn, f: OpenFile, headers: dict[str, str]) -> None:
    """The response that serves `f` (200, 206 or 304) into c.out; BadRequest(416)."""
    mtime = mtime_of(f)
    last_modified = http_date(mtime)
    common = [("Last-Modified", last_modified), ("Accept-Ranges", "bytes")]
    since = headers.get("if-modified-since")
    if since is not None and "if-none-match" not in headers \
            and not_modified(since, mtime):
        f.close()
        prepare(c, 304, common)
        return
    first, last = 0, f.size - 1
    status = 200
    wanted = headers.get("range")
    if wanted is not None and range_applies(headers.get("if-range"), mtime):
        span = parse_range(wanted, f.size)
        if span is not None:
            first, last = span
            status = 206
            c.span = f"{first}-{last}"
            common.append(("Content-Range", f"bytes {first}-{last}/{f.size}"))
    c.file, c.offset, c.remaining = f, first, max(0, last - first + 1)
    prepare(c, status, common, length=c.remaining)


def prepare(c: Conn, status: int, extra: list[tuple[str, str]], body: bytes = b"",
            length: int | None = None) -> None:
    """The head (and a small body) of a response into c.out. Made here, not by h11:
    its checks cost as much as the rest of a request, and every value here is ours
    (a client's bytes never reach a header)."""
    c.status = status
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", f"Date: {date_now()}",
             f"Server: {SERVER}", *(f"{k}: {v}" for k, v in extra)]
    if status != 304:
        lines += ["Content-Type: application/octet-stream" if length is not None
                  else "Content-Type: text/plain",
                  f"Content-Length: {len(body) if length is None else length}"]
    if c.close_after:
        lines.append("Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if c.method == "HEAD" or status == 304:
        c.remaining = 0  # a head alone
    elif length is None:
        out += body
    c.out = memoryview(out)


def new_parser() -> h11.Connection:
    """h11 reading one request of a connection (a new one for each request)."""
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
