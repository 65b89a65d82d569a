"""The request path: what a worker does with an RRQ or WRQ that reached Python.

    decide -> resolve the content (open the file) -> negotiate -> start the transfer

`_on_request` parses (remembered), applies the map rules and decides (tftpd.decision,
no I/O); `_resolve_read` opens the file; `_start_read` negotiates the options and starts
the transfer. Each step takes the request's `Incoming` context and what the step before
produced, and nothing else, so a resolve that completes later (from a callback on a
watched descriptor, loop.watch) can call `_start_read` itself, with a fresh
`Incoming.now`, once it has checked that the client's address has no transfer yet (a
repeat or a new request may have come meanwhile). An upload
(`_serve_write`) negotiates before it resolves: its size limit refuses it before a file
is made.

The content of a read comes from the worker's ContentResolver (tftpd.content). With a
content hook it answers later: the request is parked, by client address, until the
hook's future completes in another thread; that thread only writes to the worker's
wakeup pipe, and the loop thread completes the request (complete_parked). A parked
request counts against the worker's limits like a transfer, so a slow hook cannot pile
requests up; the same datagram again from the same address while it is parked is
merged, a different one replaces it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tftpd import packet as P
from tftpd import stats as S
from tftpd.content import HOOK_FAILED, HOOK_TIMED_OUT, PendingContent
from tftpd.datapath import encode_sockaddr
from tftpd.decision import Merge, Refuse, Room, Serve, Supersede, apply_rules, decide
from tftpd.files import FileError, OpenFile, open_upload, sanitize
from tftpd.options import OptionRefused, Policy, negotiate
from tftpd.transfer import ReadTransfer, WriteTransfer
from tftpd.worker.intake import Listener
from tftpd.worker.process import MtuCache, blksize_for_mtu
from tftpd.worker.records import opts_text
from tftpd.worker.sessions import Session, Start, peer_text

if TYPE_CHECKING:
    from tftpd.worker.core import Worker

log = logging.getLogger("tftpd")

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


@dataclass(slots=True, eq=False)
class Parked:
    """A read waiting for the content hook's answer."""

    inc: Incoming
    serve: Serve
    pending: PendingContent


