"""Judge a recorded trace against the RFCs. Pure functions over runner.Trace.

Each violation names a clause from CLAUSES. The duplicate-ACK rule (SORCERER) is timed,
and written so that a server that retransmits only on its timer is never flagged:

    With a window of 1, let A be an ACK the client sends for a block it has ACKed before
    (a duplicate, or an older one after a newer one: reordered), sent within 30 ms of the
    previous datagram on the transfer (so right after the window it answers arrived, or
    right after the ACK it repeats). Let r be the longest the server has taken so far in
    this transfer to answer (request to first answer, fresh ACK to the next new block);
    if r is over 60 ms the machine is too slow to judge and A is not judged. A copy of a
    block already received that arrives less than T = min(2r + 40 ms, 120 ms) after A is
    a retransmission caused by A: a violation of RFC 1123 4.2.3.1.

The server's timer for that block started when it sent it, at most 30 ms + r/2 before
A, so a timer-driven copy arrives no sooner than 200 ms - 60 ms after A for any timer of
200 ms or more: RFC 1350 servers use seconds, tftpd's floor is 200 ms. Only an answer
to A comes sooner than T.
Windows above 1 are not judged: RFC 7440 has the sender go back on an ACK inside the
window, and which ACKs count as duplicates there is not settled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tftpd.fuzz.runner import Event, Trace
from tftpd.fuzz.scenario import fields, oack_options, opcode, request_options

CLAUSES = {
    "oack-names": "RFC 2347: an OACK names only options the request asked for",
    "oack-bounds": "RFC 2348 / RFC 7440 / RFC 2349: blksize and windowsize in an OACK are "
                   "within the range and at most the value asked; timeout is echoed exactly",
    "tsize": "RFC 2349: tsize in the OACK to an octet RRQ is the file's size",
    "data-before-ack0": "RFC 2347: after an OACK to an RRQ, no DATA before the client's ACK 0",
    "data-content": "RFC 1350: DATA block n holds the file's bytes at offset (n-1) x blksize, "
                    "and the blocks add up to the whole file",
    "block-size": "RFC 1350 / RFC 2348: every DATA block but the last holds exactly blksize "
                  "bytes, none more",
    "sorcerer": "RFC 1123 4.2.3.1: a duplicate ACK must not cause a retransmission "
                "(Sorcerer's Apprentice)",
    "invalid-option": "RFC 2347: an option with an invalid value is refused with ERROR 8 or "
                      "left out of the OACK, never acknowledged",
    "window": "RFC 1350 / RFC 7440: block n is sent only after the client's ACK of block "
              "n - windowsize",
    "foreign-tid": "RFC 1350 section 4: a packet from an unknown TID does not touch the "
                   "transfer (at most ERROR 5 answers it, never DATA or an OACK)",
    "liveness": "RFC 1350: the server keeps serving; a plain RRQ is answered within 2 s",
}

IMMEDIATE = 0.030  # s
SORCERER_MARGIN = 0.040  # s
SORCERER_CAP = 0.120  # s
SORCERER_SLOW = 0.060  # s: a slower server (or machine) is not judged

_STRICT = re.compile(r"[0-9]+")
_LENIENT = re.compile(r"\s*\+?[0-9]+\s*")


@dataclass(frozen=True)
class Violation:
    clause: str
    what: str
    at: float | None = None  # time in the trace, s

    def __str__(self) -> str:
        when = f" (t={self.at * 1000:.1f} ms)" if self.at is not None else ""
        return f"[{self.clause}] {self.what}{when}\n    breaks {CLAUSES[self.clause]}"


def _value(text: str) -> int | None:
    """A number as a server may read it: decimal, or with spaces or a '+' (strtol)."""
    if _STRICT.fullmatch(text) or _LENIENT.fullmatch(text):
        return int(text.strip().lstrip("+"))
    return None


_RANGES = {"blksize": (8, None), "windowsize": (1, None), "timeout": (1, 255),
           "tsize": (0, None)}


def _valid(name: str, text: str) -> int | None:
    n = _value(text)
    if n is None:
        return None
    low, high = _RANGES[name]
    if n < low or (high is not None and n > high):
        return None
    return n


def check_oack(request: bytes, oack: dict[str, str], size: int | None, at: float
               ) -> list[Violation]:
    """`size`: the file's size when the request is an octet RRQ of the oracle file."""
    out: list[Violation] = []
    asked = request_options(request)
    for name, value in oack.items():
        if name not in asked:
            out.append(Violation("oack-names", f"OACK carries {name}={value!r}, which the "
                                 f"request did not ask for", at))
            continue
        if name not in _RANGES:
            continue
        valid = [v for v in (_valid(name, x) for x in asked[name]) if v is not None]
        if not valid:
            out.append(Violation("invalid-option", f"OACK acknowledges {name}={value!r} for "
                                 f"the invalid value(s) {asked[name]!r}", at))
            continue
        got = _value(value)
        if name == "tsize":
            if size is not None and got != size:
                out.append(Violation("tsize", f"OACK tsize={value!r}, the file has {size} "
                                     "bytes", at))
            continue
        if got is None:
            out.append(Violation("oack-bounds", f"OACK {name}={value!r} is not a number", at))
        elif name == "timeout":
            if got not in valid:
                out.append(Violation("oack-bounds", f"OACK timeout={value!r}, asked "
                                     f"{asked[name]!r}", at))
        else:
            top = 65464 if name == "blksize" else 65535
            if got > max(valid) or got < _RANGES[name][0] or got > top:
                out.append(Violation("oack-bounds", f"OACK {name}={value!r}, asked "
                                     f"{asked[name]!r}", at))
    return out


