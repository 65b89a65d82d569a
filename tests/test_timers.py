"""The worker's timer heap (Worker._run_timers), on stand-ins: one entry per session
stays in the heap, and a timeout is judged only after what the client sent is read."""

from __future__ import annotations

import heapq
import itertools
from types import SimpleNamespace

from tftpd.worker import Session, Worker


class FakeTransfer:
    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline
        self.timeouts = 0

    def on_timer(self, now: float) -> list:
        self.timeouts += 1
        self.deadline = now + 1.0
        return []


def _worker(sessions: list[Session], read: dict | None = None) -> SimpleNamespace:
    w = SimpleNamespace(pump=None, _c_due=float("inf"), timers=[], _seq=itertools.count(),
                        sessions={s.peer: s for s in sessions}, reads=0)

    def read_transfer(session: Session) -> None:
        w.reads += 1
        if read and session.peer in read:  # an ACK was waiting: the deadline moves on
            session.transfer.deadline = read.pop(session.peer)

    def apply(session: Session, actions: list, now: float) -> None:
        t = session.transfer
        if t.deadline is not None and t.deadline < session.heap_deadline:
            session.heap_deadline = t.deadline
            heapq.heappush(w.timers, (t.deadline, next(w._seq), session))

    w._read_transfer = read_transfer
    w._apply = apply
    return w


def _session(i: int, deadline: float) -> Session:
    return Session(FakeTransfer(deadline), None, None, ("127.0.0.1", 1000 + i),  # type: ignore[arg-type]
                   b"", b"rrq", "f", "octet", 0.0)


def _push(w: SimpleNamespace, s: Session, deadline: float) -> None:
    s.heap_deadline = min(s.heap_deadline, deadline)
    heapq.heappush(w.timers, (deadline, next(w._seq), s))


def test_superseded_entries_leave_the_heap() -> None:
    sessions = [_session(i, 5.0) for i in range(100)]
    w = _worker(sessions)
    for s in sessions:
        _push(w, s, 5.0)  # armed at 5 s, then the deadline moved up to 2 s:
        _push(w, s, 2.0)  # a second, earlier entry; the first is superseded
        s.transfer.deadline = 8.0  # progress since: the deadline is later again
    Worker._run_timers(w, 6.0)  # type: ignore[arg-type]
    assert len(w.timers) == 100  # one entry each, at the session's deadline
    assert all(d == s.heap_deadline == 8.0 for d, _, s in w.timers)
    assert all(s.transfer.timeouts == 0 for s in sessions)
    Worker._run_timers(w, 7.0)  # type: ignore[arg-type]
    assert len(w.timers) == 100


def test_a_queued_ack_is_read_before_a_timeout_is_taken() -> None:
    waiting, silent = _session(1, 1.0), _session(2, 1.0)
    w = _worker([waiting, silent], read={waiting.peer: 1.5})
    _push(w, waiting, 1.0)
    _push(w, silent, 1.0)
    Worker._run_timers(w, 1.2)  # type: ignore[arg-type]
    assert w.reads == 2
    assert waiting.transfer.timeouts == 0 and waiting.heap_deadline == 1.5
    assert silent.transfer.timeouts == 1  # nothing was waiting: a real timeout
    assert sorted(d for d, _, _ in w.timers) == [1.5, 2.2]
