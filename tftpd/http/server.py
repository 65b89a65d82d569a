"""The HTTP server of one worker: a thread, its selector, its connections.

See tftpd/http/__init__.py for what it serves and the bounds it keeps.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h11

from tftpd import logs
from tftpd import packet as P
from tftpd import stats as S
from tftpd.content import HOOK_FAILED, HOOK_TIMED_OUT, ContentResolver, Resolution
from tftpd.files import FileCache, FileError, Root, sanitize
from tftpd.gz import GzCache
from tftpd.http.message import (
    ALLOW,
    IDLE,
    MAX_HEAD,
    READING,
    REASONS,
    SENDING,
    WAITING,
    BadRequest,
    Conn,
    decode_target,
    new_parser,
    prepare,
    prepare_file,
    raw_response,
)
from tftpd.worker.process import WakeupPipe
from tftpd.worker.records import (
    NOISE_PER_ADDRESS,
    NOISE_TOTAL,
    RECORDS_PER_ADDRESS,
    RECORDS_TOTAL,
)

log = logging.getLogger("tftpd")

RECV_SIZE = 65536
ACCEPT_BATCH = 64  # connections accepted per readiness of a listening socket
SENDFILE_MAX = 0x7FFFF000  # Linux's bound on one sendfile(2)
SWEEP_EVERY = 0.1  # s between checks of the connections' deadlines
STOP_WAIT = 2.0  # s the worker waits for the thread to stop listening or to end
# Log lines per worker and 10 s take TFTP's bounds (worker.records): records of served
# requests (the client completed a TCP handshake: its address is proven), and lines
# about malformed input.


def _peer(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _client(addr: tuple) -> tuple[str, int]:
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # IPv4-mapped: the rules and the logs see the IPv4 address
    return host, int(addr[1])


class HttpTally:
    """What the HTTP threads of one worker count together: their open connections, which
    http_max_connections bounds, the HTTP cells of the worker's stats row, and the log
    lines clients may cause. A cell is updated under the lock, since two threads' `+=`
    could lose one of the two."""

    def __init__(self, counters: memoryview | None, max_conns: int) -> None:
        self.counters = counters if counters is not None else \
            memoryview(bytearray(8 * len(S.FIELDS))).cast("Q")
        self.max_conns = max_conns
        self.conns = 0
        self.lock = threading.Lock()
        # The log lines a client can cause, bounded for the worker as a whole.
        self.records = logs.SharedThrottle("http records", RECORDS_PER_ADDRESS,
                                           RECORDS_TOTAL)
        self.noise = logs.SharedThrottle("http malformed input", NOISE_PER_ADDRESS,
                                         NOISE_TOTAL)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[S.INDEX[name]] += n

    def opened(self) -> bool:
        """Count a new connection; False, counting nothing, when the bound is reached."""
        with self.lock:
            if self.conns >= self.max_conns:
                return False
            self.conns += 1
            self.counters[S.INDEX["http_connections"]] = self.conns
            return True

    def closed(self) -> None:
        with self.lock:
            self.conns -= 1
            self.counters[S.INDEX["http_connections"]] = self.conns

    def ended(self, outcome: str, nbytes: int, duration: float) -> None:
        """A response's outcome, bytes and duration."""
        with self.lock:
            c = self.counters
            c[S.INDEX[f"http_{outcome}"]] += 1
            c[S.INDEX["http_bytes"]] += nbytes
            S.observe(c, "http_duration", duration)