def _first_fields(request: bytes) -> tuple[str | None, str | None]:
    f = fields(request)
    if len(f) < 2:
        return None, None
    return f[0].decode("latin-1"), f[1].decode("latin-1").lower()


def check(trace: Trace, request: bytes, filename: str, oracle: bytes,
          oracle_netascii: bytes) -> list[Violation]:
    events = trace.events
    if not events:
        return []
    is_rrq = opcode(request) == 1
    name, mode = _first_fields(request)
    ours = is_rrq and name == filename
    expect = oracle if mode == "octet" else oracle_netascii if mode == "netascii" else None
    if not ours:
        expect = None
    out = _foreign_tid(events)
    main = [e for e in events if e.sock == "main"]
    oack_at: float | None = None
    for e in main:
        if not e.out and opcode(e.data) == 6:
            if is_rrq or opcode(request) == 2:
                out += check_oack(request, oack_options(e.data),
                                  len(oracle) if ours and mode == "octet" else None, e.t)
            oack_at = e.t
            break
    if not is_rrq:
        return out
    download = _Download(trace, expect, oack_at, events[0].t)
    for e in main[1:]:
        download.see(e)
    return _dedupe(out + download.out)


def _foreign_tid(events: list[Event]) -> list[Violation]:
    """Answers to the foreign socket."""
    return [Violation("foreign-tid", f"{'DATA' if opcode(e.data) == 3 else 'OACK'} "
                      "sent to a foreign port", e.t)
            for e in events
            if not e.out and e.sock == "foreign" and opcode(e.data) in (3, 6)]


