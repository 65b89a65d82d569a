"""The worker's event loops, chosen once when the worker starts.

`SelectorLoop` waits in a Python selector and reads every transfer socket itself (the
pure-Python data path). `PumpLoop` waits in C's pump, which answers ACKs in its epoll
set until one of Python's descriptors is ready, an ACK needs a decision, or the next
timer is due. Both serve, in each turn, the watched descriptors first (a PXE ROM gives
its RRQ one to four seconds; a running transfer tolerates a short wait), then the
transfers, then the timers; `Loop.run` is that turn, and the drain, for both.

Anything else that needs the loop watches a descriptor with callbacks:
`loop.watch(fd, on_readable, on_writable=None)`, `loop.unwatch(fd)`.
"""

from __future__ import annotations

import abc
import functools
import logging
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tftpd import logs
from tftpd import stats as S
from tftpd.datapath import (
    EV_DONE,
    EV_PACKET,
    EV_PROBE,
    EV_READY,
    EV_REARM,
    EV_SHRANK,
    Pump,
    PumpEvent,
    encode_sockaddr,
)
from tftpd.worker.sessions import Session

if TYPE_CHECKING:
    from tftpd.worker.core import Worker

log = logging.getLogger("tftpd")

IDLE_WAIT = 0.5  # s; the longest the loop sleeps with nothing scheduled (and beats)

# Called when its descriptor is readable (or writable). A read callback that returns
# True stopped with input left (a batch limit): the pump loop calls it again next turn
# without waiting.
OnReady = Callable[[], object]