class HttpThreads:
    """A worker's HTTP service: `count` HttpServers, each a thread with its own
    selector and connections, accepting from the same listening sockets. A body goes
    out by sendfile(2), which runs without the GIL, so two threads keep two copies in
    the kernel going at once (docs/design.md)."""

    def __init__(self, cfg: Any, socks: list[socket.socket], root: Root, count: int,
                 gz: GzCache | None = None, rules: Any = None,
                 counters: memoryview | None = None,
                 content: Callable[[], Any] | None = None) -> None:
        tally = HttpTally(counters, cfg.http_max_connections)
        # Each thread closes its own listening descriptors when it stops listening.
        self.servers = [HttpServer(cfg, [_listening_copy(s) for s in socks], root, gz, rules,
                                   tally, content=None if content is None else content())
                        for _ in range(count)]

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop_listening(self) -> None:
        for server in self.servers:
            server.stop_listening()

    @property
    def busy(self) -> bool:
        return any(server.busy for server in self.servers)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _listening_copy(sock: socket.socket) -> socket.socket:
    """A descriptor of its own for the same listening socket. Not socket.dup(): that
    sets the copy's timeout to the original's, and a blocking original would clear
    O_NONBLOCK on the one open file that every worker's threads accept from, so a
    thread whose accept() lost the race to another would block in it."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


class HttpServer:
    """One thread of a worker's HTTP service: its selector, its connections."""

    def __init__(self, cfg: Any, socks: list[socket.socket], root: Root,
                 gz: GzCache | None = None, rules: Any = None,
                 tally: HttpTally | None = None, content: Any = None) -> None:
        self.cfg = cfg
        self.listeners = list(socks)
        self.rules = rules  # tftpd.remap.Rules
        # Names to files: a tftpd.content.ContentResolver (content hook, per-client
        # roots) over a FileCache of this thread's own.
        self.content: Any = content if content is not None else \
            ContentResolver(FileCache(root, gz=gz))
        self._answered: collections.deque[Conn] = collections.deque()  # hook answers
        self._wake_sent = False  # a hook's answer woke the thread; not taken yet
        self.tally = tally if tally is not None else \
            HttpTally(None, cfg.http_max_connections)
        self.head_s = float(cfg.http_head_timeout)
        self.idle_s = float(cfg.http_idle_timeout)
        self.send_s = float(cfg.http_send_timeout)
        self.json_log = cfg.log_format == "json"
        self.records = self.tally.records
        self.noise = self.tally.noise
        self.conns: dict[int, Conn] = {}
        self.sel = selectors.DefaultSelector()
        self._wakeup = WakeupPipe()
        self._draining = False
        self._stopping = False
        self._stopped_listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged = False  # a line written since the last flush

    # -- the worker's side (its main thread) ----------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        """Accept no more connections (drain, reload); running ones are finished, idle
        keep-alive ones closed. Returns once the listening sockets are closed."""
        self._draining = True
        if self._thread is None or not self._thread.is_alive():
            for lst in self.listeners:
                lst.close()  # no thread to do it
            self.listeners = []
            return
        self._wakeup.wake()
        self._stopped_listening.wait(STOP_WAIT)

    @property
    def busy(self) -> bool:
        """Whether a response is being served (idle connections do not count)."""
        return any(c.phase != IDLE for c in list(self.conns.values()))

    def stop(self) -> None:
        """End now: connections are closed (a response cut short is logged)."""
        self._stopping = True
        self._wakeup.wake()
        if self._thread is not None:
            self._thread.join(STOP_WAIT)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        self.sel.register(self._wakeup.r, selectors.EVENT_READ, None)
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
                        self._wakeup.drain()
                        self._complete_answered()
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
            self.content.cache.close()

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
            if not self.tally.opened():
                self.tally.add("http_refused_busy")
                try:
                    sock.send(raw_response(503, "too many connections"))
                except OSError:
                    pass
                sock.close()
                if self.noise.allow(peer[0], time.monotonic()):
                    log.info("http: %s refused: %d connections", _peer(peer),
                             self.tally.max_conns)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # gone already: its count is given back
                sock.close()
                self.tally.closed()
                continue
            c = Conn(sock, peer, time.monotonic() + self.head_s)  # IDLE till a byte comes
            self.conns[c.fd] = c
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _sweep(self, now: float) -> None:
        for c in list(self.conns.values()):
            if now < c.deadline:
                continue
            if c.phase == SENDING:
                self._end(c, "failed", f"no progress in {self.send_s:.0f}s")
            elif c.phase == WAITING:
                c.status = 504
                self._end(c, "failed", "no answer from the content hook")
            elif c.phase == IDLE:
                self._close(c)
            else:
                self.tally.add("http_malformed")
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
            self._failed(c)

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
            c.read_whole = True
            self._respond(c)
            if c.phase != IDLE or c.fd not in self.conns:
                return  # the response waits for the socket, or the connection ended

    def _malformed(self, c: Conn, status: int, reason: str) -> None:
        self.tally.add("http_malformed")
        if self.noise.allow(c.peer[0], time.monotonic()):
            log.info("http: %s malformed request: %d %s", _peer(c.peer), status,
                     sanitize(reason, 200))
        c.out = memoryview(raw_response(status, sanitize(reason, 200)))
        c.close_after = True
        c.phase = SENDING
        c.status = 0  # no transfer record: nothing was asked for
        self._send(c)

    # -- requests --------------------------------------------------------------------

    def _on_request(self, c: Conn, req: h11.Request) -> bool:
        """Decide the response to a request whose head is complete; it is sent once
        the request's end has been read (_respond), or at once (True)."""
        c.started = time.monotonic()
        c.read_whole = False
        c.method = req.method.decode("ascii", "replace")
        c.name, c.span, c.detail, c.sent = sanitize(req.target, 200), "", "", 0
        c.remaining = 0
        self.tally.add("http_requests")
        # The head's bytes as h11 read them: "METHOD TARGET HTTP/V\r\n", "Name: value\r\n"
        # each, "\r\n" (whitespace around values and bare LFs aside). h11 bounds a head
        # that has not ended; this, one that came whole in a read.
        head = len(req.method) + len(req.target) + len(req.http_version) + 9 \
            + sum(len(k) + len(v) + 4 for k, v in req.headers) + 2
        if head > MAX_HEAD:
            self._refuse(c, BadRequest(431, "request head too large"), close=True)
            return True
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
        # Keep-alive as h11 would: HTTP/1.1 unless the client says close; not HTTP/1.0.
        if req.http_version != b"1.1" or "close" in headers.get("connection", "").lower():
            c.close_after = True
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
        c.headers = headers
        res = self._resolve(raw, c.peer)
        if not isinstance(res, Resolution) and hasattr(res, "future"):
            # The content hook answers in another thread; the connection waits, unread.
            c.pending = res
            c.phase = WAITING
            c.deadline = time.monotonic() + self.send_s  # the hook has its own, shorter
            self._watch(c, 0)
            res.future.add_done_callback(lambda _f, c=c: self._hook_answered(c))
            return False
        self._answer(c, res)
        return False

    def _hook_answered(self, c: Conn) -> None:
        """In the hook's thread (or at once in ours): only queue, and wake unless a
        wakeup is on its way (the thread takes every answer queued by then)."""
        self._answered.append(c)
        if not self._wake_sent:
            self._wake_sent = True
            self._wakeup.wake()

    def _complete_answered(self) -> None:
        # Cleared before the answers are taken: an answer queued after this point
        # either is taken below or sends a wakeup of its own.
        self._wake_sent = False
        while self._answered:
            c = self._answered.popleft()
            pending, c.pending = c.pending, None
            if self.conns.get(c.fd) is not c or pending is None:
                continue  # closed while it waited (its descriptor may be another's now)
            try:
                self._answer(c, self.content.complete(pending))
                if c.read_whole:  # else it is sent once the request's end is read
                    self._respond(c)
                    if c.phase == IDLE and c.fd in self.conns:
                        self._watch(c, selectors.EVENT_READ)
                        self._next_request(c)
            except Exception:  # noqa: BLE001 - one connection's failure ends it alone
                self._failed(c)

    def _failed(self, c: Conn) -> None:
        if self.noise.allow(c.peer[0], time.monotonic()):
            log.exception("http: %s: connection failed", _peer(c.peer))
        self._end(c, "failed", "server error")

    def _answer(self, c: Conn, res: Resolution) -> None:
        """The response to a resolved name, into c.out."""
        headers = c.headers
        if res.file is None:
            assert res.error is not None
            c.detail = res.error.reason or res.error.message
            if res.error.message in (HOOK_FAILED, HOOK_TIMED_OUT):
                self.tally.add("http_hook_failed" if res.error.message == HOOK_FAILED
                               else "http_hook_timed_out")
            prepare(c, res.http_status, [], body=f"{res.http_status} "
                          f"{REASONS.get(res.http_status, '')}\n".encode())
            return
        try:
            prepare_file(c, res.file, headers)
        except BadRequest as err:
            res.file.close()
            self._refuse(c, err, extra=[("Content-Range", f"bytes */{res.file.size}")])

    def _resolve(self, raw_name: bytes, client: tuple[str, int]) -> Any:
        """The file a name asks for, by the rules TFTP names follow: the map file first,
        then the content resolver (confinement to the root, `--gz`; a content hook, whose
        answer comes later: a PendingContent)."""
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
        prepare(c, err.status, extra or [],
                      body=f"{err.status} {REASONS.get(err.status, '')}: {err.reason}\n"
                      .encode())

    def _respond(self, c: Conn) -> None:
        if c.pending is not None:
            return  # sent once the content hook has answered (_complete_answered)
        c.phase = SENDING
        self._send(c)

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
        if c.close_after or self._draining or c.h.their_state is not h11.DONE:
            self._close(c)  # asked to, or the request was not read to its end
            return
        # h11 reads the requests; the responses are ours (message.prepare): the next
        # request is read by a parser of its own, from what the last one left.
        data, closed = c.h.trailing_data
        c.h = new_parser()
        if data:
            c.h.receive_data(data)
        if closed:
            c.h.receive_data(b"")
        c.phase = IDLE
        c.deadline = time.monotonic() + self.idle_s
        self._watch(c, selectors.EVENT_READ)

    def _watch(self, c: Conn, events: int) -> None:
        """Wait for `events` on the connection (0: none, while the hook answers)."""
        if c.events == events:
            return
        if not events:
            self.sel.unregister(c.sock)
        elif not c.events:
            self.sel.register(c.sock, events, c)
        else:
            self.sel.modify(c.sock, events, c)
        c.events = events

    def _end(self, c: Conn, outcome: str, detail: str) -> None:
        """A response cut short."""
        if c.phase in (SENDING, WAITING) and c.status:
            self._record(c, outcome, detail)
        self._close(c)

    def _close(self, c: Conn) -> None:
        if self.conns.pop(c.fd, None) is None:
            return
        c.pending = None
        if c.events:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()
        if c.file is not None:
            c.file.close()
            c.file = None
        self.tally.closed()

    def _record(self, c: Conn, outcome: str, detail: str) -> None:
        """Counters and one log line per response, in the form of TFTP's records."""
        if c.file is not None:
            c.file.close()
            c.file = None
        if not c.status:
            return
        now = time.monotonic()
        duration = now - c.started
        self.tally.ended(outcome, c.sent, duration)
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
