"""The worker's timer heap (tftpd.worker.timers.Timers), on stand-ins: one entry per session
stays in the heap, and a timeout is judged only after what the client sent is read."""

from __future__ import annotations

from types import SimpleNamespace

from tftpd.worker import Session
from tftpd.worker.timers import Timers


class FakeTransfer:
    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline
        self.timeouts = 0

    def on_timer(self, now: float) -> list:
        self.timeouts += 1
        self.deadline = now + 1.0
        return []


def _worker(sessions: list[Session], read: dict | None = None) -> SimpleNamespace:
    table = {s.peer: s for s in sessions}
    w = SimpleNamespace(timers=Timers(), reads=0)

    def read_transfer(session: Session) -> None:
        w.reads += 1
        if read and session.peer in read:  # an ACK was waiting: the deadline moves on
            session.transfer.deadline = read.pop(session.peer)

    def apply(session: Session, actions: list, now: float) -> None:
        w.timers.arm(session, session.transfer.deadline)

    w.is_current = lambda session: table.get(session.peer) is session
    w.read_transfer = read_transfer
    w.apply = apply
    return w


def _session(i: int, deadline: float) -> Session:
    return Session(FakeTransfer(deadline), None, None, ("127.0.0.1", 1000 + i),  # type: ignore[arg-type]
                   b"", b"rrq", "f", "octet", 0.0)


def _push(w: SimpleNamespace, s: Session, deadline: float) -> None:
    w.timers.arm(s, deadline)


def test_superseded_entries_leave_the_heap() -> None:
    sessions = [_session(i, 5.0) for i in range(100)]
    w = _worker(sessions)
    for s in sessions:
        _push(w, s, 5.0)  # armed at 5 s, then the deadline moved up to 2 s:
        _push(w, s, 2.0)  # a second, earlier entry; the first is superseded
        s.transfer.deadline = 8.0  # progress since: the deadline is later again
    w.timers.run(6.0, w)
    assert len(w.timers.heap) == 100  # one entry each, at the session's deadline
    assert all(d == s.heap_deadline == 8.0 for d, _, s in w.timers.heap)
    assert all(s.transfer.timeouts == 0 for s in sessions)
    w.timers.run(7.0, w)
    assert len(w.timers.heap) == 100


def test_a_queued_ack_is_read_before_a_timeout_is_taken() -> None:
    waiting, silent = _session(1, 1.0), _session(2, 1.0)
    w = _worker([waiting, silent], read={waiting.peer: 1.5})
    _push(w, waiting, 1.0)
    _push(w, silent, 1.0)
    w.timers.run(1.2, w)
    assert w.reads == 2
    assert waiting.transfer.timeouts == 0 and waiting.heap_deadline == 1.5
    assert silent.transfer.timeouts == 1  # nothing was waiting: a real timeout
    assert sorted(d for d, _, _ in w.timers.heap) == [1.5, 2.2]