@dataclass(slots=True, eq=False)
class Watch:
    """A watched descriptor's callbacks."""

    fd: int
    on_readable: OnReady | None
    on_writable: OnReady | None

    @property
    def events(self) -> int:
        return (selectors.EVENT_READ if self.on_readable is not None else 0) \
            | (selectors.EVENT_WRITE if self.on_writable is not None else 0)

    def serve(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and self.on_readable is not None:
            self.on_readable()
        if mask & selectors.EVENT_WRITE and self.on_writable is not None:
            self.on_writable()
# What a pump event asks of the worker, bound to its session; called with `now`.
Handler = Callable[[float], None]


class Loop(abc.ABC):
    """What both loops share: the turn, the timers, the drain."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    # -- what a loop kind provides ------------------------------------------------------

    @abc.abstractmethod
    def watch(self, fd: int, on_readable: OnReady | None = None,
              on_writable: OnReady | None = None) -> None:
        """Call `on_readable()` in each turn `fd` is readable, `on_writable()` in each
        turn it is writable (level-triggered: unwatch, or watch again without
        `on_writable`, once there is nothing to write). Watching a watched `fd` again
        replaces its callbacks."""

    @abc.abstractmethod
    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed: its number may come back). A
        descriptor not watched is ignored."""

    @abc.abstractmethod
    def add_transfer(self, session: Session) -> None:
        """Read the session's socket from now on."""

    @abc.abstractmethod
    def drop_transfer(self, session: Session) -> None:
        """Stop reading an ended session's socket (it is closed next)."""

    @abc.abstractmethod
    def turn(self, wait: float) -> None:
        """Wait up to `wait` seconds, then serve what is ready."""

    def new_state(self) -> tuple[int, object]:
        """A pump slot and its C state for a new read transfer; -1, None without C."""
        return -1, None

    def offer_starts(self, room: int) -> Pump | None:
        """The pump, if C may start up to `room` transfers itself during a batch."""
        return None

    def take_pending(self, session: Session) -> Handler | None:
        """What C read for this session this turn and Python has not acted on yet."""
        return None

    def find_started(self, src: tuple) -> int:
        """The pump slot of a transfer C started for this peer, or -1."""
        return -1

    def adopt_all(self) -> None:
        """Python takes over every transfer C started (before a drain)."""
        return None  # without C's pump, C starts none

    def wait_for(self, now: float) -> float:
        return max(0.0, min(IDLE_WAIT, self.worker.timers.next_due() - now))

    def run_timers(self, now: float) -> None:
        self.worker.timers.run(now, self.worker)

    # -- shared -------------------------------------------------------------------------

    def run(self) -> int:
        """Turn until told to stop, or until a drain has ended; the exit status."""
        w = self.worker
        drain_started = False
        while True:
            w.counters[S.BEAT] = time.monotonic_ns()  # alive: master.HUNG_AFTER
            if w.stop_now:
                return 0
            if w.draining and not drain_started:
                drain_started = True
                w.intake.stop(self)
                if w.http is not None:
                    w.http.stop_listening()
                w.counters[S.INDEX["listening"]] = 0  # the master waits for this on reload
                self.adopt_all()
                if w.table:
                    log.info("draining: %d transfer(s) to finish", len(w.table))
                w.drain_deadline = time.monotonic() + w.cfg.drain_s
            http_busy = w.http is not None and w.http.busy
            # Reads waiting for the content hook are waited for too (its timeout
            # bounds them); they become transfers, or refusals.
            if drain_started and ((not w.table and not http_busy and not w.requests.parked)
                                  or time.monotonic() >= w.drain_deadline):
                for s in w.table.sessions():
                    w.finish(s, s.transfer.end("failed", "server shutting down"),
                             time.monotonic())
                if w.http is not None:
                    w.http.stop()
                return 0
            self.turn(self.wait_for(time.monotonic()))
            # What the content hook answered while the turn ran: served now, not after
            # a wait for the wakeup (which a storm's requests would queue behind).
            w.requests.complete_parked()
            now = time.monotonic()
            self.run_timers(now)
            w.books.roll(now)  # what the throttles held back, said once a while
            logs.flush_logs()  # this turn's records, in one write


class SelectorLoop(Loop):
    """The pure-Python data path: one selector for every descriptor."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        self.sel = selectors.DefaultSelector()
        self._watches: dict[int, Watch] = {}

    def watch(self, fd: int, on_readable: OnReady | None = None,
              on_writable: OnReady | None = None) -> None:
        w = Watch(fd, on_readable, on_writable)
        if fd in self._watches:
            self.sel.modify(fd, w.events, w)
        else:
            self.sel.register(fd, w.events, w)
        self._watches[fd] = w

    def unwatch(self, fd: int) -> None:
        if self._watches.pop(fd, None) is not None:
            self.sel.unregister(fd)

    def add_transfer(self, session: Session) -> None:
        self.sel.register(session.sock, selectors.EVENT_READ, session)

    def drop_transfer(self, session: Session) -> None:
        try:
            self.sel.unregister(session.sock)
        except (KeyError, ValueError):
            pass

    def turn(self, wait: float) -> None:
        # Watched descriptors first, then transfers: new requests beat running ones.
        transfers = []
        for key, mask in self.sel.select(wait):
            if isinstance(key.data, Session):
                transfers.append(key.data)
            elif self._watches.get(key.fd) is key.data:  # not unwatched by a callback
                key.data.serve(mask)
        for session in transfers:
            self.worker.read_transfer(session)


class PumpLoop(Loop):
    """Wait in C's pump: ACKs are answered there until something is Python's.

    Python's descriptors are the pump's tokens (read readiness only). Uploads stay on
    the Python path: their sockets are in a selector of their own, which is one token
    and is read last in the turn; so are the descriptors watched for writing.
    """

    def __init__(self, worker: Worker, pump: Pump) -> None:
        super().__init__(worker)
        self.pump = pump
        self.uploads = selectors.DefaultSelector()  # and the descriptors written to
        self._uploads_token = pump.add_token(self.uploads.fileno())
        self._watched: dict[int, tuple[int, OnReady]] = {}  # token -> fd, on_readable
        self._token_of: dict[int, int] = {}  # fd -> token
        self._writers: dict[int, Watch] = {}  # fd -> watch in self.uploads
        # Descriptors whose callbacks had input left last turn: called again this turn,
        # token or not (epoll puts a level-triggered socket it has reported at the back
        # of its ready list, behind every transfer socket with an ACK waiting).
        self._backlog: list[int] = []
        self._pending: dict[Session, Handler] = {}  # this turn's pump events, by session

    def watch(self, fd: int, on_readable: OnReady | None = None,
              on_writable: OnReady | None = None) -> None:
        self.unwatch(fd)
        w = Watch(fd, on_readable, on_writable)
        if on_writable is not None:
            self.uploads.register(fd, w.events, w)
            self._writers[fd] = w
        elif on_readable is not None:
            token = self.pump.add_token(fd)
            self._watched[token] = (fd, on_readable)
            self._token_of[fd] = token

    def unwatch(self, fd: int) -> None:
        token = self._token_of.pop(fd, None)
        if token is not None:
            self.pump.remove_token(fd, token)
            del self._watched[token]
            if fd in self._backlog:
                self._backlog.remove(fd)
        if self._writers.pop(fd, None) is not None:
            self.uploads.unregister(fd)

    def add_transfer(self, session: Session) -> None:
        if session.slot < 0:  # an upload
            self.uploads.register(session.sock, selectors.EVENT_READ, session)
            return
        f = session.file
        assert f is not None
        self.pump.watch(session.slot, session.sock, session.sockaddr, f.fd, f.image)

    def drop_transfer(self, session: Session) -> None:
        if session.slot >= 0:
            self.pump.release(session.slot)
            return
        try:
            self.uploads.unregister(session.sock)
        except (KeyError, ValueError):
            pass

    def new_state(self) -> tuple[int, object]:
        return self.pump.new_state()

    def offer_starts(self, room: int) -> Pump | None:
        self.worker.pool.fill_spares()
        room -= self.pump.live
        self.pump.offer(room)
        return self.pump if room > 0 else None

    def take_pending(self, session: Session) -> Handler | None:
        return self._pending.pop(session, None)

    def find_started(self, src: tuple) -> int:
        if not self.pump.live:
            return -1
        slot = self.pump.find(encode_sockaddr(src))
        return slot if slot >= 0 and self.pump.is_started(slot) else -1

    def adopt_all(self) -> None:
        while self.pump.live:
            slots, _ = self.pump.overdue(float("inf"))
            if not slots:
                break
            for slot in slots:
                self.worker.adopt(slot, time.monotonic())

    def wait_for(self, now: float) -> float:
        wait = super().wait_for(now)
        if self.pump.live:
            wait = max(0.0, min(wait, self.worker.timers.c_due - now))
        return wait

    def run_timers(self, now: float) -> None:
        if self.pump.live:
            # The OACK timers of transfers C started: Python takes those over (their
            # heap entries are due, and served below).
            for slot in self.worker.timers.overdue(now, self.pump.overdue):
                self.worker.adopt(slot, now)
        super().run_timers(now)

    def turn(self, wait: float) -> None:
        """While requests are still queued (the first second of a storm), the next turn
        does not wait, and reads them whether or not C reports the socket ready again:
        the transfers get one pass (up to 256 sockets) per batch of requests read, so
        no RRQ waits behind a thousand ACKs and a flood of requests cannot starve the
        transfers it starts either.
        """
        if self._backlog:
            wait = 0.0
        ready = self._sort_events(self.pump.run(time.monotonic(), wait))
        backlog: list[int] = []
        uploads = False
        for token in ready:
            if token == self._uploads_token:
                uploads = True
                continue
            watched = self._watched.get(token)
            if watched is not None and watched[0] not in self._backlog and watched[1]():
                backlog.append(watched[0])
        for fd in self._backlog:
            token = self._token_of.get(fd)
            if token is not None and self._watched[token][1]():
                backlog.append(fd)
        self._backlog = backlog
        self._run_pending()
        if uploads:
            for key, mask in self.uploads.select(0):
                if isinstance(key.data, Session):
                    self.worker.read_transfer(key.data)
                elif self._writers.get(key.fd) is key.data:  # not unwatched since
                    key.data.serve(mask)

    def _sort_events(self, events: list[PumpEvent]) -> list[int]:
        """The one place that reads C's pump events: the tokens that are ready are
        returned; what C ended is settled at once; what a transfer needs is bound to
        its session (C's events name slots, and a request read this turn can end a
        transfer and its slot go to a new one) and acted on after the requests."""
        w = self.worker
        ready = []
        for ev in events:
            slot, kind = ev.slot, ev.kind
            if kind == EV_READY:
                ready.append(slot)
                continue
            if kind == EV_PROBE:  # C ended it: nothing of it is left in C
                w.probe_done(slot, ev.err, ev.offered, ev.source)
                continue
            session = w.table.by_slot.get(slot)
            if session is None:
                if not self.pump.is_started(slot):
                    continue
                # C started it and cannot judge this datagram (ACK 0, a foreign TID).
                session = w.adopt(slot, time.monotonic())
                if session is None:
                    continue
            if kind == EV_PACKET:
                handler = functools.partial(w.on_datagram, session, ev.datagram, ev.source)
            elif kind == EV_DONE:
                handler = functools.partial(w.on_window_sent, session)
            elif kind == EV_REARM:
                handler = functools.partial(w.on_rearm, session)
            elif kind == EV_SHRANK:
                handler = functools.partial(w.on_file_shrank, session)
            else:
                handler = functools.partial(w.on_socket_error, session, ev.err)
            self._pending[session] = handler  # one event per slot per call
        return ready

    def _run_pending(self) -> None:
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        table = self.worker.table
        for session, handler in pending.items():
            if table.is_current(session):  # not ended since C spoke of it
                handler(now)
