"""One worker: its transfers, over the parts it is made of.

The parts: Intake (listen sockets, forwarding), the RequestPath (decide -> resolve ->
negotiate -> start), a Loop (SelectorLoop or PumpLoop, chosen once in init_process),
the SessionTable, the Timers, the SocketPool and the TransferLog (counters and
records). The Worker drives each transfer: it applies what the sans-IO transfer
(tftpd.transfer) asks, ends it, and takes over the transfers C started.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Any

from tftpd import logs
from tftpd import packet as P
from tftpd import stats as S
from tftpd.config import Config
from tftpd.content import WorkerContent
from tftpd.datapath import DataPath, FileShrank, KnownAnswer, KnownAnswers, Pump
from tftpd.files import FileCache, FileError, Root
from tftpd.gz import GzCache
from tftpd.transfer import (
    Commit,
    Finish,
    Send,
    SendBlocks,
    SendTo,
    Write,
)
from tftpd.worker.intake import Forward, Intake, Listener
from tftpd.worker.loops import Loop, PumpLoop, SelectorLoop
from tftpd.worker.process import MASTER_SIGNALS, WakeupPipe, die_with_parent
from tftpd.worker.records import Record, TransferLog
from tftpd.worker.requests import RequestPath
from tftpd.worker.sessions import Session, SessionTable, Start, peer_text
from tftpd.worker.sockets import SocketPool
from tftpd.worker.timers import Timers

log = logging.getLogger("tftpd")

TRANSFER_BATCH = 16  # datagrams read from one transfer socket per turn
class Worker:
    def __init__(self, cfg: Config, listeners: list[Listener], root: Root,
                 datapath: DataPath, counters: memoryview | None = None,
                 gz: GzCache | None = None, forward: Forward | None = None,
                 rules: object | None = None, content: WorkerContent | None = None) -> None:
        self.cfg = cfg
        self.counters = counters if counters is not None else \
            memoryview(bytearray(8 * len(S.FIELDS))).cast("Q")
        # Each worker serves its share of the total (SO_REUSEPORT spreads clients).
        self.max_sessions = max(1, -(-cfg.max_transfers // max(1, cfg.workers)))
        self.rules: Any = rules  # tftpd.remap.Rules
        self.http: Any = None  # tftpd.http.HttpThreads (--http), set by the master
        self.root = root
        self.files = FileCache(root, gz=gz)
        # Names to files for this thread (per-client roots, the content hook).
        self.content = (content or WorkerContent(root, gz)).resolver(self.files)
        self.datapath = datapath
        self.books = TransferLog(self.counters, self.files, cfg.log_format == "json")
        self.noise = self.books.noise
        self.table = SessionTable()
        self.timers = Timers()
        self.pool = SocketPool(cfg.port_range, self.noise)
        self.intake = Intake(self, listeners, forward)
        self.requests = RequestPath(self)
        self.loop: Loop  # chosen in init_process
        self.pump: Pump | None = None
        self.draining = False
        self.drain_deadline = 0.0
        self.stop_now = False
        self._wakeup: WakeupPipe | None = None  # made in the child (init_process)
        # Known misses, answered by the data path. Only where the answer depends on
        # the request's bytes alone: no map rules (they see the client's address), no
        # per-client limit, no per-request log line (-v), no per-client content (one
        # client's answer must never be handed to another).
        self.refusals: KnownAnswers | None = None
        if rules is None and not cfg.max_per_client and cfg.verbose < 1 \
                and not self.content.per_client:
            self.refusals = KnownAnswers(datapath)

    # -- setup in the child (nothing process-wide happens before fork) --------------

    def init_process(self) -> None:
        self._wakeup = WakeupPipe()
        signal.set_wakeup_fd(self._wakeup.w)
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
        self.loop.watch(self._wakeup.r, self._drain_wakeup)
        self.intake.start(self.loop)
        self.counters[S.INDEX["listening"]] = 1
        logs.start_batching()
        if self.http is not None:
            self.http.start()

    def _on_term(self, signum: int, frame: object) -> None:
        # Only flags here: the loop does the work (no logging in a handler).
        self.draining = True

    def _on_quit(self, signum: int, frame: object) -> None:
        self.stop_now = True

    def run(self) -> int:
        self.init_process()
        return self.loop.run()

    def wake(self) -> None:
        """Wake the loop from another thread (a content hook answered): one byte to the
        wakeup pipe, which signals share."""
        assert self._wakeup is not None
        self._wakeup.wake()

    def _drain_wakeup(self) -> None:
        assert self._wakeup is not None
        self._wakeup.drain()
        self.requests.complete_parked()

    def serve_request(self, data: bytes, src: tuple, local: str, lst: Listener,
                      ifindex: int, arrival: float) -> None:
        """A request read from a listen socket or forwarded: the request path."""
        self.requests.serve(data, src, local, lst, ifindex, arrival)

    def supersede(self, live: Session, now: float) -> None:
        """Same address and port, a different request: the client moved on. What it
        sent the old transfer before (its last ACK, often) counts first, so only a
        transfer it left unfinished ends as aborted."""
        handler = self.loop.take_pending(live)
        if handler is not None and self.table.is_current(live):  # C has read it already
            handler(now)
        self.read_transfer(live)
        if self.table.is_current(live):
            self.finish(live, live.transfer.end("aborted", "superseded by a new request"),
                        now)

    def live(self, src: tuple) -> Session | None:
        """The transfer serving this peer: Python's, or one C started (taken over)."""
        live = self.table.get(src)
        if live is None:
            slot = self.loop.find_started(src)
            if slot >= 0:
                live = self.adopt(slot, time.monotonic())
        return live

    # -- what the data path answered or started without Python -----------------------

    def answered(self, refusal: KnownAnswer, err: int, src: tuple, arrival: float,
                 answered: float) -> None:
        """A known miss the data path answered: the books and the log line."""
        c = self.counters
        c[S.INDEX["requests"]] += 1
        c[S.INDEX["notfound"]] += 1
        c[S.INDEX["miss_cache_hits"]] += 1
        now = time.monotonic()
        live = self.live(src)
        if live is not None:  # the client moved on (as _on_request has it)
            self.supersede(live, now)
        if err:
            if self.noise.allow(src[0], now):
                log.warning("error reply to %s: %s", peer_text(src), os.strerror(err))
        elif arrival:
            S.observe(c, "first_answer", max(0.0, answered - arrival))
        self.books.answered_miss(src, refusal.note, now)

    def c_started(self, entry: KnownAnswer | None, err: int, arrival: float,
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

    def probe_done(self, slot: int, code: int, offered: bool, peer: tuple) -> None:
        """C ended a transfer it started on ERROR 0, 8 or 9: an existence probe."""
        assert self.pump is not None and self.refusals is not None
        x = self.pump.state(slot)
        now = time.monotonic()
        entry = self.refusals.get(x.answer)
        duration = now - x.sent_at
        blksize, window, retransmits = x.blksize, x.windowsize, x.retransmits
        self.pump.ended(slot, offered)  # closes its socket, takes back what C did not
        c = self.counters
        c[S.INDEX["probe"]] += 1
        S.observe(c, "duration", duration)
        if entry is None:  # cannot be: retired entries outlive their transfers
            log.warning("%s ended a probe C started (error %d)", peer_text(peer), code)
            return
        if self.books.admits(peer, True):
            note: Start = entry.note
            self.books.write(Record(peer, note.name, note.mode, 0, blksize, window,
                                    duration, retransmits, "probe", "", note.asked,
                                    note.granted, "RRQ", True))

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

    def add(self, session: Session) -> None:
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
                self.finish(session, session.transfer.end("failed",
                                                          f"socket error: {err.strerror}"),
                            now)
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
        self.finish(session, session.transfer.end(
            "failed", f"socket error: {os.strerror(err)}"), now)

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