class RequestPath:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        cfg = self.cfg = worker.cfg
        self.policy = Policy(max_blksize=cfg.max_blksize, max_windowsize=cfg.max_windowsize,
                             max_window_bytes=cfg.max_window_bytes,
                             refused=frozenset(cfg.refuse), max_upload=cfg.max_upload)
        self.mtu = MtuCache()
        # Pure functions of a request's bytes, remembered: parse and the log name, and
        # the negotiation (by options, file size and MTU). Bounded; cleared when full.
        self._parsed: dict[bytes, tuple[P.Request, str]] = {}
        self._negotiated: dict[tuple, Any] = {}
        # Reads waiting for the content hook, by client address (and how many per IP
        # address, for the per-client limit); those whose hook has answered, queued
        # by the hook's threads for the loop thread.
        self._parked: dict[tuple, Parked] = {}
        self._parked_ips: collections.Counter[str] = collections.Counter()
        self._answered: collections.deque[Parked] = collections.deque()
        # A wakeup is on its way to the loop (set by a hook's thread, cleared by the
        # loop before it takes the answers): one byte to the pipe per batch of answers.
        self._wake_sent = False

    @property
    def parked(self) -> int:
        """Reads waiting for the content hook."""
        return len(self._parked)

    def serve(self, data: bytes, src: tuple, local: str, lst: Listener, ifindex: int,
              arrival: float) -> None:
        """Answer one request (`arrival`: when the kernel received it, realtime, or 0)."""
        answered = False
        try:
            answered = self._on_request(Incoming(data, src, local, lst, ifindex,
                                                 time.monotonic()))
        except Exception:  # one bad request must never take the worker down
            log.exception("request from %s failed", sanitize(str(src[:2])))
        if answered and arrival:
            # Whatever the answer was (OACK, DATA, ERROR, or a merge), it has gone.
            S.observe(self.worker.counters, "first_answer", max(0.0, time.time() - arrival))

    def _parse(self, inc: Incoming) -> tuple[P.Request, str] | None:
        """The request and its sanitised name; None if the datagram is dropped."""
        memo = self._parsed.get(inc.data)
        if memo is not None:
            return memo  # the same datagram again: a storm asks the same names
        src = inc.src
        try:
            parsed = P.parse(inc.data)
        except P.PacketError as err:
            self.worker.counters[S.INDEX["malformed"]] += 1
            if self.worker.noise.allow(src[0], inc.now):
                log.info("dropped malformed packet from %s: %s", peer_text(src), err)
            return None
        if not isinstance(parsed, P.Request):
            if self.cfg.verbose >= 3 and self.worker.noise.allow(src[0], inc.now):
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
        self.worker.counters[S.INDEX["requests"]] += 1
        src, now = inc.src, inc.now
        if self.worker.rules is not None:
            mapped = apply_rules(req, name, src[0], self.worker.rules)
            if isinstance(mapped, Refuse):
                self._refuse(inc, mapped)
                return True
            req, name = mapped
        held = self._parked.get(src)
        if held is not None:
            if held.inc.data == inc.data:  # a repeat: the hook's answer serves both
                self.worker.counters[S.INDEX["merged"]] += 1
                if self.cfg.verbose >= 1 and self.worker.noise.allow(src[0], inc.now):
                    log.info("merged repeated request from %s for %s (waiting for the "
                             "content hook)", peer_text(src), name)
                return False
            self._unpark(held)  # the client moved on: its new request replaces it
        live = self.worker.live(src)
        table = self.worker.table
        room = Room(len(table) + len(self._parked), self.worker.max_sessions,
                    table.client_count(src[0]) + self._parked_ips[src[0]],
                    self.cfg.max_per_client)
        decision = decide(req, name, inc.data, live.request if live is not None else None,
                          room, create=self.cfg.create)
        if isinstance(decision, Merge):
            assert live is not None
            self.worker.counters[S.INDEX["merged"]] += 1
            if self.cfg.verbose >= 1 and self.worker.noise.allow(src[0], now):
                log.info("merged repeated request from %s for %s", peer_text(src), name)
            if isinstance(live.transfer, ReadTransfer):
                self.worker.apply(live, live.transfer.on_repeat(now), now)
            return False
        if isinstance(decision, Supersede):
            assert live is not None
            self.worker.supersede(live, now)
            decision = decision.then
        if self.cfg.verbose >= 1 and self.worker.noise.allow(src[0], now):
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
        """The content of a read: the file opened (None: refused, the client told, or
        parked until the content hook answers)."""
        req = serve.request
        content = self.worker.content
        res = content.begin(req.filename, req.mode, inc.src[:2], "tftp", req.options)
        if isinstance(res, PendingContent):
            if not res.future.done():
                self._park(Parked(inc, serve, res))
                return None
            res = content.complete(res)
        err = res.error
        if err is None:
            return res.file
        self._refuse_content(inc, serve, err)
        miss = self.worker.files.last_miss
        if miss is not None and self.worker.refusals is not None and not inc.lst.shared:
            # While the negative cache holds the name, this very request is answered
            # without Python (the answer depends on nothing else: no per-client
            # content, or there would be no known answers).
            expires, directory, ident = miss
            self.worker.refusals.put(inc.data, P.encode_error(err.code, err.message),
                                     expires, directory, ident,
                                     (serve.name, req.mode, err.code,
                                      "No such file (cached)", req.options))
        return None

    def _refuse_content(self, inc: Incoming, serve: Serve, err: FileError) -> None:
        req = serve.request
        if err.code == P.E_NOT_FOUND:
            outcome = "notfound"
        elif err.message in (HOOK_FAILED, HOOK_TIMED_OUT):
            outcome = "failed"
            self.worker.counters[S.INDEX["hook_failed" if err.message == HOOK_FAILED
                                         else "hook_timed_out"]] += 1
        else:
            outcome = "denied"
        self._refuse(inc, Refuse(err.code, err.message, outcome, serve.name, req.mode,
                                 req.options, err.reason))

    # -- reads waiting for the content hook ----------------------------------------------

    def _park(self, p: Parked) -> None:
        self._parked[p.inc.src] = p
        self._parked_ips[p.inc.src[0]] += 1
        p.pending.future.add_done_callback(lambda _f, p=p: self._hook_answered(p))

    def _unpark(self, p: Parked) -> None:
        del self._parked[p.inc.src]
        ip = p.inc.src[0]
        self._parked_ips[ip] -= 1
        if self._parked_ips[ip] <= 0:
            del self._parked_ips[ip]

    def _hook_answered(self, p: Parked) -> None:
        """In a hook thread (or at once, in the loop's): only queue it and wake the
        loop, which completes it (complete_parked), unless a wakeup is on its way: the
        loop takes every answer queued by then."""
        self._answered.append(p)
        if not self._wake_sent:
            self._wake_sent = True
            self.worker.wake()

    def complete_parked(self) -> None:
        """In the loop thread (on its wakeup, and once a turn): the parked reads whose
        hook has answered go on."""
        # Cleared before the answers are taken: an answer queued after this point
        # either is taken below or sends a wakeup of its own.
        self._wake_sent = False
        while self._answered:
            p = self._answered.popleft()
            if self._parked.get(p.inc.src) is not p:
                continue  # replaced by a newer request of its client
            self._unpark(p)
            try:
                self._settle(p)
            except Exception:  # one bad request must never take the worker down
                log.exception("request from %s failed", sanitize(str(p.inc.src[:2])))

    def _settle(self, p: Parked) -> None:
        inc, serve = p.inc, p.serve
        inc.now = time.monotonic()
        res = self.worker.content.complete(p.pending)
        if res.error is not None:
            self._refuse_content(inc, serve, res.error)
            return
        assert res.file is not None
        if self.worker.live(inc.src) is not None:
            res.file.close()  # its address has a transfer already: that one stands
            return
        self._start_read(inc, serve, res.file)

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
            sock = self.worker.pool.transfer_socket(inc.lst.family, inc.local)
        except OSError as err:
            f.close()
            self._refuse(inc, Refuse(P.E_UNDEFINED, "Server busy", "failed", serve.name,
                                     req.mode, req.options, f"no transfer socket: {err}"))
            return
        except Exception:
            f.close()
            raise
        rto = neg.timeout if neg.timeout is not None else self.cfg.retransmit_us / 1e6
        slot, state = self.worker.loop.new_state()
        t = ReadTransfer(src, f.size, blksize=neg.blksize, windowsize=neg.windowsize,
                         oack=neg.oack or None, timeout=rto,
                         client_timeout=neg.timeout is not None, retries=self.cfg.retries,
                         rollover=self.cfg.rollover, state=state, oack_packet=oack_packet)
        session = Session(t, sock, f, src, encode_sockaddr(src), inc.data, serve.name,
                          req.mode, now, slot, req.options, dict(neg.oack), local=inc.local)
        self.worker.add(session)
        if slot >= 0 and oack_packet is not None and self.worker.refusals is not None \
                and not inc.lst.shared and inc.ifindex and req.mode == "octet" \
                and not f.derived:
            # The next identical request gets this OACK from C, with no Python.
            self._remember_start(inc, serve, f, state, oack_packet, dict(neg.oack))
        self.worker.apply(session, t.start(now), now)

    def _remember_start(self, inc: Incoming, serve: Serve, f: OpenFile, state: Any,
                        oack_packet: bytes, granted: dict) -> None:
        assert self.worker.refusals is not None and self.worker.pump is not None
        req, now, local = serve.request, inc.now, inc.local
        known = self.worker.refusals.current(inc.data)
        dstlen = 16 if ":" in local else 4  # the family of the address asked
        if known is not None and known.xfer is not None and known.ident == f.ident \
                and known.ifindex == inc.ifindex and known.dstlen == dstlen \
                and known.expires > now + START_TTL / 2:
            return  # C had no spare or slot for it: the entry stands
        path = self.worker.files.path_of(req.filename)
        if path is None:
            return
        xfer = self.worker.pump.template(state)
        self.worker.refusals.put(inc.data, oack_packet, now + START_TTL, path, f.ident,
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
            upload = open_upload(self.worker.root, req.filename, create=self.cfg.create,
                                 permissive=self.cfg.permissive, umask=self.cfg.umask)
        except FileError as err:
            outcome = "notfound" if err.code == P.E_NOT_FOUND else "denied"
            self._refuse(inc, Refuse(err.code, err.message, outcome, serve.name, req.mode,
                                     req.options, err.reason))
            return
        try:
            sock = self.worker.pool.transfer_socket(inc.lst.family, inc.local)
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
        self.worker.add(session)  # writes stay on the Python path
        self.worker.apply(session, t.start(now), now)

    def _refuse(self, inc: Incoming, r: Refuse) -> None:
        try:
            self.worker.pool.send_error(inc.lst, inc.src, inc.local,
                                        P.encode_error(r.code, r.message))
        except OSError as err:
            if self.worker.noise.allow(inc.src[0], inc.now):
                log.warning("error reply to %s: %s", peer_text(inc.src), err)
        self.worker.books.refused(inc.src, r.code, r.message, r.outcome, r.name, r.mode, r.options,
                           r.reason, inc.now, len(self.worker.table))