class _Download:
    """The clauses on the DATA of one RRQ, judged event by event in the order sent:
    data-before-ack0 and window (`_fresh`), sorcerer (`_ack`, `_repeat`), block-size
    (`_fresh`, `_size`) and data-content (`_content`)."""

    def __init__(self, trace: Trace, expect: bytes | None, oack_at: float | None,
                 start: float) -> None:
        self.out: list[Violation] = []
        self.expect = expect
        self.oack_at = oack_at
        self.blksize = trace.blksize if trace.oack is not None else 512
        self.window = trace.window if trace.oack is not None else 1
        self.acked = -1 if trace.oack is not None else 0  # highest block our ACKs allowed
        self.seen: set[int] = set()
        self.short_at: int | None = None
        self.answers: list[float] = []  # response latencies, for the sorcerer rule
        self.waiting_since: float | None = start  # a fresh ACK (or the request) unanswered
        self.repeats: list[tuple[float, float]] = []  # (time of a repeated ACK, T for it)
        self.acks_sent: set[int] = set()
        self.top_ack = -1
        self.prev_t = start

    def see(self, e: Event) -> None:
        op = opcode(e.data)
        if e.out:
            if op == 4 and e.block is not None and len(e.data) >= 4:
                self._ack(e, e.block)
            self.prev_t = e.t
            return
        self.prev_t = e.t
        if op == 6 and self.waiting_since is not None and not self.answers:
            self.answers.append(e.t - self.waiting_since)
            self.waiting_since = None
        if op != 3 or e.block is None:
            return
        b = e.block
        payload = e.data[4:]
        if b not in self.seen:
            self._fresh(e, b)
        else:
            self._repeat(e, b)
        self._size(e, b, payload)
        self._content(e, b, payload)

    def _ack(self, e: Event, block: int) -> None:
        """An ACK we sent: a repeated one arms the sorcerer rule, a fresh one is waited on."""
        if block in self.acks_sent or block < self.top_ack:
            r = max(self.answers, default=0.0)
            if self.window == 1 and e.t - self.prev_t <= IMMEDIATE and r <= SORCERER_SLOW:
                self.repeats.append((e.t, min(2 * r + SORCERER_MARGIN, SORCERER_CAP)))
        else:
            self.waiting_since = e.t
        self.acks_sent.add(block)
        self.top_ack = max(self.top_ack, block)
        self.acked = max(self.acked, block)

    def _fresh(self, e: Event, b: int) -> None:
        """The first copy of block B: data-before-ack0, window, a block after a short one."""
        if self.waiting_since is not None:
            self.answers.append(e.t - self.waiting_since)
            self.waiting_since = None
        if self.acked < 0:
            self.out.append(Violation(
                "data-before-ack0", f"DATA {b} {1000 * (e.t - self.oack_at):.1f}"
                " ms after the OACK, before any ACK 0"
                if self.oack_at is not None else f"DATA {b} before ACK 0", e.t))
            self.acked = 0  # report once
        elif b > self.acked + self.window:
            self.out.append(Violation("window", f"DATA {b} sent while the client had ACKed "
                                      f"only block {self.acked} (window {self.window})", e.t))
        if self.short_at is not None and b > self.short_at:
            self.out.append(Violation("block-size", f"DATA {self.short_at} held fewer than "
                                      f"{self.blksize} bytes, yet block {b} followed", e.t))
            self.short_at = None
        self.seen.add(b)

    def _repeat(self, e: Event, b: int) -> None:
        """A copy of block B again: too soon after a repeated ACK is the sorcerer's."""
        for t_a, limit in self.repeats:
            if 0 <= e.t - t_a < limit:
                self.out.append(Violation("sorcerer", f"DATA {b} sent again "
                                          f"{1000 * (e.t - t_a):.1f} ms after a repeated ACK "
                                          f"(a timer would take over {1000 * limit:.0f} ms)",
                                          e.t))
                self.repeats = []
                break

    def _size(self, e: Event, b: int, payload: bytes) -> None:
        if len(payload) > self.blksize:
            self.out.append(Violation("block-size", f"DATA {b} holds {len(payload)} bytes, "
                                      f"blksize is {self.blksize}", e.t))
        elif len(payload) < self.blksize and self.short_at is None:
            self.short_at = b

    def _content(self, e: Event, b: int, payload: bytes) -> None:
        if self.expect is None or b < 1:
            return
        off = (b - 1) * self.blksize
        want = self.expect[off:off + self.blksize]
        if payload != want and len(payload) <= self.blksize:
            diff = next((i for i, (x, y) in enumerate(zip(payload, want, strict=False))
                         if x != y), min(len(payload), len(want)))
            self.out.append(Violation("data-content", f"DATA {b} ({len(payload)} bytes) "
                                      f"differs from the file at offset {off + diff} (file "
                                      f"has {len(want)} bytes there)", e.t))


def _dedupe(vs: list[Violation]) -> list[Violation]:
    seen: set[str] = set()
    out = []
    for v in vs:
        if v.clause not in seen:
            seen.add(v.clause)
            out.append(v)
    return out


def render(events: list[Event]) -> str:
    """The datagrams as Python bytes literals, with direction and time."""
    lines = []
    for e in events:
        if e.out:
            arrow = f"client{'(foreign)' if e.sock == 'foreign' else ''} -> " \
                    f"{'listen port' if e.to_listen else 'server TID'}"
        else:
            arrow = f"server -> client{'(foreign)' if e.sock == 'foreign' else ''}"
        data = e.data if len(e.data) <= 40 else e.data[:40]
        more = f" + {len(e.data) - 40} more bytes" if len(e.data) > 40 else ""
        lines.append(f"  {1000 * e.t:9.1f} ms  {arrow:32} {data!r}{more}")
    return "\n".join(lines)
