"""One worker: the request path and the transfers, over the parts it is made of.

The parts: Intake (listen sockets, forwarding), a Loop (SelectorLoop or PumpLoop,
chosen once in init_process), the SessionTable, the Timers, the SocketPool and the
TransferLog (counters and records). What to do with a request is decided without I/O
in tftpd.decision; the request path here carries it out in four steps:

    decide -> resolve the content (open the file) -> negotiate -> start the transfer

(`_on_request`, `_resolve_read`, `_start_read`). Each step takes the request's
`Incoming` context and what the step before produced, so a resolve that completes
later (from a callback on a watched descriptor) can call `_start_read` itself.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from tftpd import logs
from tftpd import packet as P
from tftpd import stats as S
from tftpd.config import Config
from tftpd.datapath import DataPath, FileShrank, Pump, Refusal, Refusals, encode_sockaddr
from tftpd.decision import Merge, Refuse, Room, Serve, Supersede, apply_rules, decide
from tftpd.files import FileCache, FileError, OpenFile, Root, open_upload, sanitize
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
from tftpd.worker.intake import Forward, Intake, Listener
from tftpd.worker.loops import Loop, PumpLoop, SelectorLoop
from tftpd.worker.process import MASTER_SIGNALS, MtuCache, blksize_for_mtu, die_with_parent
from tftpd.worker.records import Record, TransferLog, opts_text
from tftpd.worker.sessions import Session, SessionTable, Start, peer_text
from tftpd.worker.sockets import SocketPool
from tftpd.worker.timers import Timers

log = logging.getLogger("tftpd")

TRANSFER_BATCH = 16  # datagrams read from one transfer socket per turn
MEMO_SIZE = 4096  # remembered parses and negotiations
# How long C may answer a request with the OACK Python negotiated for it (while the
# file keeps its identity, checked on every use): as long as Python itself trusts a
# cached MTU, the one other input of that OACK (MtuCache.REFRESH).
START_TTL = 10.0  # s


@dataclass(slots=True)
class Incoming:
    """A request as it arrived: what every step of the request path needs of it."""

    data: bytes  # the datagram
    src: tuple  # the client's address
    local: str  # the address it was sent to
    lst: Listener
    ifindex: int  # the arrival interface (0: unknown)
    now: float


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
        self.rules: Any = rules  # tftpd.remap.Rules
        self.root = root
        self.files = FileCache(root, gz=gz)
        self.datapath = datapath
        self.policy = Policy(max_blksize=cfg.max_blksize, max_windowsize=cfg.max_windowsize,
                             max_window_bytes=cfg.max_window_bytes,
                             refused=frozenset(cfg.refuse), max_upload=cfg.max_upload)
        self.mtu = MtuCache()
        self.books = TransferLog(self.counters, self.files, cfg.log_format == "json")
        self.noise = self.books.noise
        self.table = SessionTable()
        self.timers = Timers()
        self.pool = SocketPool(cfg.port_range, self.noise)
        self.intake = Intake(self, listeners, forward)
        self.loop: Loop  # chosen in init_process
        self.pump: Pump | None = None
        self.draining = False
        self.drain_deadline = 0.0
        self.stop_now = False
        self._wake_r = -1
        # Pure functions of a request's bytes, remembered: parse and the log name, and
        # the negotiation (by options, file size and MTU). Bounded; cleared when full.
        self._parsed: dict[bytes, tuple[P.Request, str]] = {}
        self._negotiated: dict[tuple, Any] = {}
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
        die_with_parent()
        if os.environ.get("TFTPD_PUMP", "1") != "0":
            # With the C data path the worker waits in C (PumpLoop); the pure-Python
            # data path has no pump.
            self.pump = self.datapath.pump(self.max_sessions)
        if self.pump is not None:
            self.pool.pump = self.pump
            self.loop = PumpLoop(self, self.pump)
        else:
            self.loop = SelectorLoop(self)
        self.loop.watch(self._wake_r, self._drain_wakeup)
        self.intake.start(self.loop)
        self.counters[S.INDEX["listening"]] = 1
        logs.start_batching()

    def _on_term(self, signum: int, frame: object) -> None:
        # Only flags here: the loop does the work (no logging in a handler).
        self.draining = True

    def _on_quit(self, signum: int, frame: object) -> None:
        self.stop_now = True

    def run(self) -> int:
        self.init_process()
        return self.loop.run()

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- requests: decide -> resolve -> negotiate -> start -----------------------------

    def serve_request(self, data: bytes, src: tuple, local: str, lst: Listener,
                      ifindex: int, arrival: float) -> None:
        answered = False
        try:
            answered = self._on_request(Incoming(data, src, local, lst, ifindex,
                                                 time.monotonic()))
        except Exception:  # one bad request must never take the worker down
            log.exception("request from %s failed", sanitize(str(src[:2])))
        if answered and arrival:
            # Whatever the answer was (OACK, DATA, ERROR, or a merge), it has gone.
            S.observe(self.counters, "first_answer", max(0.0, time.time() - arrival))

    def _parse(self, inc: Incoming) -> tuple[P.Request, str] | None:
        """The request and its sanitised name; None if the datagram is dropped."""
        memo = self._parsed.get(inc.data)
        if memo is not None:
            return memo  # the same datagram again: a storm asks the same names
        src = inc.src
        try:
            parsed = P.parse(inc.data)
        except P.PacketError as err:
            self.counters[S.INDEX["malformed"]] += 1
            if self.noise.allow(src[0], inc.now):
                log.info("dropped malformed packet from %s: %s", peer_text(src), err)
            return None
        if not isinstance(parsed, P.Request):
            if self.cfg.verbose >= 3 and self.noise.allow(src[0], inc.now):
                log.debug("ignored %s on the listen port from %s", type(parsed).__name__,
                          peer_text(src))
            return None
        if len(self._parsed) >= MEMO_SIZE:
            self._parsed.clear()
        memo = self._parsed[inc.data] = (parsed, sanitize(parsed.filename))
        return memo

    def _on_request(self, inc: Incoming) -> bool:
        """Carry out the decision on a request; True if it was answered."""
        parsed = self._parse(inc)
        if parsed is None:
            return False
        req, name = parsed
        self.counters[S.INDEX["requests"]] += 1
        src, now = inc.src, inc.now
        if self.rules is not None:
            mapped = apply_rules(req, name, src[0], self.rules)
            if isinstance(mapped, Refuse):
                self._refuse(inc, mapped)
                return True
            req, name = mapped
        live = self._live(src)
        room = Room(len(self.table), self.max_sessions, self.table.client_count(src[0]),
                    self.cfg.max_per_client)
        decision = decide(req, name, inc.data, live.request if live is not None else None,
                          room, create=self.cfg.create)
        if isinstance(decision, Merge):
            assert live is not None
            self.counters[S.INDEX["merged"]] += 1
            if self.cfg.verbose >= 1 and self.noise.allow(src[0], now):
                log.info("merged repeated request from %s for %s", peer_text(src), name)
            if isinstance(live.transfer, ReadTransfer):
                self.apply(live, live.transfer.on_repeat(now), now)
            return False
        if isinstance(decision, Supersede):
            assert live is not None
            self._supersede(live, now)
            decision = decision.then
        if self.cfg.verbose >= 1 and self.noise.allow(src[0], now):
            log.info("request %s %s %s from %s %s", "WRQ" if req.is_write else "RRQ", name,
                     req.mode, peer_text(src), opts_text(req.options))
        if isinstance(decision, Refuse):
            self._refuse(inc, decision)
        elif decision.request.is_write:
            self._serve_write(inc, decision)
        else:
            f = self._resolve_read(inc, decision)
            if f is not None:
                self._start_read(inc, decision, f)
        return True

    def _resolve_read(self, inc: Incoming, serve: Serve) -> OpenFile | None:
        """The content of a read: the file opened (None: refused, the client told)."""
        req = serve.request
        try:
            return self.files.open(req.filename, req.mode)
        except FileError as err:
            outcome = "notfound" if err.code == P.E_NOT_FOUND else "denied"
            self._refuse(inc, Refuse(err.code, err.message, outcome, serve.name, req.mode,
                                     req.options, err.reason))
            miss = self.files.last_miss
            if miss is not None and self.refusals is not None and not inc.lst.shared:
                # While the negative cache holds the name, this very request is
                # answered without Python (the answer depends on nothing else).
                expires, directory, ident = miss
                self.refusals.put(inc.data, P.encode_error(err.code, err.message), expires,
                                  directory, ident, (serve.name, req.mode, err.code,
                                                     "No such file (cached)", req.options))
            return None

    def _mtu_blksize(self, inc: Incoming) -> int | None:
        if not inc.ifindex:
            return None
        return blksize_for_mtu(self.mtu.get(inc.ifindex, inc.now), inc.lst.family)

    def _start_read(self, inc: Incoming, serve: Serve, f: OpenFile) -> None:
        """Negotiate the options for the file, then start its transfer."""
        req, src, now = serve.request, inc.src, inc.now
        try:
            key = (inc.data, f.size, self._mtu_blksize(inc))
            memo = self._negotiated.get(key)
            if memo is None:
                neg = negotiate(req.options, self.policy, size=f.size, mtu_blksize=key[2])
                if len(self._negotiated) >= MEMO_SIZE:
                    self._negotiated.clear()
                memo = self._negotiated[key] = (neg, P.encode_oack(neg.oack)
                                                if neg.oack else None)
            neg, oack_packet = memo
            sock = self.pool.transfer_socket(inc.lst.family, inc.local)
        except OSError as err:
            f.close()
            self._refuse(inc, Refuse(P.E_UNDEFINED, "Server busy", "failed", serve.name,
                                     req.mode, req.options, f"no transfer socket: {err}"))
            return
        except Exception:
            f.close()
            raise
        rto = neg.timeout if neg.timeout is not None else self.cfg.retransmit_us / 1e6
        slot, state = self.loop.new_state()
        t = ReadTransfer(src, f.size, blksize=neg.blksize, windowsize=neg.windowsize,
                         oack=neg.oack or None, timeout=rto,
                         client_timeout=neg.timeout is not None, retries=self.cfg.retries,
                         rollover=self.cfg.rollover, state=state, oack_packet=oack_packet)
        session = Session(t, sock, f, src, encode_sockaddr(src), inc.data, serve.name,
                          req.mode, now, slot, req.options, dict(neg.oack), local=inc.local)
        self._add(session)
        if slot >= 0 and oack_packet is not None and self.refusals is not None \
                and not inc.lst.shared and inc.ifindex and req.mode == "octet" \
                and not f.derived:
            # The next identical request gets this OACK from C, with no Python.
            self._remember_start(inc, serve, f, state, oack_packet, dict(neg.oack))
        self.apply(session, t.start(now), now)

    def _remember_start(self, inc: Incoming, serve: Serve, f: OpenFile, state: Any,
                        oack_packet: bytes, granted: dict) -> None:
        assert self.refusals is not None and self.pump is not None
        req, now, local = serve.request, inc.now, inc.local
        known = self.refusals.current(inc.data)
        dstlen = 16 if ":" in local else 4  # the family of the address asked
        if known is not None and known.xfer is not None and known.ident == f.ident \
                and known.ifindex == inc.ifindex and known.dstlen == dstlen \
                and known.expires > now + START_TTL / 2:
            return  # C had no spare or slot for it: the entry stands
        path = self.files.path_of(req.filename)
        if path is None:
            return
        xfer = self.pump.template(state)
        self.refusals.put(inc.data, oack_packet, now + START_TTL, path, f.ident,
                          Start(req.filename, serve.name, req.mode, req.options, granted,
                                local), ifindex=inc.ifindex, dstlen=dstlen, xfer=xfer)

    def _serve_write(self, inc: Incoming, serve: Serve) -> None:
        """An upload: negotiate (the size limit refuses before a file is made), resolve
        (open the upload), start."""
        req, src, now = serve.request, inc.src, inc.now
        try:
            neg = negotiate(req.options, self.policy, is_write=True,
                            mtu_blksize=self._mtu_blksize(inc))
        except OptionRefused as err:
            self._refuse(inc, Refuse(P.E_DISK_FULL, "Upload exceeds the size limit",
                                     "denied", serve.name, req.mode, req.options, str(err)))
            return
        try:
            upload = open_upload(self.root, req.filename, create=self.cfg.create,
                                 permissive=self.cfg.permissive, umask=self.cfg.umask)
        except FileError as err:
            outcome = "notfound" if err.code == P.E_NOT_FOUND else "denied"
            self._refuse(inc, Refuse(err.code, err.message, outcome, serve.name, req.mode,
                                     req.options, err.reason))
            return
        try:
            sock = self.pool.transfer_socket(inc.lst.family, inc.local)
        except OSError as err:
            upload.discard()
            self._refuse(inc, Refuse(P.E_UNDEFINED, "Server busy", "failed", serve.name,
                                     req.mode, req.options, f"no transfer socket: {err}"))
            return
        rto = neg.timeout if neg.timeout is not None else self.cfg.retransmit_us / 1e6
        t = WriteTransfer(src, blksize=neg.blksize, windowsize=neg.windowsize,
                          oack=neg.oack or None, timeout=rto,
                          client_timeout=neg.timeout is not None, retries=self.cfg.retries,
                          max_size=self.cfg.max_upload, rollover=self.cfg.rollover)
        session = Session(t, sock, None, src, b"", inc.data, serve.name, req.mode, now,
                          asked=req.options, granted=dict(neg.oack), upload=upload)
        self._add(session)  # writes stay on the Python path
        self.apply(session, t.start(now), now)

    def _refuse(self, inc: Incoming, r: Refuse) -> None:
        try:
            self.pool.send_error(inc.lst, inc.src, inc.local, P.encode_error(r.code, r.message))
        except OSError as err:
            if self.noise.allow(inc.src[0], inc.now):
                log.warning("error reply to %s: %s", peer_text(inc.src), err)
        self.books.refused(inc.src, r.code, r.message, r.outcome, r.name, r.mode, r.options,
                           r.reason, inc.now, len(self.table))

    def _supersede(self, live: Session, now: float) -> None:
        """Same address and port, a different request: the client moved on. What it
        sent the old transfer before (its last ACK, often) counts first, so only a
        transfer it left unfinished ends as aborted."""
        handler = self.loop.take_pending(live)
        if handler is not None and self.table.is_current(live):  # C has read it already
            handler(now)
        self.read_transfer(live)
        if self.table.is_current(live):
            self.finish(live, Finish("aborted", "superseded by a new request"), now)

    def _live(self, src: tuple) -> Session | None:
        """The transfer serving this peer: Python's, or one C started (taken over)."""
        live = self.table.get(src)
        if live is None:
            slot = self.loop.find_started(src)
            if slot >= 0:
                live = self.adopt(slot, time.monotonic())
        return live

    # -- what the data path answered or started without Python -----------------------

    def answered(self, refusal: Refusal, err: int, src: tuple, arrival: float,
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
                log.warning("error reply to %s: %s", peer_text(src), os.strerror(err))
        elif arrival:
            S.observe(c, "first_answer", max(0.0, answered - arrival))
        self.books.answered_miss(src, refusal.note, now)

    def c_started(self, entry: Refusal | None, err: int, arrival: float,
                  answered: float) -> None:
        """C sent an OACK it had the answer for and owns the transfer: the books."""
        c = self.counters
        c[S.INDEX["requests"]] += 1
        c[S.INDEX["c_starts"]] += 1
        # Its timer: the entry's RTO, or at once (the scan then finds when) if the
        # entry is gone from the table already.
        self.timers.c_started(time.monotonic() + (entry.xfer.rto if entry is not None
                                                  else 0.0))
        if err:
            log.warning("OACK: %s (the timer resends it)", os.strerror(err))
        elif arrival:
            S.observe(c, "first_answer", max(0.0, answered - arrival))

    def probe_done(self, slot: int, code: int, back: int, peer: tuple) -> None:
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
            log.warning("%s ended a probe C started (error %d)", peer_text(peer), code)
            return
        note: Start = entry.note
        self.books.line(Record(peer, note.name, note.mode, 0, blksize, window, duration,
                               retransmits, "probe", "", note.asked, note.granted, "RRQ",
                               True))

    def adopt(self, slot: int, now: float) -> Session | None:
        """Python takes over a transfer C started (a datagram C cannot judge, its
        timer, a new request from its peer). It goes on as if Python had started it;
        None if it could not (then it has ended, with an ERROR to the client)."""
        assert self.pump is not None and self.refusals is not None
        session = self.table.adopt(self.pump, self.refusals, self.files, self.cfg.retries,
                                   slot)
        if session is None:
            return None
        self.counters[S.INDEX["active"]] = len(self.table)
        if session.file is None:
            # Replaced or gone since the OACK told its size: never serve a mix.
            self._abort(session, P.E_UNDEFINED, "File changed during transfer",
                        "file changed after the OACK", now)
            return None
        self.apply(session, [], now)  # arms its timer
        return session

    # -- transfers -------------------------------------------------------------------

    def is_current(self, session: Session) -> bool:
        return self.table.is_current(session)

    def _add(self, session: Session) -> None:
        self.table.add(session)
        self.counters[S.INDEX["active"]] = len(self.table)
        self.loop.add_transfer(session)

    def read_transfer(self, session: Session) -> None:
        for _ in range(TRANSFER_BATCH):
            if not self.table.is_current(session):
                return  # finished: its socket may be a spare now
            try:
                data, src = session.sock.recvfrom(P.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # ICMP port unreachable surfaces here: the client has gone away.
                now = time.monotonic()
                self.finish(session, Finish("failed", f"socket error: {err.strerror}"), now)
                return
            self.on_datagram(session, data, src, time.monotonic())

    # What C's pump reports of a transfer (PumpLoop._sort_events binds them).

    def on_datagram(self, session: Session, data: bytes, src: tuple, now: float) -> None:
        if self.cfg.verbose >= 3 and self.noise.allow(src[0], now):
            log.debug("recv %d bytes from %s for %s", len(data), peer_text(src), session.name)
        self.apply(session, session.transfer.on_datagram(data, src, now), now)

    def on_window_sent(self, session: Session, now: float) -> None:
        self.apply(session, session.transfer.on_pumped_done(), now)

    def on_rearm(self, session: Session, now: float) -> None:
        self.apply(session, [], now)  # the timer heap learns the sooner deadline

    def on_file_shrank(self, session: Session, now: float) -> None:
        self._abort(session, P.E_UNDEFINED, "File changed during transfer",
                    "file shrank under the transfer", now)

    def on_socket_error(self, session: Session, err: int, now: float) -> None:
        self.finish(session, Finish("failed", f"socket error: {os.strerror(err)}"), now)

    def apply(self, session: Session, actions: list, now: float) -> None:
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
                                 peer_text(action.addr))
                elif isinstance(action, Finish):
                    self.finish(session, action, now)
                    return
            except FileShrank:
                self.on_file_shrank(session, now)
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
        self.timers.arm(session, t.deadline)

    def _abort(self, session: Session, code: int, message: str, detail: str,
               now: float) -> None:
        try:
            session.sock.sendto(P.encode_error(code, message), session.peer)
        except OSError:
            pass
        self.finish(session, session.transfer.fail(detail), now)

    def finish(self, session: Session, fin: Finish, now: float) -> None:
        """End a transfer: out of the table and the loop, its I/O closed, its record."""
        if self.table.remove(session) and len(self.timers) > 2 * len(self.table) + 256:
            self.timers.compact(self.table.is_current)
        self.loop.drop_transfer(session)
        session.sock.close()  # its port served this client only (SocketPool)
        if session.file is not None:
            session.file.close()
        if session.upload is not None:
            session.upload.discard()  # after a commit this only closes
        self.books.ended(session, fin, now, len(self.table))
