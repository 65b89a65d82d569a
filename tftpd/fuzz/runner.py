"""Play a scenario against a server and record every datagram, with its time.

The runner is a reader that does what the scenario says at each round and otherwise
behaves: it ACKs the highest block it has in order once a window is complete, ignores
copies, resends its last ACK after a second of silence (twice at most), and stops with
ERROR 0 when `limit_blocks` or `limit_seconds` run out. Every read has a timeout, every
loop a bound. Judging the trace is checks.py's job.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from tftpd.fuzz.scenario import Scenario, fields, oack_options, opcode

REPLY_WAIT = 1.0  # s: silence after which the client resends its last ACK
FIRST_WAIT = 0.5  # s: for the first answer to a request
JUNK_WAIT = 0.15  # s: for an answer to a first datagram that is no well-formed request
RESENDS = 2
FOREIGN_WAIT = 0.1  # s: for the answer to a foreign ACK
LINGER = 0.12  # s: listening after a repeated ACK at the end (see checks.SORCERER)
AFTER_LAST = 0.03  # s: listening after the ACK of what looked like the last block
LIVENESS = 2.0  # s: a plain RRQ must be answered within this


@dataclass
class Event:
    t: float  # seconds since the request was sent
    out: bool  # True: client -> server
    sock: str  # "main" or "foreign"
    to_listen: bool  # out only: sent to the listen port rather than the TID
    data: bytes
    block: int | None = None  # absolute block number of a DATA or an ACK


@dataclass
class Trace:
    events: list[Event] = field(default_factory=list)
    oack: dict[str, str] | None = None
    blksize: int = 512
    window: int = 1
    note: str = ""

    def add(self, ev: Event) -> None:
        self.events.append(ev)


def parse_hostport(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT; the port defaults to 69."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        return host, int(rest[1:]) if rest else 69
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    if ":" in text:
        return text, 69  # a bare IPv6 address
    return text, 69


def resolve(host: str, port: int) -> tuple[int, tuple]:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return info[0], info[4]


def _ack(block: int) -> bytes:
    return b"\0\4" + (block & 0xFFFF).to_bytes(2, "big")


def _error(code: int, text: str) -> bytes:
    return b"\0\5" + (code & 0xFFFF).to_bytes(2, "big") + text.encode() + b"\0"


class _Run:
    """One scenario's sockets and state."""

    def __init__(self, family: int, server: tuple, scenario: Scenario) -> None:
        self.server = server
        self.sc = scenario
        self.main = socket.socket(family, socket.SOCK_DGRAM)
        self.foreign = socket.socket(family, socket.SOCK_DGRAM)
        for s in (self.main, self.foreign):
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setblocking(False)
        self.tid: tuple | None = None
        self.trace = Trace()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + scenario.limit_seconds
        self.pending: deque[Event] = deque()
        self.rollover = 0  # 1 when the server goes from 65535 to 1, not 0
        self.next_block = 1  # absolute number of the next block wanted in order
        self.last_ack: int | None = None  # absolute block of our last right ACK
        self.round = 0  # rounds so far: OACKs and windows answered
        self.repeated_at: float | None = None  # when a dup or reorder last went out
        self.completed = False  # the last block was ACKed

    def close(self) -> None:
        self.main.close()
        self.foreign.close()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- receiving ---------------------------------------------------------------------

    def _absolute(self, raw: int) -> int:
        """The absolute number of a block number, taken nearest to the one expected."""
        exp = self.next_block
        if exp == 65536 and raw == 1 and self.rollover == 0:
            self.rollover = 1  # this server goes from 65535 to 1, not 0
        cycle = 65536 - self.rollover  # either way, n = raw (mod cycle)
        return max(0, raw + cycle * round((exp - raw) / cycle))

    def _read(self, sock: socket.socket, name: str) -> Event | None:
        try:
            data, src = sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # an ICMP error surfacing: nothing to read
        if src[0] != self.server[0]:
            return None  # another host entirely
        if name == "main" and self.tid is None:
            self.tid = src
        ev = Event(self.now(), False, name, False, data)
        if opcode(data) == 3 and len(data) >= 4:
            ev.block = self._absolute(int.from_bytes(data[2:4], "big"))
        self.trace.add(ev)
        return ev

    def drain(self) -> None:
        """Read everything already queued, so the trace keeps the true order."""
        while True:
            got = False
            for sock, name in ((self.main, "main"), (self.foreign, "foreign")):
                ev = self._read(sock, name)
                if ev is not None:
                    got = True
                    if name == "main":
                        self.pending.append(ev)
            if not got:
                return

    def recv(self, timeout: float) -> Event | None:
        """The next datagram on the main socket, within `timeout` (and the deadline)."""
        if self.pending:
            return self.pending.popleft()
        end = min(time.monotonic() + timeout, self.deadline)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.main, self.foreign], [], [], left)
            for sock in ready:
                name = "main" if sock is self.main else "foreign"
                ev = self._read(sock, name)
                if ev is not None and name == "main":
                    return ev

    def wait_foreign(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([self.main, self.foreign], [], [], left)
            for sock in ready:
                name = "main" if sock is self.main else "foreign"
                ev = self._read(sock, name)
                if ev is not None:
                    if name == "main":
                        self.pending.append(ev)
                    else:
                        return

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes, *, foreign: bool = False, listen: bool = False,
             block: int | None = None) -> None:
        self.drain()
        sock = self.foreign if foreign else self.main
        dest = self.server if listen or self.tid is None else self.tid
        ev = Event(self.now(), True, "foreign" if foreign else "main", dest == self.server
                   and self.tid != self.server, data, block)
        self.trace.add(ev)
        try:
            sock.sendto(data, dest)
        except OSError as exc:
            self.trace.note = f"send failed: {exc}"

    def send_ack(self, block: int, **kw: bool) -> None:
        raw = block if self.rollover == 0 or block < 65536 else (block - 1) % 65535 + 1
        self.send(_ack(raw), block=block, **kw)

    # -- the reader --------------------------------------------------------------------

    def react(self, right: int, previous: int | None) -> bool:
        """Apply this round's reaction; False when the client stops."""
        n = self.round
        self.round += 1
        if n < len(self.sc.reactions):
            r = self.sc.reactions[n]
        elif self.sc.finish == "abort":
            self.send(_error(0, "fuzz: abort"))
            return False
        else:
            r = None
        old = right if previous is None else previous
        if r is None or r.kind == "ack":
            self.send_ack(right)
        elif r.kind == "dup":
            self.send_ack(old)
            self.send_ack(right)
            self.repeated_at = time.monotonic()
        elif r.kind == "reorder":
            self.send_ack(right)
            self.send_ack(old)
            self.repeated_at = time.monotonic()
        elif r.kind == "delay":
            time.sleep(max(0, min(r.arg, 1000)) / 1000)
            self.send_ack(right)
        elif r.kind == "foreign":
            self.send_ack(right, foreign=True)
            self.wait_foreign(FOREIGN_WAIT)
            self.send_ack(right)
        elif r.kind == "error":
            self.send(_error(r.arg, "fuzz: error"))
            return False
        elif r.kind == "junk":
            self.send(r.data)
            self.send_ack(right)
        elif r.kind == "bigack":
            self.send(_ack(right).ljust(max(4, min(r.arg, 65000)), b"\xa5"), block=right)
        self.last_ack = right
        return True

    def run(self) -> Trace:
        self._drive()
        # Keep listening a moment: for the copies a repeated ACK would draw (when one was
        # sent last), or for DATA after what the client took for the last block.
        if self.repeated_at is not None and time.monotonic() - self.repeated_at < LINGER:
            self._listen(self.repeated_at + LINGER - time.monotonic())
        elif self.completed:
            self._listen(AFTER_LAST)
        self.drain()
        return self.trace

    def _listen(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.recv(left) is None:
                break

    def _drive(self) -> None:
        sc = self.sc
        req_op = opcode(sc.request)
        self.send(sc.request, listen=True)
        # Junk gets no answer from most servers: do not wait long for one.
        f = fields(sc.request)
        formed = req_op in (1, 2) and sc.request.endswith(b"\0") and len(f) >= 2 \
            and bool(f[0]) and bool(f[1])
        ev = self.recv(FIRST_WAIT if formed else JUNK_WAIT)
        if ev is None:
            return
        in_window = 0
        resends = 0
        final = False
        while True:
            op = opcode(ev.data)
            if op == 5:
                return  # ERROR: the transfer is over
            if req_op == 2 and op in (4, 6):
                self.send(_error(0, "fuzz: no upload"))  # never write to the server
                return
            if op == 6 and self.trace.oack is None and self.next_block == 1:
                oack = oack_options(ev.data)
                self.trace.oack = oack
                self.trace.blksize = _int(oack.get("blksize"), 512)
                self.trace.window = _int(oack.get("windowsize"), 1)
                if not self.react(0, None):
                    return
            elif op == 3 and ev.block is not None and ev.block == self.next_block:
                self.next_block += 1
                in_window += 1
                final = len(ev.data) - 4 < self.trace.blksize
                if final or in_window >= self.trace.window:
                    in_window = 0
                    right = self.next_block - 1
                    if right > sc.limit_blocks and not final:
                        self.send(_error(0, "fuzz: enough"))
                        return
                    if not self.react(right, self.last_ack):
                        return
                    if final:
                        self.completed = True
                        return
            # anything else (copies, strays, a late OACK) is recorded and ignored
            nxt = self.recv(REPLY_WAIT)
            if nxt is None:
                if time.monotonic() >= self.deadline or self.last_ack is None \
                        or resends >= RESENDS:
                    self.send(_error(0, "fuzz: timeout"))
                    return
                resends += 1
                in_window = 0
                self.send_ack(self.last_ack)
                continue
            resends = 0
            ev = nxt


def _int(text: str | None, default: int) -> int:
    try:
        value = int(text) if text is not None else default
    except ValueError:
        return default
    return value if value > 0 else default


def run(host: str, port: int, scenario: Scenario) -> Trace:
    family, server = resolve(host, port)
    r = _Run(family, server, scenario)
    try:
        return r.run()
    finally:
        r.close()


def plain_rrq(filename: str) -> bytes:
    return b"\0\1" + filename.encode() + b"\0octet\0"


def alive(host: str, port: int, filename: str, wait: float = LIVENESS) -> bool:
    """Does the server answer a plain RRQ within `wait` seconds (one resend half-way)?"""
    family, server = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        req = plain_rrq(filename)
        start = time.monotonic()
        for attempt in range(2):
            sock.sendto(req, server)
            end = start + wait * (attempt + 1) / 2
            while (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, src = sock.recvfrom(65536)
                except TimeoutError:
                    break
                except OSError:
                    continue
                if opcode(data) in (3, 5, 6):
                    if opcode(data) != 5:
                        sock.sendto(_error(0, "fuzz: liveness check done"), src)
                    return True
        return False
    finally:
        sock.close()
