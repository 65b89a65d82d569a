"""One worker: an event loop over the listen sockets it was handed and its transfers.

The only place in tftpd that waits. Each loop turn serves, in this order, the listen
sockets (a PXE ROM gives its RRQ one to four seconds; a running transfer tolerates a
short wait), then the transfer sockets, then the timers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from tftpd import logs
from tftpd import packet as P
from tftpd import stats as S
from tftpd.config import Config
from tftpd.datapath import (
    EV_DONE,
    EV_PACKET,
    EV_PROBE,
    EV_READY,
    EV_REARM,
    IP_PKTINFO,
    IPV6_RECVPKTINFO,
    REQ_ANSWERED,
    REQ_BATCH,
    REQ_MERGED,
    REQ_STARTED,
    SO_TIMESTAMPNS,
    DataPath,
    FileShrank,
    Pump,
    Refusal,
    Refusals,
    encode_sockaddr,
    pktinfo_cmsg,
)
from tftpd.files import FileCache, FileError, OpenFile, Root, Upload, open_upload, sanitize
from tftpd.gz import GzCache
from tftpd.options import OptionRefused, Policy, negotiate
from tftpd.transfer import (
    Commit,
    Finish,
    ReadTransfer,
    Send,
    SendBlocks,
    SendTo,
    Write,
    WriteTransfer,
)

log = logging.getLogger("tftpd")

LISTEN_BATCH = 256  # requests read per turn before transfers get their share
TRANSFER_BATCH = 16  # datagrams read from one transfer socket per turn
IDLE_WAIT = 0.5  # s; the longest the loop sleeps with nothing scheduled (and beats)
EXIT_BOOT_FAILED = 3  # the master does not respawn a worker that exits with this
BUSY_LOG_INTERVAL = 10.0  # s between "server full" reports
# Log lines that input from the network causes, per worker and 10 s (logs.Throttle):
# - from requests and datagrams that proved nothing (refusals, misses, malformed or
#   stray datagrams, foreign TIDs, transfers never answered): anyone can send them,
#   from any address, so per address and in all;
NOISE_PER_ADDRESS, NOISE_TOTAL = 100, 1000
# - records of transfers whose client answered from its address (a round trip to a
#   port no one could guess): per address only, for a storm's thousands of real
#   clients are each entitled to their lines.
RECORDS_PER_ADDRESS = 200
MEMO_SIZE = 4096  # remembered parses and negotiations
# New sockets kept ready, per local address, for the transfers C starts (each bound to a
# random port, each used once): C starts no more than this many between two turns.
SPARE_SOCKETS = 32
# How long C may answer a request with the OACK Python negotiated for it (while the
# file keeps its identity, checked on every use): as long as Python itself trusts a
# cached MTU, the one other input of that OACK (MtuCache.REFRESH).
START_TTL = 10.0  # s



MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                  signal.SIGHUP, signal.SIGUSR1}


def _die_with_parent() -> None:
    """A worker whose master is killed (SIGKILL, OOM) drains and exits too, instead of
    serving on as an orphan nobody supervises."""
    try:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except AttributeError:
        return
    if os.getppid() == 1:  # the master died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def wants_pktinfo(sock: socket.socket) -> bool:
    """A wildcard-bound socket must learn each request's destination address."""
    host = sock.getsockname()[0]
    return host in ("0.0.0.0", "::")


# Everything a worker may load later is loaded now, at import: after chroot (-s)
# neither modules nor shared libraries can be found. dlopen(NULL) needs no file.
_LIBC = ctypes.CDLL(None, use_errno=True)
_SYS_NET: list[int] = []  # a descriptor of /sys/class/net, opened before any chroot


def open_sysfs() -> None:
    """Keep /sys/class/net reachable after chroot (the master calls this first)."""
    if not _SYS_NET:
        try:
            _SYS_NET.append(os.open("/sys/class/net", os.O_RDONLY | os.O_DIRECTORY
                                    | os.O_CLOEXEC))
        except OSError:
            pass


class MtuCache:
    """Interface MTUs by index, from /sys/class/net (the kernel's own figure, as
    netlink reports it; pyroute2 would cost each worker ~20 MB and 0.25 s to load).
    Re-read every REFRESH seconds, so a changed MTU is noticed."""

    REFRESH = 10.0

    def __init__(self) -> None:
        self._known: dict[int, tuple[float, int | None]] = {}

    def get(self, ifindex: int, now: float) -> int | None:
        hit = self._known.get(ifindex)
        if hit is not None and hit[0] > now:
            return hit[1]
        mtu: int | None = None
        try:
            name = socket.if_indextoname(ifindex)
            if _SYS_NET:
                fd = os.open(f"{name}/mtu", os.O_RDONLY | os.O_CLOEXEC, dir_fd=_SYS_NET[0])
                try:
                    mtu = int(os.read(fd, 32))
                finally:
                    os.close(fd)
            else:
                with open(f"/sys/class/net/{name}/mtu", "rb") as f:
                    mtu = int(f.read())
        except (OSError, ValueError):
            mtu = None
        self._known[ifindex] = (now + self.REFRESH, mtu)
        return mtu


def blksize_for_mtu(mtu: int | None, family: int) -> int | None:
    """The largest blksize whose DATA datagram fits one packet (IP + UDP + 4)."""
    if mtu is None:
        return None
    overhead = 48 if family == socket.AF_INET6 else 28
    return mtu - overhead - 4


