"""HTTP/1.1 on the TFTP root: GET and HEAD, served by every worker from a thread of its own.

Firmware that speaks HTTP (UEFI HTTP boot, iPXE) fetches kernels and images a hundred
times faster over TCP than over lock-step TFTP. The workers serve both from one root
under one set of rules: a name goes through the map file, then the confined root
(normalize(), symlinks, `--gz`), exactly as a TFTP filename does.

Each worker runs one HttpServer in a thread with its own selector: the TFTP loop is
not touched by a slow TCP client, and neither waits for the other. The master binds the
listening sockets (before privileges are dropped); every worker accepts from them,
non-blocking (a worker that loses the race gets EAGAIN). h11 parses; bodies go out
with sendfile(2) from the descriptors FileCache shares, without a copy.

Every connection is hostile until it has been served: the head must arrive within
http_head_timeout and fit in MAX_HEAD bytes, an idle keep-alive connection is closed
after http_idle_timeout, a response that makes no progress for http_send_timeout is
cut, and past http_max_connections a new connection gets 503 and is closed. The log
lines a client can cause go through logs.Throttle.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import h11

from tftpd import __version__, logs
from tftpd import packet as P
from tftpd import stats as S
from tftpd.files import FileCache, FileError, OpenFile, Root, sanitize
from tftpd.gz import GzCache

log = logging.getLogger("tftpd")

MAX_HEAD = 8192  # bytes: a request head beyond this is answered 431
RECV_SIZE = 65536
ACCEPT_BATCH = 64  # connections accepted per readiness of a listening socket
SENDFILE_MAX = 0x7FFFF000  # Linux's bound on one sendfile(2)
SWEEP_EVERY = 0.1  # s between checks of the connections' deadlines
STOP_WAIT = 2.0  # s the worker waits for the thread to stop listening or to end
SERVER = f"tftpd/{__version__}"
ALLOW = "GET, HEAD"
# Log lines per client address and 10 s (logs.Throttle), as for TFTP: records of
# served requests (the client completed a TCP handshake: its address is proven), and
# lines about malformed input.
RECORDS_PER_ADDRESS = 200
NOISE_PER_ADDRESS, NOISE_TOTAL = 100, 1000
REASONS = {200: "OK", 206: "Partial Content", 304: "Not Modified", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
# TFTP error code of a refused name -> HTTP status.
_STATUS_OF = {P.E_NOT_FOUND: 404, P.E_ACCESS: 403}
_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")  # a '%' not followed by two hex digits
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BadRequest(Exception):
    """A request that cannot be served as asked: its status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- names to files -------------------------------------------------------------------


@dataclass(slots=True)
class Resolution:
    """Exactly one of file and error is set (as tftpd.content.Resolution)."""

    file: OpenFile | None
    error: FileError | None
    http_status: int


class RootContent:
    """Names to files from the confined root: FileCache's normalize(), confinement,
    symlink checks and `--gz`. The interface of tftpd.content.ContentResolver
    (begin/complete; this one never defers), so that a content hook or per-client
    roots replace it without touching the server. One per thread: FileCache is not
    thread-safe."""

    per_client = False

    def __init__(self, cache: FileCache) -> None:
        self.cache = cache

    def begin(self, filename: bytes, mode: str, client: tuple[str, int], protocol: str,
              options: dict[str, str]) -> Resolution:
        try:
            return Resolution(self.cache.open(filename, mode), None, 200)
        except FileError as err:
            return Resolution(None, err, _STATUS_OF.get(err.code, 500))

    def complete(self, pending: object) -> Resolution:
        raise TypeError("RootContent resolves at once; nothing is pending")

    def close(self) -> None:
        self.cache.close()


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


