"""When each transfer next needs the worker: a heap of deadlines, one entry per session.

Entries are dropped lazily (a session that ends, or whose deadline moves up, leaves
its old entry behind) and skipped when popped; `compact` rebuilds the heap when the
leftovers outnumber the live. The transfers C started keep their timers in C: `c_due`
is when the earliest of them is due, and `overdue` hands those to Python.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

from tftpd.worker.sessions import Session


class TimerHost(Protocol):
    """What the heap asks of the worker when a deadline comes."""

    def is_current(self, session: Session) -> bool: ...

    def read_transfer(self, session: Session) -> None: ...

    def apply(self, session: Session, actions: list, now: float) -> None: ...


class Timers:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Session]] = []
        self._seq = itertools.count()
        self.c_due = float("inf")  # the earliest OACK timer of a transfer C started

    def __len__(self) -> int:
        return len(self.heap)

    def next_due(self) -> float:
        return self.heap[0][0] if self.heap else float("inf")

    def arm(self, session: Session, deadline: float | None) -> None:
        """Keep one entry at the session's deadline when it moves up."""
        if deadline is not None and deadline < session.heap_deadline:
            session.heap_deadline = deadline
            heapq.heappush(self.heap, (deadline, next(self._seq), session))

    def c_started(self, due: float) -> None:
        """C started a transfer whose OACK timer is due at `due`."""
        if due < self.c_due:
            self.c_due = due

    def overdue(self, now: float, scan: Callable[[float], tuple[list[int], float]]
                ) -> list[int]:
        """The slots of C-started transfers whose timers are due (scan: Pump.overdue)."""
        if now < self.c_due:
            return []
        due, self.c_due = scan(now)
        return due

    def compact(self, is_current: Callable[[Session], bool]) -> None:
        """Drop the heap entries of finished transfers.

        Entries are left behind lazily (a probe ends long before its first timeout);
        at thousands of probes a second they would hold every finished session for a
        second or more. Rebuilding keeps the heap in proportion to live transfers.
        """
        live = [(deadline, seq, s) for deadline, seq, s in self.heap
                if is_current(s) and deadline == s.heap_deadline]
        heapq.heapify(live)
        self.heap = live

    def run(self, now: float, host: TimerHost) -> None:
        """Serve every deadline that has come."""
        while self.heap and self.heap[0][0] <= now:
            deadline, _, session = heapq.heappop(self.heap)
            if not host.is_current(session) or deadline != session.heap_deadline:
                # Finished since, or superseded by the earlier entry pushed when its
                # deadline moved up (that one is the session's, as in compact).
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
                host.read_transfer(session)
                if not host.is_current(session) or t.deadline is None:
                    continue
            if t.deadline > now:
                # Progress moved the deadline; one heap entry per session, re-armed.
                self.arm(session, t.deadline)
                continue
            host.apply(session, t.on_timer(now), now)