def enable_pktinfo(sock: socket.socket) -> None:
    """Each request's destination, interface and kernel arrival time."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    # The arrival time measures how long a request waited in the socket buffer: the
    # first-answer time a PXE ROM sees, not only our own part of it.
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    pktinfo: bool
    host: str  # the bound address (wildcard or not)
    shared: bool = False  # every worker reads it: requests go on to their owner
    index: int = 0  # position among the worker's listeners (same in every worker)
    family: int = 0  # sock.family, read once (the property builds an enum each time)

    def __post_init__(self) -> None:
        self.family = int(self.sock.family)


_FWD = struct.Struct("!BBHId")  # listener, family, port, ifindex, arrival (realtime)


class Forward:
    """Hands requests read from a shared listen socket to the worker that owns them.

    Without SO_REUSEPORT (inetd, systemd without ReusePort=yes) every worker reads
    the same socket, and a client's repeated RRQ could reach a worker other than the
    one serving it. The owner is a hash of the client's address and port, so every
    copy of a request meets in one worker, where a live transfer merges it.
    """

    def __init__(self, index: int, reader: socket.socket, writers: list[socket.socket]) -> None:
        self.index = index
        self.reader = reader
        self.reader.setblocking(False)
        self.writers = writers

    def owner(self, src: tuple) -> int:
        key = f"{src[0]}|{src[1]}".encode()
        return zlib.crc32(key) % len(self.writers)

    def send(self, owner: int, lst: Listener, data: bytes, src: tuple, local: str,
             ifindex: int, arrival: float) -> bool:
        fam = lst.family
        head = _FWD.pack(lst.index, fam, src[1], ifindex, arrival)
        msg = head + socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, local) + data
        try:
            self.writers[owner].send(msg)
            return True
        except OSError:
            return False  # the owner's queue is full (or it is being replaced)

    def receive(self) -> tuple[int, bytes, tuple, str, int, float] | None:
        try:
            msg = self.reader.recv(P.MAX_DATAGRAM + 64)
        except (BlockingIOError, InterruptedError):
            return None
        li, fam, port, ifindex, arrival = _FWD.unpack_from(msg)
        n = 16 if fam == socket.AF_INET6 else 4
        off = _FWD.size
        src_ip = socket.inet_ntop(fam, msg[off:off + n])
        local = socket.inet_ntop(fam, msg[off + n:off + 2 * n])
        src = (src_ip, port, 0, 0) if fam == socket.AF_INET6 else (src_ip, port)
        return li, msg[off + 2 * n:], src, local, ifindex, arrival


@dataclass(slots=True, eq=False)
class Session:
    """A live transfer and the I/O the worker holds for it."""

    transfer: ReadTransfer | WriteTransfer
    sock: socket.socket
    file: OpenFile | None  # a read's file
    peer: tuple
    sockaddr: bytes
    request: bytes  # the RRQ datagram, to merge a repeated one
    name: str  # sanitised, for the log
    mode: str
    started: float
    slot: int = -1  # the transfer's slot in C's pump, -1 on the Python path
    asked: dict = field(default_factory=dict)  # the client's options, for the JSON log
    granted: dict = field(default_factory=dict)
    upload: Upload | None = None  # a write's file
    heap_deadline: float = field(default=float("inf"))
    local: str | None = None  # the address `sock` is bound to, to reuse it


@dataclass(slots=True, frozen=True)
class Start:
    """What the log and an adoption need of a transfer C starts (an OACK entry)."""

    filename: bytes  # to open the file when Python takes the transfer over
    name: str
    mode: str
    asked: dict
    granted: dict
    local: str  # the address its sockets are bound to


class Worker:
    def __init__(self, cfg: Config, listeners: list[Listener], root: Root,
                 datapath: DataPath, counters: memoryview | None = None,
                 gz: GzCache | None = None, forward: Forward | None = None,
                 rules: object | None = None) -> None:
        self.cfg = cfg
        self.counters = counters if counters is not None else \
            memoryview(bytearray(8 * len(S.FIELDS))).cast("Q")
        # Each worker serves its share of the total (SO_REUSEPORT spreads clients).
        self.max_sessions = max(1, -(-cfg.max_transfers // max(1, cfg.workers)))
        self.per_client: dict[str, int] = {}
        self.busy_refusals = 0
        self.busy_logged_at = 0.0
        self.noise = logs.Throttle("unproven input", NOISE_PER_ADDRESS, NOISE_TOTAL)
        self.records = logs.Throttle("transfer records", RECORDS_PER_ADDRESS)
        self._asked: dict[str, str] = {}
        self._hits_reported = 0
        self._misses_reported = 0
        self.mtu = MtuCache()
        self.forward = forward
        self.rules: Any = rules  # tftpd.remap.Rules
        self.http: Any = None  # tftpd.http.HttpServer (--http), set by the master
        self.json_log = cfg.log_format == "json"
        self.listeners = listeners
        self.root = root
        self.files = FileCache(root, gz=gz)
        self.datapath = datapath
        self.policy = Policy(max_blksize=cfg.max_blksize, max_windowsize=cfg.max_windowsize,
                             max_window_bytes=cfg.max_window_bytes,
                             refused=frozenset(cfg.refuse), max_upload=cfg.max_upload)
        self.sel = selectors.DefaultSelector()
        self.sessions: dict[tuple, Session] = {}  # by peer address
        self.timers: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self.draining = False
        self.drain_deadline = 0.0
        self.stop_now = False
        self._error_socks: dict[int, socket.socket] = {}
        self._wake_r = -1
        self.pump: Pump | None = None
        self.by_slot: dict[int, Session] = {}
        self._tokens: dict[int, object] = {}  # the pump's token -> what is ready
        # Pure functions of a request's bytes, remembered: parse and the log name, and
        # the negotiation (by options, file size and MTU). Bounded; cleared when full.
        self._parsed: dict[bytes, tuple[P.Request, str]] = {}
        self._negotiated: dict[tuple, Any] = {}
        # Listen sockets that had requests left last turn: read again this turn, token
        # or not (epoll puts a level-triggered socket it has reported at the back of
        # its ready list, behind every transfer socket with an ACK waiting).
        self._backlog: list[Listener] = []
        self._c_due = float("inf")  # the earliest OACK timer of a transfer C started
        self._uploads = 0  # live uploads: not in C's peer table, so C starts nothing
        self._pending: dict[Session, tuple] = {}  # this turn's pump events, by session
        # The local addresses transfers are served from (packed: (family, text)),
        # each kept SPARE_SOCKETS new sockets for C to start transfers from.
        self._locals: dict[bytes, tuple[int, str]] = {}
        self._spares_used = False  # since they were last topped up
        # Known misses, answered by the data path. Only where the answer depends on
        # the request's bytes alone: no map rules (they see the client's address), no
        # per-client limit, no per-request log line (-v).
        self.refusals: Refusals | None = None
        if rules is None and not cfg.max_per_client and cfg.verbose < 1:
            self.refusals = Refusals(datapath)

    # -- setup in the child (nothing process-wide happens before fork) --------------

    def init_process(self) -> None:
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGQUIT, self._on_quit)
        # Ctrl-C reaches the whole process group; the master decides what it means.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The master blocked these around fork(); now that the handlers above are in
        # place, a TERM that arrived in between is delivered to them, not lost.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        _die_with_parent()
        if os.environ.get("TFTPD_PUMP", "1") != "0":
            # With the C data path the worker waits in C: the pump answers ACKs in
            # its epoll set until one of Python's descriptors (tokens) is ready,
            # an ACK needs a decision, or the next timer is due.
            self.pump = self.datapath.pump(self.max_sessions)
        for i, lst in enumerate(self.listeners):
            lst.index = i
            lst.sock.setblocking(False)
        if self.pump is None:
            self.sel.register(self._wake_r, selectors.EVENT_READ, None)
            for lst in self.listeners:
                self.sel.register(lst.sock, selectors.EVENT_READ, lst)
            if self.forward is not None:
                self.sel.register(self.forward.reader, selectors.EVENT_READ, self.forward)
        else:
            # Uploads keep their sockets in the selector, which is a token itself.
            watch: list[tuple[int, object]] = [(self._wake_r, None),
                                               (self.sel.fileno(), self.sel)]
            watch += [(lst.sock.fileno(), lst) for lst in self.listeners]
            if self.forward is not None:
                watch.append((self.forward.reader.fileno(), self.forward))
            for fd, what in watch:
                self._tokens[self.pump.add_token(fd)] = what
        self.counters[S.INDEX["listening"]] = 1
        logs.start_batching()
        if self.http is not None:
            self.http.start()

    def _on_term(self, signum: int, frame: object) -> None:
        # Only flags here: the loop does the work (no logging in a handler).
        self.draining = True

    def _on_quit(self, signum: int, frame: object) -> None:
        self.stop_now = True

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        self.init_process()
        drain_started = False
        while True:
            self.counters[S.BEAT] = time.monotonic_ns()  # alive: master.HUNG_AFTER
            if self.stop_now:
                return 0
            if self.draining and not drain_started:
                drain_started = True
                self._stop_listening()
                self._adopt_all()
                if self.sessions:
                    log.info("draining: %d transfer(s) to finish", len(self.sessions))
                self.drain_deadline = time.monotonic() + self.cfg.drain_s
            if drain_started and ((not self.sessions and not (self.http and self.http.busy))
                                  or time.monotonic() >= self.drain_deadline):
                for s in list(self.sessions.values()):
                    self._finish(s, Finish("failed", "server shutting down"), time.monotonic())
                if self.http is not None:
                    self.http.stop()
                return 0
            wait = IDLE_WAIT
            if self.timers:
                wait = max(0.0, min(wait, self.timers[0][0] - time.monotonic()))
            if self.pump is not None and self.pump.live:
                wait = max(0.0, min(wait, self._c_due - time.monotonic()))
            if self.pump is not None:
                self._turn_in_c(wait)
            else:
                self._turn(self.sel.select(wait))
            now = time.monotonic()
            self._run_timers(now)
            self.noise.roll(now)  # what the throttles held back, said once a while
            self.records.roll(now)
            logs.flush_logs()  # this turn's records, in one write

    def _turn(self, events: list) -> None:
        """Serve the ready descriptors of the selector."""
        # Listen sockets first, then transfers: new requests beat running ones.
        transfers = []
        for key, _ in events:
            if isinstance(key.data, Listener):
                self._read_requests(key.data)
            elif isinstance(key.data, Forward):
                self._read_forwarded()
            elif isinstance(key.data, Session):
                transfers.append(key.data)
            else:
                self._drain_wakeup()
        for session in transfers:
            self._read_transfer(session)

    def _turn_in_c(self, wait: float) -> None:
        """Wait in C's pump: ACKs are answered there until something is Python's.

        While requests are still queued (the first second of a storm), the next turn
        does not wait, and reads them whether or not C reports the socket ready again:
        the transfers get one pass (up to 256 sockets) per batch of requests read, so
        no RRQ waits behind a thousand ACKs and a flood of requests cannot starve the
        transfers it starts either.
        """
        assert self.pump is not None
        if self._backlog:
            wait = 0.0
        events = self.pump.run(time.monotonic(), wait)
        # C's events name slots, and a request read below can end a transfer (its
        # client moved on) and its slot go to a new one: they are tied to their
        # sessions now, and acted on after the requests (new requests first).
        ready = []
        for ev in events:
            if ev[1] == EV_READY:
                ready.append(self._tokens.get(ev[0]))
            elif ev[1] == EV_PROBE:
                self._probe_done(*ev)  # C ended it: nothing of it is left in C
            elif (session := self.by_slot.get(ev[0])) is not None:
                self._pending[session] = ev  # one event per slot per call
            elif self.pump.is_started(ev[0]):
                # C started it and cannot judge this datagram (ACK 0, a foreign TID).
                session = self._adopt(ev[0], time.monotonic())
                if session is not None:
                    self._pending[session] = ev
        backlog: list[Listener] = []
        for what in ready:
            if isinstance(what, Listener):
                if what not in self._backlog and self._read_requests(what):
                    backlog.append(what)
            elif isinstance(what, Forward):
                self._read_forwarded()
            elif what is None:
                self._drain_wakeup()
        for lst in self._backlog:
            if lst in self.listeners and self._read_requests(lst):
                backlog.append(lst)
        self._backlog = backlog
        self._pump_events()
        if self.sel in ready:
            self._turn(self.sel.select(0))

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _stop_listening(self) -> None:
        # With SO_REUSEPORT a socket that stays open keeps receiving its share of
        # requests; a draining worker closes its copy (the master closes its own).
        # The master shares the socket, so closing ours would not take it out of an
        # epoll set: it is taken out first.
        if self.pump is not None:
            for token, what in list(self._tokens.items()):
                if isinstance(what, Listener):
                    self.pump.remove_token(what.sock.fileno(), token)
                elif isinstance(what, Forward):
                    self.pump.remove_token(what.reader.fileno(), token)
                else:
                    continue
                del self._tokens[token]
        for lst in self.listeners:
            if self.pump is None:
                self.sel.unregister(lst.sock)
            lst.sock.close()
        self.listeners = []
        if self.http is not None:
            self.http.stop_listening()
        # Forwarded requests stop too: the owner of a hash may be a new worker now.
        if self.forward is not None and self.pump is None:
            self.sel.unregister(self.forward.reader)
        self.counters[S.INDEX["listening"]] = 0  # the master waits for this on reload

    # -- requests --------------------------------------------------------------------

    def _read_requests(self, lst: Listener) -> bool:
        """Serve up to LISTEN_BATCH requests; True when more are waiting."""
        fwd = self.forward if lst.shared else None
        got = 0
        while got < LISTEN_BATCH:
            # Known misses are answered by the data path itself (C: without Python),
            # unless this worker is full: then every request hears "busy".
            refusals = self.refusals if fwd is None \
                and len(self.sessions) < self.max_sessions else None
            # C may start transfers itself (an OACK it has the answer for) while
            # there is room, from spares bound to the address the client asked.
            starts = None
            if refusals is not None and self.pump is not None and not self._uploads:
                if self._spares_used:
                    self._fill_spares()
                room = self.max_sessions - len(self.sessions) - self.pump.live
                self.pump.offer(room)
                if room > 0:
                    starts = self.pump
            try:
                # IP_PKTINFO on every listener: the destination address (for a wildcard
                # bind) and the arrival interface, whose MTU caps the blksize.
                batch = self.datapath.requests(lst.sock, self._error_socket(lst), lst.pktinfo,
                                               refusals, time.monotonic(),
                                               min(REQ_BATCH, LISTEN_BATCH - got), starts)
            except OSError as err:
                log.warning("listen socket: %s", err)
                return False
            for kind, refusal, err, data, src, dst, ifindex, arrival, answered in batch:
                if kind == REQ_STARTED:
                    self._spares_used = True
                    self._started(refusal, err, arrival, answered)
                    continue
                if kind == REQ_MERGED:
                    self.counters[S.INDEX["requests"]] += 1
                    self.counters[S.INDEX["merged"]] += 1
                    continue
                if kind == REQ_ANSWERED:
                    assert refusal is not None
                    self._answered(refusal, err, src, arrival, answered)
                    continue
                local = dst if lst.pktinfo and dst else lst.host
                if fwd is not None:
                    owner = fwd.owner(src)
                    if owner != fwd.index:
                        if fwd.send(owner, lst, data, src, local, ifindex, arrival):
                            self.counters[S.INDEX["forwarded"]] += 1
                            continue
                        # The owner cannot take it: serving it here beats dropping it.
                self._serve_request(data, src, local, lst, ifindex, arrival)
            got += len(batch)
            if len(batch) < REQ_BATCH:
                return False
        return True

    def _supersede(self, live: Session, now: float) -> None:
        """Same address and port, a different request: the client moved on. What it
        sent the old transfer before (its last ACK, often) counts first, so only a
        transfer it left unfinished ends as aborted."""
        event = self._pending.pop(live, None)
        if event is not None:  # C has read it already
            self._pump_event(live, event, now)
        self._read_transfer(live)
        if self.sessions.get(live.peer) is live:
            self._finish(live, Finish("aborted", "superseded by a new request"), now)

    def _answered(self, refusal: Refusal, err: int, src: tuple, arrival: float,
                  answered: float) -> None:
        """A known miss the data path answered: the books and the log line."""
        c = self.counters
        c[S.INDEX["requests"]] += 1
        c[S.INDEX["notfound"]] += 1
        c[S.INDEX["miss_cache_hits"]] += 1
        now = time.monotonic()
        live = self._live(src)
        if live is not None:  # the client moved on (as _on_request has it)
            self._supersede(live, now)
        if err:
            if self.noise.allow(src[0], now):
                log.warning("error reply to %s: %s", _peer(src), os.strerror(err))
        elif arrival:
            S.observe(c, "first_answer", max(0.0, answered - arrival))
        if not self.noise.allow(src[0], now):
            return
        name, mode, code, reason, options = refusal.note
        if not self.json_log:
            logs.info_line(f"{_peer(src)} file={name} mode={mode} outcome=notfound "
                           f"error={code} reason={reason}")
            return
        extra = {"transfer": {"client": src[0], "port": src[1], "file": name, "mode": mode,
                              "options": _clean(options), "outcome": "notfound",
                              "error": code, "reason": reason}}
        log.info("%s file=%s mode=%s outcome=%s error=%d reason=%s", _peer(src), name, mode,
                 "notfound", code, reason, extra=extra)

    def _read_forwarded(self) -> None:
        assert self.forward is not None
        for _ in range(LISTEN_BATCH):
            got = self.forward.receive()
            if got is None:
                return
            li, data, src, local, ifindex, arrival = got
            if li < len(self.listeners):
                self._serve_request(data, src, local, self.listeners[li], ifindex, arrival)

    def _serve_request(self, data: bytes, src: tuple, local: str, lst: Listener,
                       ifindex: int, arrival: float) -> None:
        answered = False
        try:
            answered = self._on_request(data, src, local, lst, ifindex)
        except Exception:  # one bad request must never take the worker down
            log.exception("request from %s failed", sanitize(str(src[:2])))
        if answered and arrival:
            # Whatever the answer was (OACK, DATA, ERROR, or a merge), it has gone.
            S.observe(self.counters, "first_answer", max(0.0, time.time() - arrival))

    def _on_request(self, data: bytes, src: tuple, local: str, lst: Listener,
                    ifindex: int = 0) -> bool:  # noqa: C901 - the order of checks is the rule
        now = time.monotonic()
        c = self.counters
        memo = self._parsed.get(data)
        if memo is not None:
            req, name = memo  # the same datagram again: a storm asks the same names
        else:
            try:
                parsed = P.parse(data)
            except P.PacketError as err:
                c[S.INDEX["malformed"]] += 1
                if self.noise.allow(src[0], now):
                    log.info("dropped malformed packet from %s: %s", _peer(src), err)
                return False
            if not isinstance(parsed, P.Request):
                if self.cfg.verbose >= 3 and self.noise.allow(src[0], now):
                    log.debug("ignored %s on the listen port from %s", type(parsed).__name__,
                              _peer(src))
                return False
            req, name = parsed, sanitize(parsed.filename)
            if len(self._parsed) >= MEMO_SIZE:
                self._parsed.clear()
            self._parsed[data] = (req, name)
        c[S.INDEX["requests"]] += 1
        if self.rules is not None:
            # Remapping comes first; confinement to the root judges its result.
            mapped = self.rules.apply(os.fsdecode(req.filename), src[0], req.is_write)
            if mapped is None:
                self._asked = req.options
                self._refuse(lst, src, local, P.E_ACCESS, "Access violation", "denied",
                             sanitize(req.filename), req.mode, now, "refused by a map rule")
                return True
            req = dataclasses.replace(req, filename=os.fsencode(mapped))
            name = sanitize(req.filename)
        self._asked = req.options  # for the log record of a refusal
        live = self._live(src)
        if live is not None:
            if live.request == data:
                # A repeated RRQ (legacy ROMs send it twice, 10 us apart; a Raspberry
                # Pi three times): the transfer already answers it.
                c[S.INDEX["merged"]] += 1
                if self.cfg.verbose >= 1 and self.noise.allow(src[0], now):
                    log.info("merged repeated request from %s for %s", _peer(src), name)
                if isinstance(live.transfer, ReadTransfer):
                    self._apply(live, live.transfer.on_repeat(now), now)
                return False
            self._supersede(live, now)
        if self.cfg.verbose >= 1 and self.noise.allow(src[0], now):
            log.info("request %s %s %s from %s %s", "WRQ" if req.is_write else "RRQ", name,
                     req.mode, _peer(src), _opts(req.options))
        if req.is_write and not self.cfg.create:
            self._refuse(lst, src, local, P.E_ACCESS, "Uploads are disabled",
                         "denied", name, req.mode, now)
            return True
        if req.mode not in ("octet", "netascii"):
            self._refuse(lst, src, local, P.E_ILLEGAL_OP, f"Mode not supported: {req.mode}"
                         if req.mode == "mail" else "Unknown mode", "denied", name,
                         sanitize(req.mode), now)
            return True
        if self._full(src, now):
            self._refuse(lst, src, local, P.E_UNDEFINED, "Server busy, try again later",
                         "busy", name, req.mode, now)
            return True
        if req.is_write:
            self._on_write(req, data, src, local, lst, ifindex, name, now)
            return True
        try:
            f = self.files.open(req.filename, req.mode)
        except FileError as err:
            outcome = "notfound" if err.code == P.E_NOT_FOUND else "denied"
            self._refuse(lst, src, local, err.code, err.message, outcome, name, req.mode, now,
                         err.reason)
            miss = self.files.last_miss
            if miss is not None and self.refusals is not None and not lst.shared:
                # While the negative cache holds the name, this very request is
                # answered without Python (the answer depends on nothing else).
                expires, directory, ident = miss
                self.refusals.put(data, P.encode_error(err.code, err.message), expires,
                                  directory, ident, (name, req.mode, err.code,
                                                     "No such file (cached)", req.options))
            return True
        try:
            mtu_blk = blksize_for_mtu(self.mtu.get(ifindex, now), lst.family) \
                if ifindex else None
            key = (data, f.size, mtu_blk)
            memo = self._negotiated.get(key)
            if memo is None:
                neg = negotiate(req.options, self.policy, size=f.size, mtu_blksize=mtu_blk)
                if len(self._negotiated) >= MEMO_SIZE:
                    self._negotiated.clear()
                memo = self._negotiated[key] = (neg, P.encode_oack(neg.oack)
                                                if neg.oack else None)
            neg, oack_packet = memo
            sock = self._transfer_socket(lst.family, local)
        except OSError as err:
            f.close()
            self._refuse(lst, src, local, P.E_UNDEFINED, "Server busy", "failed", name,
                         req.mode, now, f"no transfer socket: {err}")
            return True
        except Exception:
            f.close()
            raise
        rto = neg.timeout if neg.timeout is not None else self.cfg.retransmit_us / 1e6
        slot, state = self.pump.new_state() if self.pump is not None else (-1, None)
        t = ReadTransfer(src, f.size, blksize=neg.blksize, windowsize=neg.windowsize,
                         oack=neg.oack or None, timeout=rto,
                         client_timeout=neg.timeout is not None, retries=self.cfg.retries,
                         rollover=self.cfg.rollover, state=state, oack_packet=oack_packet)
        session = Session(t, sock, f, src, encode_sockaddr(src), data, name, req.mode, now,
                          slot, req.options, dict(neg.oack), local=local)
        self.sessions[src] = session
        self.per_client[src[0]] = self.per_client.get(src[0], 0) + 1
        self.counters[S.INDEX["active"]] = len(self.sessions)
        if self.pump is not None:
            self.by_slot[slot] = session
            self.pump.watch(slot, sock, session.sockaddr, f.fd, f.image)
            if oack_packet is not None and self.refusals is not None and not lst.shared \
                    and ifindex and req.mode == "octet" and not f.derived:
                # The next identical request gets this OACK from C, with no Python.
                self._remember_start(data, req, name, f, state, oack_packet, ifindex,
                                     local, dict(neg.oack), now)
        else:
            self.sel.register(sock, selectors.EVENT_READ, session)
        self._apply(session, t.start(now), now)
        return True

    def _remember_start(self, data: bytes, req: P.Request, name: str, f: OpenFile,
                        state: Any, oack_packet: bytes, ifindex: int, local: str,
                        granted: dict, now: float) -> None:
        assert self.refusals is not None and self.pump is not None
        known = self.refusals.current(data)
        dstlen = 16 if ":" in local else 4  # the family of the address asked
        if known is not None and known.xfer is not None and known.ident == f.ident \
                and known.ifindex == ifindex and known.dstlen == dstlen \
                and known.expires > now + START_TTL / 2:
            return  # C had no spare or slot for it: the entry stands
        path = self.files.path_of(req.filename)
        if path is None:
            return
        xfer = self.pump.template(state)
        self.refusals.put(data, oack_packet, now + START_TTL, path, f.ident,
                          Start(req.filename, name, req.mode, req.options, granted, local),
                          ifindex=ifindex, dstlen=dstlen, xfer=xfer)

    def _on_write(self, req: P.Request, data: bytes, src: tuple, local: str, lst: Listener,
                  ifindex: int, name: str, now: float) -> None:
        if req.mode != "octet":
            # netascii uploads would need converting back; no boot tool sends them.
            self._refuse(lst, src, local, P.E_ILLEGAL_OP, "Uploads are octet only",
                         "denied", name, req.mode, now)
            return
        try:
            mtu_blk = blksize_for_mtu(self.mtu.get(ifindex, now), lst.family) \
                if ifindex else None
            neg = negotiate(req.options, self.policy, is_write=True, mtu_blksize=mtu_blk)
        except OptionRefused as err:
            self._refuse(lst, src, local, P.E_DISK_FULL, "Upload exceeds the size limit",
                         "denied", name, req.mode, now, str(err))
            return
        try:
            upload = open_upload(self.root, req.filename, create=self.cfg.create,
                                 permissive=self.cfg.permissive, umask=self.cfg.umask)
        except FileError as err:
            outcome = "notfound" if err.code == P.E_NOT_FOUND else "denied"
            self._refuse(lst, src, local, err.code, err.message, outcome, name, req.mode, now,
                         err.reason)
            return
        try:
            sock = self._transfer_socket(lst.family, local)
        except OSError as err:
            upload.discard()
            self._refuse(lst, src, local, P.E_UNDEFINED, "Server busy", "failed", name,
                         req.mode, now, f"no transfer socket: {err}")
            return
        rto = neg.timeout if neg.timeout is not None else self.cfg.retransmit_us / 1e6
        t = WriteTransfer(src, blksize=neg.blksize, windowsize=neg.windowsize,
                          oack=neg.oack or None, timeout=rto,
                          client_timeout=neg.timeout is not None, retries=self.cfg.retries,
                          max_size=self.cfg.max_upload, rollover=self.cfg.rollover)
        session = Session(t, sock, None, src, b"", data, name, req.mode, now,
                          asked=req.options, granted=dict(neg.oack), upload=upload)
        self.sessions[src] = session
        self._uploads += 1
        self.per_client[src[0]] = self.per_client.get(src[0], 0) + 1
        self.counters[S.INDEX["active"]] = len(self.sessions)
        self.sel.register(sock, selectors.EVENT_READ, session)  # writes stay in Python
        self._apply(session, t.start(now), now)

    def _transfer_socket(self, family: int, local: str) -> socket.socket:
        """A socket for one transfer, on a port of its own that no one could guess:
        a new socket bound to a random port (the kernel's choice, or ours within
        --port-range), closed when the transfer ends. A port is never handed on to
        the next client: one who learned it could spoof that client's ACKs."""
        if self.pump is not None:  # C starts transfers from the same spares
            packed = socket.inet_pton(family, local)
            if packed not in self._locals and len(self._locals) < 64:
                self._locals[packed] = (family, local)
            self._spares_used = True
            sock = self.pump.take_spare(packed)
            if sock is not None:
                return sock
        return self._new_socket(family, local)

    def _new_socket(self, family: int, local: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            if self.cfg.port_range is None:
                sock.bind((local, 0))
            else:
                self._bind_in_range(sock, local)
        except BaseException:
            sock.close()
            raise
        return sock

    def _fill_spares(self) -> None:
        """Top up the spare sockets of each local address for the transfers C may
        start before the next turn."""
        assert self.pump is not None
        self._spares_used = False
        have = self.pump.spare_counts()
        for packed, (family, local) in self._locals.items():
            for _ in range(SPARE_SOCKETS - have.get(packed, 0)):
                if not self.pump.spare_room():
                    return
                try:
                    sock = self._new_socket(family, local)
                except OSError as err:  # out of descriptors or ports: serve without
                    if self.noise.allow("", time.monotonic()):
                        log.warning("spare socket: %s", err)
                    return
                self.pump.put_spare(sock, packed)

    def _bind_in_range(self, sock: socket.socket, local: str) -> None:
        assert self.cfg.port_range is not None
        lo, hi = self.cfg.port_range
        span = hi - lo + 1
        start = int.from_bytes(os.urandom(2), "big") % span
        for i in range(span):
            try:
                sock.bind((local, lo + (start + i) % span))
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
        raise OSError(errno.EADDRINUSE, "no free port in --port-range")

    def _error_socket(self, lst: Listener) -> socket.socket:
        """One socket per listener for answers that start no transfer.

        Errors still come from a port other than the listen port (a new TID, as
        RFC 1350 has it) without a socket per refusal: misses in a storm stay cheap.
        """
        key = id(lst)
        sock = self._error_socks.get(key)
        if sock is None:
            sock = socket.socket(lst.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC)
            sock.bind((lst.host, 0))
            self._error_socks[key] = sock
        return sock

    def _refuse(self, lst: Listener, src: tuple, local: str, code: int, message: str,
                outcome: str, name: str, mode: str, now: float, reason: str = "") -> None:
        pkt = P.encode_error(code, message)
        sock = self._error_socket(lst)
        try:
            if lst.pktinfo:
                # Answer from the address the request was sent to (multi-homed hosts).
                sock.sendmsg([pkt], [pktinfo_cmsg(lst.family, local)], 0, src)
            else:
                sock.sendto(pkt, src)
        except OSError as err:
            if self.noise.allow(src[0], now):
                log.warning("error reply to %s: %s", _peer(src), err)
        if outcome == "busy":
            # A flood of refusals is counted, and logged once per interval.
            self.counters[S.INDEX["refused_busy"]] += 1
            self.busy_refusals += 1
            if now - self.busy_logged_at >= BUSY_LOG_INTERVAL:
                log.warning("server full (%d transfers in this worker): refused %d "
                            "request(s) since the last report", len(self.sessions),
                            self.busy_refusals)
                self.busy_refusals = 0
                self.busy_logged_at = now
            return
        self.counters[S.OUTCOME.get(outcome, S.INDEX["failed"])] += 1
        if not self.noise.allow(src[0], now):
            return
        if not self.json_log:
            logs.info_line(f"{_peer(src)} file={name} mode={mode} outcome={outcome} "
                           f"error={code} reason={reason or message}")
            return
        extra = {"transfer": {"client": src[0], "port": src[1], "file": name, "mode": mode,
                              "options": _clean(self._asked), "outcome": outcome,
                              "error": code, "reason": reason or message}}
        log.info("%s file=%s mode=%s outcome=%s error=%d reason=%s", _peer(src), name, mode,
                 outcome, code, reason or message, extra=extra)

    def _full(self, src: tuple, now: float) -> bool:
        if len(self.sessions) >= self.max_sessions:
            return True
        limit = self.cfg.max_per_client
        return bool(limit) and self.per_client.get(src[0], 0) >= limit

    # -- transfers C starts ----------------------------------------------------------

    def _started(self, entry: Refusal | None, err: int, arrival: float,
                 answered: float) -> None:
        """C sent an OACK it had the answer for and owns the transfer: the books."""
        c = self.counters
        c[S.INDEX["requests"]] += 1
        c[S.INDEX["c_starts"]] += 1
        # Its timer: the entry's RTO, or at once (the scan then finds when) if the
        # entry is gone from the table already.
        due = time.monotonic() + (entry.xfer.rto if entry is not None else 0.0)
        if due < self._c_due:
            self._c_due = due
        if err:
            log.warning("OACK: %s (the timer resends it)", os.strerror(err))
        elif arrival:
            S.observe(c, "first_answer", max(0.0, answered - arrival))

    def _probe_done(self, slot: int, kind: int, code: int, back: int, peer: tuple) -> None:
        """C ended a transfer it started on ERROR 0, 8 or 9: an existence probe."""
        assert self.pump is not None and self.refusals is not None
        x = self.pump.state(slot)
        now = time.monotonic()
        entry = self.refusals.get(x.answer)
        duration = now - x.sent_at
        blksize, window, retransmits = x.blksize, x.windowsize, x.retransmits
        self.pump.ended(slot, back)  # closes its socket, takes back what C did not
        c = self.counters
        c[S.INDEX["probe"]] += 1
        S.observe(c, "duration", duration)
        if entry is None:  # cannot be: retired entries outlive their transfers
            log.warning("%s ended a probe C started (error %d)", _peer(peer), code)
            return
        note: Start = entry.note
        self._log_end(peer, note.name, note.mode, 0, blksize, window, duration,
                      retransmits, "probe", "", note.asked, note.granted, "RRQ", True)

    def _live(self, src: tuple) -> Session | None:
        """The transfer serving this peer: Python's, or one C started (taken over)."""
        live = self.sessions.get(src)
        if live is None and self.pump is not None and self.pump.live:
            slot = self.pump.find(encode_sockaddr(src))
            if slot >= 0 and self.pump.is_started(slot):
                live = self._adopt(slot, time.monotonic())
        return live

    def _adopt_all(self) -> None:
        while self.pump is not None and self.pump.live:
            slots, _ = self.pump.overdue(float("inf"))
            if not slots:
                break
            for slot in slots:
                self._adopt(slot, time.monotonic())

    def _adopt(self, slot: int, now: float) -> Session | None:
        """Python takes over a transfer C started (a datagram C cannot judge, its
        timer, a new request from its peer). It goes on as if Python had started it;
        None if it could not (then it has ended, with an ERROR to the client)."""
        assert self.pump is not None and self.refusals is not None
        x, sock = self.pump.adopt(slot)
        entry = self.refusals.get(x.answer)
        peer = self.pump.peer(slot)
        if sock is None or entry is None:  # cannot be: the pool and entries outlive it
            log.error("%s: lost the state of a transfer C started", _peer(peer))
            self.pump.release(slot)
            if sock is not None:
                sock.close()
            return None
        note: Start = entry.note
        started, armed = x.sent_at, x.armed_at
        try:
            f: OpenFile | None = self.files.open(note.filename, note.mode)
        except (FileError, OSError):  # gone or unreadable since: ended below
            f = None
        if f is not None and f.ident != entry.ident:
            f.close()
            f = None
        t = ReadTransfer(peer, x.filesize, blksize=x.blksize, windowsize=x.windowsize,
                         oack=note.granted, timeout=x.base_rto,
                         client_timeout=bool(x.fixed_rto), retries=self.cfg.retries,
                         rollover=x.rollover, state=x, oack_packet=entry.reply)
        x.sent_at, x.armed_at = started, armed
        if f is not None:
            self.pump.set_file(slot, f.fd, f.image)
        else:
            x.fd = -1
        session = Session(t, sock, f, peer, encode_sockaddr(peer), entry.request, note.name,
                          note.mode, started, slot, note.asked, dict(note.granted),
                          local=note.local)
        self.sessions[peer] = session
        self.per_client[peer[0]] = self.per_client.get(peer[0], 0) + 1
        self.counters[S.INDEX["active"]] = len(self.sessions)
        self.by_slot[slot] = session
        if f is None:
            # Replaced or gone since the OACK told its size: never serve a mix.
            self._abort(session, P.E_UNDEFINED, "File changed during transfer",
                        "file changed after the OACK", now)
            return None
        self._apply(session, [], now)  # arms its timer
        return session

    # -- transfers -------------------------------------------------------------------

    def _read_transfer(self, session: Session) -> None:
        for _ in range(TRANSFER_BATCH):
            if self.sessions.get(session.peer) is not session:
                return  # finished: its socket may be a spare now
            try:
                data, src = session.sock.recvfrom(P.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # ICMP port unreachable surfaces here: the client has gone away.
                now = time.monotonic()
                self._finish(session, Finish("failed", f"socket error: {err.strerror}"), now)
                return
            now = time.monotonic()
            if self.cfg.verbose >= 3 and self.noise.allow(src[0], now):
                log.debug("recv %d bytes from %s for %s", len(data), _peer(src), session.name)
            self._apply(session, session.transfer.on_datagram(data, src, now), now)

    def _pump_events(self) -> None:
        """Act on what C's pump handed back (self._pending, by session)."""
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        for session, event in pending.items():
            self._pump_event(session, event, now)

    def _pump_event(self, session: Session, event: tuple, now: float) -> None:
        if self.sessions.get(session.peer) is not session:
            return  # ended since C spoke of it
        _, kind, err, data, src = event
        t = session.transfer
        if kind == EV_PACKET:
            if self.cfg.verbose >= 3 and self.noise.allow(src[0], now):
                log.debug("recv %d bytes from %s for %s", len(data), _peer(src),
                          session.name)
            self._apply(session, t.on_datagram(data, src, now), now)
        elif kind == EV_DONE:
            self._apply(session, t.on_pumped_done(), now)
        elif kind == EV_REARM:
            self._apply(session, [], now)  # the timer heap learns the sooner deadline
        elif err == -1:
            self._abort(session, P.E_UNDEFINED, "File changed during transfer",
                        "file shrank under the transfer", now)
        else:
            self._finish(session, Finish("failed", f"socket error: {os.strerror(err)}"),
                         now)

    def _apply(self, session: Session, actions: list, now: float) -> None:
        t = session.transfer
        for action in actions:
            try:
                if isinstance(action, Write):
                    assert session.upload is not None
                    session.upload.write(action.offset, action.payload)
                elif isinstance(action, Commit):
                    assert session.upload is not None
                    session.upload.commit()
                elif isinstance(action, SendBlocks):
                    assert session.file is not None
                    # Fewer sent than asked is back-pressure (a full send queue): the
                    # retransmission timer sends the rest, as it would after a loss.
                    self.datapath.send_window(session.sock, session.peer, session.sockaddr,
                                              session.file.fd, action.first, action.count,
                                              t.blksize, t.size, t.rollover,
                                              session.file.image, t.s)
                elif isinstance(action, Send):
                    session.sock.sendto(action.data, session.peer)
                elif isinstance(action, SendTo):
                    session.sock.sendto(action.data, action.addr)
                    if self.noise.allow(action.addr[0], now):
                        log.info("%s: ERROR 5 to foreign TID %s", session.name,
                                 _peer(action.addr))
                elif isinstance(action, Finish):
                    self._finish(session, action, now)
                    return
            except FileShrank:
                self._abort(session, P.E_UNDEFINED, "File changed during transfer",
                            "file shrank under the transfer", now)
                return
            except FileError as err:  # an upload that may not be put in place
                self._abort(session, err.code, err.message, err.reason, now)
                return
            except (BlockingIOError, InterruptedError):
                pass  # back-pressure: the retransmission timer sends it again
            except OSError as err:
                if err.errno in (errno.ENOBUFS, errno.EAGAIN):
                    continue
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._abort(session, P.E_DISK_FULL, "Disk full or allocation exceeded",
                                "disk full", now)
                    return
                self._abort(session, P.E_UNDEFINED, "I/O error", f"{err}", now)
                return
            except ValueError as err:  # the data path refused its arguments: our bug
                log.exception("data path refused a send")
                self._abort(session, P.E_UNDEFINED, "Internal error", f"send: {err}", now)
                return
        if t.deadline is not None and t.deadline < session.heap_deadline:
            session.heap_deadline = t.deadline
            heapq.heappush(self.timers, (t.deadline, next(self._seq), session))

    def _abort(self, session: Session, code: int, message: str, detail: str,
               now: float) -> None:
        try:
            session.sock.sendto(P.encode_error(code, message), session.peer)
        except OSError:
            pass
        self._finish(session, session.transfer.fail(detail), now)

    def _compact_timers(self) -> None:
        """Drop the heap entries of finished transfers.

        Entries are left behind lazily (a probe ends long before its first timeout);
        at thousands of probes a second they would hold every finished session for a
        second or more. Rebuilding keeps the heap in proportion to live transfers.
        """
        live = []
        for deadline, seq, s in self.timers:
            if self.sessions.get(s.peer) is s and deadline == s.heap_deadline:
                live.append((deadline, seq, s))
        heapq.heapify(live)
        self.timers = live

    def _run_timers(self, now: float) -> None:
        if self.pump is not None and self.pump.live and now >= self._c_due:
            # The OACK timers of transfers C started: Python takes those over.
            due, self._c_due = self.pump.overdue(now)
            for slot in due:
                self._adopt(slot, now)  # its heap entry is due: served below
        while self.timers and self.timers[0][0] <= now:
            deadline, _, session = heapq.heappop(self.timers)
            if self.sessions.get(session.peer) is not session \
                    or deadline != session.heap_deadline:
                # Finished since, or superseded by the earlier entry pushed when its
                # deadline moved up (that one is the session's, as in _compact_timers).
                # Re-arming a superseded entry too kept both: at 10,000 transfers the
                # heap held 120,000 entries and a turn spent 0.2-0.7 s re-pushing them.
                continue
            session.heap_deadline = float("inf")
            t = session.transfer
            if t.deadline is None:
                continue
            if t.deadline <= now:
                # What the client sent may be waiting in the socket, unread because the
                # turn was long (thousands of transfers): an ACK queued is no timeout.
                self._read_transfer(session)
                if self.sessions.get(session.peer) is not session or t.deadline is None:
                    continue
            if t.deadline > now:
                # Progress moved the deadline; one heap entry per session, re-armed.
                if session.heap_deadline > t.deadline:
                    session.heap_deadline = t.deadline
                    heapq.heappush(self.timers, (t.deadline, next(self._seq), session))
                continue
            self._apply(session, t.on_timer(now), now)

    def _finish(self, session: Session, fin: Finish, now: float) -> None:
        if self.sessions.get(session.peer) is session:
            del self.sessions[session.peer]
            if len(self.timers) > 2 * len(self.sessions) + 256:
                self._compact_timers()
            host = session.peer[0]
            left = self.per_client.get(host, 1) - 1
            if left > 0:
                self.per_client[host] = left
            else:
                self.per_client.pop(host, None)
            if session.upload is not None:
                self._uploads -= 1
        if session.slot >= 0 and self.pump is not None:
            self.pump.release(session.slot)
            self.by_slot.pop(session.slot, None)
        else:
            try:
                self.sel.unregister(session.sock)
            except (KeyError, ValueError):
                pass
        session.sock.close()  # its port served this client only (_transfer_socket)
        if session.file is not None:
            session.file.close()
        if session.upload is not None:
            session.upload.discard()  # after a commit this only closes
        t = session.transfer
        c = self.counters
        c[S.OUTCOME.get(fin.outcome, S.INDEX["failed"])] += 1
        c[S.INDEX["bytes"]] += t.bytes_sent
        c[S.INDEX["retransmits"]] += t.retransmits
        c[S.INDEX["active"]] = len(self.sessions)
        S.observe(c, "duration", now - session.started)
        st = self.files.stats
        # Deltas: after a reload another process may continue this row's totals.
        c[S.INDEX["cache_hits"]] += st.hits - self._hits_reported
        c[S.INDEX["miss_cache_hits"]] += st.miss_hits - self._misses_reported
        self._hits_reported, self._misses_reported = st.hits, st.miss_hits
        self._log_end(session.peer, session.name, session.mode, t.bytes_sent, t.blksize,
                      t.windowsize, now - session.started, t.retransmits, fin.outcome,
                      fin.detail, session.asked, session.granted,
                      "WRQ" if session.upload else "RRQ", t.answered)

    def _log_end(self, peer: tuple, name: str, mode: str, nbytes: int, blksize: int,
                 window: int, duration: float, retransmits: int, outcome: str,
                 detail: str, asked: dict, granted: dict, op: str, answered: bool) -> None:
        """One line per finished transfer, whatever its end; a client who never
        answered from its address gets the lines of unproven input."""
        throttle = self.records if answered else self.noise
        if not throttle.allow(peer[0], time.monotonic()):
            return
        if not self.json_log:
            reason = f" reason={sanitize(detail, 200)}" if detail else ""
            logs.info_line(f"{_peer(peer)} file={name} mode={mode} bytes={nbytes} "
                           f"blksize={blksize} window={window} duration={duration:.3f}s "
                           f"retransmits={retransmits} outcome={outcome}{reason}")
            return
        extra = {"transfer": {
            "client": peer[0], "port": peer[1], "file": name, "mode": mode, "op": op,
            "options": _clean(asked), "granted": granted, "bytes": nbytes,
            "blksize": blksize, "windowsize": window, "duration_s": round(duration, 6),
            "retransmits": retransmits, "outcome": outcome,
            "reason": sanitize(detail, 200)}}
        log.info("%s file=%s mode=%s bytes=%d blksize=%d window=%d duration=%.3fs "
                 "retransmits=%d outcome=%s%s", _peer(peer), name, mode, nbytes, blksize,
                 window, duration, retransmits, outcome,
                 f" reason={sanitize(detail, 200)}" if detail else "", extra=extra)


def _peer(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _clean(options: dict[str, str]) -> dict[str, str]:
    return {sanitize(k, 20): sanitize(v, 20) for k, v in options.items()}


def _opts(options: dict[str, str]) -> str:
    return " ".join(f"{sanitize(k, 20)}={sanitize(v, 20)}" for k, v in options.items())