def _mtime(f: OpenFile) -> int:
    """Seconds since the epoch the file (a derived file's source) was last changed."""
    if len(f.ident) > 3:
        return int(f.ident[3] // 1_000_000_000)
    return int(os.fstat(f.fd).st_mtime)


def _not_modified(since: str, mtime: int) -> bool:
    try:
        when = email.utils.parsedate_to_datetime(since)
    except (TypeError, ValueError, IndexError):
        return False  # an invalid date is ignored (RFC 9110 13.1.3)
    if when.tzinfo is None:
        return False
    return mtime <= when.timestamp()


def raw_response(status: int, reason: str) -> bytes:
    """A complete error response, with no connection state behind it; it says close."""
    body = f"{status} {REASONS.get(status, '')}: {reason}\n".encode()
    extra = f"Allow: {ALLOW}\r\n" if status == 405 else ""
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nDate: {http_date(time.time())}"
            f"\r\nServer: {SERVER}\r\nContent-Type: text/plain\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _peer(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _client(addr: tuple) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # IPv4-mapped: the rules and the logs see the IPv4 address
    return host, int(addr[1])


class _Span:
    """The length of a body sent with sendfile, for h11's framing (its Data.data)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


# -- connections ----------------------------------------------------------------------

READING, SENDING, IDLE = 0, 1, 2


class Conn:
    __slots__ = ("sock", "fd", "peer", "h", "phase", "deadline", "out", "file", "offset",
                 "remaining", "sent", "started", "name", "method", "status", "span",
                 "detail", "close_after", "events")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
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


class HttpServer:
    """One worker's HTTP service: a thread, its selector, its connections."""

    def __init__(self, cfg: Any, socks: list[socket.socket], root: Root,
                 gz: GzCache | None = None, rules: Any = None,
                 counters: memoryview | None = None) -> None:
        self.cfg = cfg
        self.listeners = list(socks)
        self.rules = rules  # tftpd.remap.Rules
        self.content = RootContent(FileCache(root, gz=gz))
        self.counters = counters if counters is not None else \
            memoryview(bytearray(8 * len(S.FIELDS))).cast("Q")
        self.max_conns = cfg.http_max_connections
        self.head_s = float(cfg.http_head_timeout)
        self.idle_s = float(cfg.http_idle_timeout)
        self.send_s = float(cfg.http_send_timeout)
        self.json_log = cfg.log_format == "json"
        self.records = logs.Throttle("http records", RECORDS_PER_ADDRESS)
        self.noise = logs.Throttle("http malformed input", NOISE_PER_ADDRESS, NOISE_TOTAL)
        self.conns: dict[int, Conn] = {}
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._draining = False
        self._stopping = False
        self._stopped_listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._date = (0, "")
        self._logged = False  # a line written since the last flush

    # -- the worker's side (its main thread) ----------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        """Accept no more connections (drain, reload); running ones are finished, idle
        keep-alive ones closed. Returns once the listening sockets are closed."""
        self._draining = True
        self._wake()
        self._stopped_listening.wait(STOP_WAIT)

    @property
    def busy(self) -> bool:
        """Whether a response is being served (idle connections do not count)."""
        return any(c.phase != IDLE for c in list(self.conns.values()))

    def stop(self) -> None:
        """End now: connections are closed (a response cut short is logged)."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        for lst in self.listeners:
            lst.setblocking(False)
            self.sel.register(lst, selectors.EVENT_READ, lst)
        next_sweep = 0.0
        try:
            while not self._stopping:
                if self._draining and self.listeners:
                    self._close_listeners()
                for key, mask in self.sel.select(SWEEP_EVERY):
                    what = key.data
                    if what is None:
                        self._drain_wakeup()
                    elif isinstance(what, Conn):
                        self._on_event(what, mask)
                    else:
                        self._accept(what)
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_EVERY
                    self._sweep(now)
                    self.records.roll(now)
                    self.noise.roll(now)
                    if self._logged:
                        self._logged = False
                        logs.flush_logs()  # the worker's loop flushes too, when it turns
        except Exception:  # noqa: BLE001 - the TFTP side goes on; say why HTTP stopped
            log.exception("http: the server thread failed")
        finally:
            for c in list(self.conns.values()):
                self._end(c, "failed", "server shutting down")
            self._close_listeners()
            self.content.close()

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _close_listeners(self) -> None:
        for lst in self.listeners:
            try:
                self.sel.unregister(lst)
            except (KeyError, ValueError):
                pass
            lst.close()  # this worker's copy; the master keeps its own
        self.listeners = []
        for c in list(self.conns.values()):
            if c.phase == IDLE:
                self._close(c)
            else:
                c.close_after = True
        self._stopped_listening.set()

    def _accept(self, lst: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lst.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it
            except OSError as err:  # EMFILE, ECONNABORTED: the next one may do
                if self.noise.allow("", time.monotonic()):
                    log.warning("http: accept failed: %s", err.strerror)
                return
            sock.setblocking(False)
            peer = _client(addr)
            if len(self.conns) >= self.max_conns:
                self.counters[S.INDEX["http_refused_busy"]] += 1
                try:
                    sock.send(raw_response(503, "too many connections"))
                except OSError:
                    pass
                sock.close()
                if self.noise.allow(peer[0], time.monotonic()):
                    log.info("http: %s refused: %d connections", _peer(peer), len(self.conns))
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(sock, peer, time.monotonic() + self.head_s)  # IDLE till a byte comes
            self.conns[c.fd] = c
            self.sel.register(sock, selectors.EVENT_READ, c)
            self.counters[S.INDEX["http_connections"]] = len(self.conns)

    def _sweep(self, now: float) -> None:
        for c in list(self.conns.values()):
            if now < c.deadline:
                continue
            if c.phase == SENDING:
                self._end(c, "failed", f"no progress in {self.send_s:.0f}s")
            elif c.phase == IDLE:
                self._close(c)
            else:
                self.counters[S.INDEX["http_malformed"]] += 1
                if self.noise.allow(c.peer[0], now):
                    log.info("http: %s closed: no complete request in %.0fs", _peer(c.peer),
                             self.head_s)
                self._close(c)

    def _on_event(self, c: Conn, mask: int) -> None:
        try:
            if c.phase == SENDING:
                self._send(c)
                if c.phase == IDLE and c.fd in self.conns:
                    self._next_request(c)  # a pipelined request may be buffered already
                return
            try:
                data = c.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(c)  # the client is gone; an unfinished head is not a transfer
                return
            self._reading(c)
            c.h.receive_data(data)
            self._next_request(c)
        except Exception:  # noqa: BLE001 - one connection's failure ends it alone
            if self.noise.allow(c.peer[0], time.monotonic()):
                log.exception("http: %s: connection failed", _peer(c.peer))
            self._end(c, "failed", "server error")

    def _reading(self, c: Conn) -> None:
        if c.phase == IDLE:
            # A request begins: its head has head_s to arrive (from the accept, for
            # the first request of a connection).
            c.phase = READING
            c.deadline = min(c.deadline, time.monotonic() + self.head_s)

    def _next_request(self, c: Conn) -> None:
        """Read what h11 has buffered; respond to each request that is whole, in turn
        (pipelined requests), until one waits for the socket or for more bytes."""
        while True:
            try:
                ev = c.h.next_event()
            except h11.RemoteProtocolError as err:
                self._malformed(c, err.error_status_hint, str(err) or "malformed request")
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                if c.h.their_state is h11.MUST_CLOSE and c.phase == IDLE:
                    self._close(c)
                elif c.h.trailing_data[0]:
                    self._reading(c)  # part of the next request is here
                return
            if isinstance(ev, h11.Request):
                self._reading(c)
                if not self._on_request(c, ev):
                    continue  # its end (EndOfMessage) is next
            elif isinstance(ev, h11.ConnectionClosed):
                self._close(c)
                return
            elif not isinstance(ev, h11.EndOfMessage):
                continue
            self._respond(c)
            if c.phase != IDLE or c.fd not in self.conns:
                return  # the response waits for the socket, or the connection ended

    def _malformed(self, c: Conn, status: int, reason: str) -> None:
        self.counters[S.INDEX["http_malformed"]] += 1
        if self.noise.allow(c.peer[0], time.monotonic()):
            log.info("http: %s malformed request: %d %s", _peer(c.peer), status,
                     sanitize(reason, 200))
        c.out = memoryview(raw_response(status, reason))
        c.close_after = True
        c.phase = SENDING
        c.status = 0  # no transfer record: nothing was asked for
        self._send(c)

    # -- requests --------------------------------------------------------------------

    def _on_request(self, c: Conn, req: h11.Request) -> bool:
        """Decide the response to a request whose head is complete; it is sent once
        the request's end has been read (_respond), or at once (True)."""
        c.started = time.monotonic()
        c.method = req.method.decode("ascii", "replace")
        c.name, c.span, c.detail, c.sent = sanitize(req.target, 200), "", "", 0
        c.remaining = 0
        self.counters[S.INDEX["http_requests"]] += 1
        if len(req.target) + sum(len(k) + len(v) + 4 for k, v in req.headers) > MAX_HEAD:
            # h11 bounds a head that has not ended; this, one that came whole.
            self._refuse(c, BadRequest(431, "request head too large"), close=True)
            return True
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            # RFC 9110 9.3.1: content in a GET has no meaning; it is a smuggling vector.
            self._refuse(c, BadRequest(400, "a request body is not accepted"), close=True)
            return True
        if req.method not in (b"GET", b"HEAD"):
            self._refuse(c, BadRequest(405, "method not allowed"))
            return False
        try:
            raw = decode_target(req.target)
        except BadRequest as err:
            self._refuse(c, err)
            return False
        c.name = sanitize(raw, 200)
        res = self._resolve(raw, c.peer)
        if res.file is None:
            assert res.error is not None
            c.detail = res.error.reason or res.error.message
            self._prepare(c, res.http_status, [], body=f"{res.http_status} "
                          f"{REASONS.get(res.http_status, '')}\n".encode())
            return False
        try:
            self._prepare_file(c, res.file, headers)
        except BadRequest as err:
            res.file.close()
            self._refuse(c, err, extra=[("Content-Range", f"bytes */{res.file.size}")])
        return False

    def _resolve(self, raw_name: bytes, client: tuple[str, int]) -> Resolution:
        """The file a name asks for, by the rules TFTP names follow: the map file first,
        then the content resolver (confinement to the root, `--gz`)."""
        name = raw_name
        if self.rules is not None:
            mapped = self.rules.apply(os.fsdecode(raw_name), client[0], False)
            if mapped is None:
                return Resolution(None, FileError(P.E_ACCESS, "Access violation",
                                                  "refused by a map rule"), 403)
            name = os.fsencode(mapped)
        return self.content.begin(name, "octet", client, "http", {})

    def _refuse(self, c: Conn, err: BadRequest, close: bool = False,
                extra: list[tuple[str, str]] | None = None) -> None:
        c.detail = err.reason
        if err.status == 405:
            extra = [("Allow", ALLOW)]
        c.close_after = c.close_after or close
        self._prepare(c, err.status, extra or [],
                      body=f"{err.status} {REASONS.get(err.status, '')}: {err.reason}\n"
                      .encode())

    def _prepare_file(self, c: Conn, f: OpenFile, headers: dict[str, str]) -> None:
        mtime = _mtime(f)
        last_modified = http_date(mtime)
        common = [("Last-Modified", last_modified), ("Accept-Ranges", "bytes")]
        since = headers.get("if-modified-since")
        if since is not None and "if-none-match" not in headers \
                and _not_modified(since, mtime):
            f.close()
            self._prepare(c, 304, common)
            return
        first, last = 0, f.size - 1
        status = 200
        wanted = headers.get("range")
        if wanted is not None and headers.get("if-range", last_modified) == last_modified:
            span = parse_range(wanted, f.size)
            if span is not None:
                first, last = span
                status = 206
                c.span = f"{first}-{last}"
                common.append(("Content-Range", f"bytes {first}-{last}/{f.size}"))
        c.file, c.offset, c.remaining = f, first, max(0, last - first + 1)
        self._prepare(c, status, common, length=c.remaining)

    def _prepare(self, c: Conn, status: int, extra: list[tuple[str, str]],
                 body: bytes = b"", length: int | None = None) -> None:
        """The head (and a small body) of a response into c.out, through h11."""
        c.status = status
        size = len(body) if length is None else length
        headers = [("Date", self._now_date()), ("Server", SERVER), *extra]
        if status != 304:
            headers += [("Content-Type", "application/octet-stream" if length is not None
                         else "text/plain"), ("Content-Length", str(size))]
        if c.close_after:
            headers.append(("Connection", "close"))
        h = c.h
        out = h.send(h11.Response(status_code=status, headers=headers,
                                  reason=REASONS.get(status, "")))
        assert out is not None
        if c.method == "HEAD" or status == 304:
            c.remaining = 0  # a head alone
        elif length is None and body:
            out += h.send(h11.Data(data=body)) or b""
        elif length:
            h.send_with_data_passthrough(h11.Data(data=_Span(length)))  # sendfile's part
        out += h.send(h11.EndOfMessage()) or b""
        c.out = memoryview(out)

    def _respond(self, c: Conn) -> None:
        c.phase = SENDING
        self._send(c)

    def _now_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, http_date(now))
        return self._date[1]

    # -- sending ---------------------------------------------------------------------

    def _send(self, c: Conn) -> None:
        """Send what the socket takes now; wait for write readiness for the rest."""
        progress = False
        try:
            while c.out:
                n = c.sock.send(c.out, socket.MSG_MORE if c.remaining else 0)
                c.out = c.out[n:]
                progress = True
            while c.remaining:
                assert c.file is not None
                n = os.sendfile(c.fd, c.file.fd, c.offset, min(c.remaining, SENDFILE_MAX))
                if n == 0:
                    self._end(c, "failed", "file shrank while being sent")
                    return
                c.offset += n
                c.remaining -= n
                c.sent += n
                progress = True
        except (BlockingIOError, InterruptedError):
            if progress or c.events != selectors.EVENT_WRITE:
                c.deadline = time.monotonic() + self.send_s
            self._watch(c, selectors.EVENT_WRITE)
            return
        except OSError as err:
            self._end(c, "aborted", f"client gone: {err.strerror}")
            return
        self._done(c)

    def _done(self, c: Conn) -> None:
        """The response is out: log it, then wait for the next request or close."""
        self._record(c, "ok" if c.status < 400 else _outcome(c.status), c.detail)
        if c.close_after or c.h.our_state is not h11.DONE or self._draining:
            self._close(c)
            return
        if c.h.their_state is not h11.DONE:
            self._close(c)
            return
        c.h.start_next_cycle()
        c.phase = IDLE
        c.deadline = time.monotonic() + self.idle_s
        self._watch(c, selectors.EVENT_READ)

    def _watch(self, c: Conn, events: int) -> None:
        if c.events != events:
            c.events = events
            self.sel.modify(c.sock, events, c)

    def _end(self, c: Conn, outcome: str, detail: str) -> None:
        """A response cut short."""
        if c.phase == SENDING and c.status:
            self._record(c, outcome, detail)
        self._close(c)

    def _close(self, c: Conn) -> None:
        if self.conns.pop(c.fd, None) is None:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        if c.file is not None:
            c.file.close()
            c.file = None
        self.counters[S.INDEX["http_connections"]] = len(self.conns)

    def _record(self, c: Conn, outcome: str, detail: str) -> None:
        """Counters and one log line per response, in the form of TFTP's records."""
        if c.file is not None:
            c.file.close()
            c.file = None
        if not c.status:
            return
        now = time.monotonic()
        duration = now - c.started
        counters = self.counters
        counters[S.INDEX[f"http_{outcome}"]] += 1
        counters[S.INDEX["http_bytes"]] += c.sent
        S.observe(counters, "http_duration", duration)
        status, c.status = c.status, 0
        if not self.records.allow(c.peer[0], now):
            return
        reason = f" reason={sanitize(detail, 200)}" if detail else ""
        span = f" range={c.span}" if c.span else ""
        text = (f"{_peer(c.peer)} file={c.name} protocol=http method={sanitize(c.method, 20)}"
                f" status={status}{span} bytes={c.sent} duration={duration:.3f}s "
                f"outcome={outcome}{reason}")
        self._logged = True
        if not self.json_log:
            logs.info_line(text)
            return
        extra = {"transfer": {
            "client": c.peer[0], "port": c.peer[1], "file": c.name, "protocol": "http",
            "op": sanitize(c.method, 20), "status": status, "range": c.span or None,
            "bytes": c.sent, "duration_s": round(duration, 6), "outcome": outcome,
            "reason": sanitize(detail, 200)}}
        log.info("%s", text, extra=extra)


def _outcome(status: int) -> str:
    return "notfound" if status == 404 else "denied" if status == 403 else "failed"


def listen_socket(addr: Any) -> socket.socket:
    """A listening TCP socket for --http (tftpd.config.Address), shared by all workers."""
    sock = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
