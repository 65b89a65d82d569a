"""A model of the protocol drives the real daemon over loopback UDP, on both data paths.

Hypothesis's stateful testing draws sequences of client actions: reads (octet and
netascii, any option set, duplicates and invalid values included) and uploads, ACKs of a
whole window or of a block inside it, duplicate, stale and future ACKs, ACKs withheld
until the server's timer resends, DATA in order, repeated or ahead of a gap, datagrams
from a foreign port, ERRORs at any point, and files replaced, truncated or rewritten in
place while they are read. Every datagram the daemon sends is checked against the
model as it arrives:

- an OACK names only options the client asked, with the values the documented policy
  gives (blksize clamped to 65464, windowsize to 64 and to 128 KiB a window, timeout
  echoed exactly, tsize the size the client will receive);
- no DATA before ACK 0 when an OACK was sent; every DATA is a block of the file (of one
  version of it: never a mix of old and new) within the window the client's ACKs allow;
- only a timer resends: a repeated OACK, ACK or window comes no sooner than the RTO
  floor after the burst before it (kernel arrival timestamps), a window withheld is
  resent within the RTO the model expects, and never more tries than --retries allows;
- a peer that has acknowledged no DATA block is sent a block other than the first at
  most twice;
- a foreign port gets ERROR 5 and the transfer goes on;
- a read driven to its end delivers the file byte for byte; an upload's file is in place
  with its bytes once the last ACK arrives; each ending is logged with its outcome;
- after each example the daemon still serves a plain RRQ within 2 s.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import Daemon, datapaths, start_daemon
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tftpd import client
from tftpd import packet as P
from tftpd.transfer import FOREIGN_REPLIES

# -- the daemon's settings, and what the model derives from them --------------------------

INITIAL_RTO = 0.3  # s, -T: the RTO before a round trip has been measured
RTO_FLOOR = 0.2  # s, tftpd.transfer.RTO_FLOOR: no timer fires sooner after a send
RETRIES = 5  # --retries: timeouts in a row before an answered transfer is given up
UNANSWERED = 3  # tries for a transfer whose client has answered nothing
BLKSIZE_MAX = 65464
WINDOW_MAX = 64  # --windowsize default
WINDOW_BYTES = 128 * 1024  # --window-bytes default
EPS = 0.03  # s of slack for timer checks (kernel timestamps on loopback)
REPLY = 3.0  # s to wait for an answer the model says must come
SILENCE = 0.2  # s to watch for an answer the model says must not come

SO_TIMESTAMPNS = 35  # Linux; neither is exported by the socket module
SO_RCVBUFFORCE = 33

# Sizes around block boundaries (at the default 512 and at the small sizes drawn).
FILES = {"f0": 0, "f1": 1, "f511": 511, "f512": 512, "f1024": 1024, "f1500": 1500,
         "f4100": 4100}
UPLOADS = ("up0", "up1", "up2")
CI_EXAMPLES = 20
STEPS = 20


def netascii(raw: bytes) -> bytes:
    return raw.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def content(name: str, size: int, generation: int) -> bytes:
    """Bytes that differ from every other version (random bytes hold CRs and LFs)."""
    return random.Random(f"{name}/{generation}").randbytes(size)


def nblocks(size: int, blksize: int) -> int:
    return size // blksize + 1


def block(data: bytes, k: int, blksize: int) -> bytes:
    return data[(k - 1) * blksize:k * blksize]


# -- requests with any option list (duplicates and padding included) ---------------------

Pairs = list[tuple[str, str]]


def encode_request(opcode: int, name: str, mode: str, pairs: Pairs) -> bytes:
    body = b"".join(k.encode("latin-1") + b"\0" + v.encode("latin-1") + b"\0"
                    for k, v in pairs)
    return struct.pack("!H", opcode) + name.encode() + b"\0" + mode.encode() + b"\0" + body


def asked(pairs: Pairs) -> dict[str, str]:
    """The options as RFC 2347 reads them: names without case, the first one wins, an
    empty name ends the list (padding)."""
    out: dict[str, str] = {}
    for k, v in pairs[:P.MAX_OPTIONS]:
        if not k:
            break
        out.setdefault(k.lower(), v)
    return out


def number(value: str | None) -> int | None:
    if value is None or not value or len(value) > 20 or not value.isascii() \
            or not value.isdigit():
        return None
    return int(value)


def expected_oack(pairs: Pairs, size: int | None) -> dict[str, str]:
    """The OACK the documented policy gives (tftpd(8), RFC 2347-2349, 7440)."""
    want = asked(pairs)
    got: dict[str, int] = {}
    b = number(want.get("blksize"))
    if b is not None and b >= 8:
        got["blksize"] = min(b, BLKSIZE_MAX)
    t = number(want.get("tsize"))
    if t is not None:
        got["tsize"] = size if size is not None else t
    o = number(want.get("timeout"))
    if o is not None and 1 <= o <= 255:
        got["timeout"] = o
    w = number(want.get("windowsize"))
    if w is not None and w >= 1:
        by_bytes = max(1, WINDOW_BYTES // got.get("blksize", 512))
        got["windowsize"] = min(w, 65535, WINDOW_MAX, by_bytes)
    return {k: str(got[k]) for k in want if k in got}


def check_oack_bounds(oack: dict[str, str], pairs: Pairs) -> None:
    """What RFC 2347-2349 and 7440 allow, whatever the policy."""
    want = asked(pairs)
    for k, v in oack.items():
        assert k in want, f"OACK names {k!r}, which was not asked ({want})"
        n = number(v)
        assert n is not None, f"OACK {k}={v!r} is not a number"
        if k == "blksize":
            assert 8 <= n <= min(BLKSIZE_MAX, number(want[k]) or 0), oack
        elif k == "windowsize":
            assert 1 <= n <= min(65535, number(want[k]) or 0), oack
        elif k == "timeout":
            assert n == number(want[k]), oack


OPTION = st.one_of(
    st.tuples(st.just("blksize"),
              st.sampled_from(["8", "16", "100", "511", "512", "513", "1024", "1428",
                               "65464", "65465", "7", "0", "abc", "", "0512", "+16"])),
    st.tuples(st.just("tsize"), st.sampled_from(["0", "0", "12345", "x", "-1"])),
    st.tuples(st.just("timeout"), st.sampled_from(["1", "0", "256", "x", "2"])),
    st.tuples(st.just("windowsize"),
              st.sampled_from(["1", "2", "3", "4", "8", "16", "64", "65535", "0", "x"])),
    st.tuples(st.sampled_from(["foo", "multicast", "rollover", "utimeout"]),
              st.sampled_from(["1", "bar", ""])),
)
CASED = OPTION.flatmap(lambda kv: st.sampled_from([kv, (kv[0].upper(), kv[1])]))
OPTIONS = st.lists(CASED, max_size=5) | st.lists(CASED, max_size=3).map(
    lambda pairs: pairs + [("", ""), ("blksize", "16")])  # padding: the rest is ignored


# -- the client's sockets -------------------------------------------------------------------

class Endpoint:
    """One client port; datagrams come with their kernel arrival time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:  # windows resent while the model waits elsewhere must not overflow it
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.port = self.sock.getsockname()[1]

    def send(self, data: bytes, addr: tuple) -> float:
        """Send; return the time just before (anything sent in answer comes after)."""
        t = time.time()
        self.sock.sendto(data, addr)
        return t

    def recv(self, timeout: float) -> tuple[bytes, tuple, float] | None:
        self.sock.settimeout(max(timeout, 0.0) if timeout > 0 else 0.0)
        try:
            data, anc, _, src = self.sock.recvmsg(P.MAX_DATAGRAM, socket.CMSG_SPACE(16))
        except (TimeoutError, BlockingIOError):
            return None
        arrived = time.time()
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", raw[:16])
                arrived = sec + nsec / 1e9
        return data, src, arrived

    def close(self) -> None:
        self.sock.close()


class ModelError(AssertionError):
    pass


# -- a read, as the model sees it ------------------------------------------------------------

LIVE = ("oack", "data")


@dataclass
class Read:
    ep: Endpoint
    name: str
    mode: str
    pairs: Pairs
    versions: list[bytes]  # what the client may receive: the file at the start, or later
    tid: tuple = ("", 0)
    oack: dict[str, str] | None = None
    blksize: int = 512
    window: int = 1
    fixed: float | None = None  # the client's timeout option, when granted
    phase: str = "data"  # oack, data; done, ended (our ERROR), failed (theirs), gone
    last_acked: int = 0  # highest block the client has acknowledged
    prev_acked: int = 0  # the one before: the server may still resend from there
    sent_upto: int = 0  # highest block the client's ACKs let the server send
    got: dict[int, bytes] = field(default_factory=dict)
    prev_k: int | None = None  # the last DATA received, to tell bursts apart
    burst_t: float = 0.0  # arrival of the first datagram of the latest burst
    burst_timer: bool = False  # that burst was a timer's
    awaiting: int | None = None  # first block of the window the last progress ACK asked
    ack_t: float = 0.0
    timer_bursts: int = 0  # timer resends since the last progress
    ack0: bool = False
    foreign: int = 0  # ERROR 5s the server has sent to other ports of the client's host
    sends: dict[int, int] = field(default_factory=dict)  # receipts while nothing acked
    srtt: float = -1.0
    rttvar: float = 0.0
    outcome: str | None = None  # as the log must say it

    @property
    def live(self) -> bool:
        return self.phase in LIVE

    def wire(self) -> list[bytes]:
        return [netascii(v) if self.mode == "netascii" else v for v in self.versions]

    def candidates(self) -> list[bytes]:
        """The versions consistent with every block received so far."""
        out = []
        tsize = number((self.oack or {}).get("tsize"))
        for data in self.wire():
            if tsize is not None and len(data) != tsize:
                continue
            n = nblocks(len(data), self.blksize)
            if all(k <= n and block(data, k, self.blksize) == p for k, p in self.got.items()):
                out.append(data)
        return out

    def answered(self) -> bool:
        return self.last_acked > 0 or (self.oack is not None and self.ack0)

    def limit(self) -> int:
        return RETRIES if self.answered() else UNANSWERED

    def rto_bound(self) -> float:
        """An upper bound for the server's RTO now (RFC 6298 on our own samples)."""
        if self.fixed is not None:
            return self.fixed
        base = INITIAL_RTO if self.srtt < 0 else min(
            max(self.srtt + 4 * self.rttvar, RTO_FLOOR, INITIAL_RTO), 10.0)
        if self.answered():
            base = min(base * 2 ** self.timer_bursts, 10.0)
        return base

    def sample(self, r: float) -> None:
        if self.fixed is not None:
            return
        if self.srtt < 0:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def fail(self, what: str) -> ModelError:
        return ModelError(f"RRQ {self.name} {self.mode} {self.pairs} from port {self.ep.port} "
                          f"(phase {self.phase}, acked {self.last_acked}, window "
                          f"{self.window}, blksize {self.blksize}): {what}")

    def absorb(self, data: bytes, src: tuple, t: float) -> None:
        """Check one datagram from the server against the model."""
        if self.phase not in LIVE and self.phase != "done":
            return  # ended: late datagrams are checked no further
        if src != self.tid:
            raise self.fail(f"datagram from {src}, not the transfer's port {self.tid}")
        try:
            pkt = P.parse(data)
        except P.PacketError as err:
            raise self.fail(f"undecodable datagram {data[:20]!r}: {err}") from None
        if isinstance(pkt, P.Error):
            if pkt.code == 0 and len(self.versions) > 1 and "changed" in pkt.message:
                event("read: ERROR 0 after the file changed")
                self.phase, self.outcome = "failed", "failed"
                return
            raise self.fail(f"ERROR {pkt.code} {pkt.message!r}")
        if isinstance(pkt, P.OAck):
            if self.oack is None or pkt.options != self.oack:
                raise self.fail(f"OACK {pkt.options} (first OACK {self.oack})")
            self._timer_burst(t, "OACK")
            if self.last_acked > 0:
                raise self.fail("OACK resent after a DATA block was acknowledged")
            return
        if not isinstance(pkt, P.Data):
            raise self.fail(f"unexpected {pkt!r}")
        if self.phase == "oack":
            raise self.fail(f"DATA {pkt.block} before ACK 0 (an OACK was sent)")
        base = self.prev_acked
        k = base + ((pkt.block - base) & 0xFFFF)
        if not 1 <= k <= self.sent_upto:
            raise self.fail(f"DATA {pkt.block} (block {k}) beyond what was acknowledged "
                            f"(may send up to {self.sent_upto})")
        if self.awaiting is not None and k == self.awaiting and t >= self.ack_t:
            self.awaiting = None  # the window our ACK asked for
            self.burst_t, self.burst_timer = t, False
        elif self.prev_k is not None and k == self.prev_k + 1:
            pass  # the same burst goes on
        elif self.prev_k is None or k <= self.prev_k:
            if not self.prev_acked + 1 <= k <= self.last_acked + 1:
                raise self.fail(f"a resend starts at block {k}, not after the last ACK "
                                f"({self.prev_acked} or {self.last_acked})")
            self._timer_burst(t, f"DATA {k}")
        else:
            raise self.fail(f"block {k} after block {self.prev_k}: a gap in a burst")
        if self.last_acked == 0:
            self.sends[k] = self.sends.get(k, 0) + 1
            if k >= 2 and self.sends[k] > 2:
                raise self.fail(f"block {k} sent {self.sends[k]} times to a peer that has "
                                f"acknowledged no DATA (the window at most twice)")
        if k in self.got and self.got[k] != pkt.payload:
            raise self.fail(f"block {k} resent with other bytes")
        if len(pkt.payload) > self.blksize:
            raise self.fail(f"block {k} of {len(pkt.payload)} bytes > blksize")
        self.got[k] = pkt.payload
        if not self.candidates():
            raise self.fail(f"block {k} ({len(pkt.payload)} bytes) is in no version of the "
                            f"file (sizes {[len(w) for w in self.wire()]}): a mix or garbage")
        self.prev_k = k

    def _timer_burst(self, t: float, what: str) -> None:
        gap = t - self.burst_t
        if gap < RTO_FLOOR - EPS:
            raise self.fail(f"{what} resent {gap * 1000:.1f} ms after the burst before it: "
                            f"not a timer's resend")
        self.burst_t, self.burst_timer = t, True
        self.timer_bursts += 1
        event(f"read: timer resend of {what.split()[0]}")
        if self.timer_bursts > self.limit():
            raise self.fail(f"{self.timer_bursts} timer resends without progress, "
                            f"more than the {self.limit()} tries allowed")

    def window_end(self) -> int:
        ends = [nblocks(len(c), self.blksize) for c in self.candidates()]
        return min(self.last_acked + self.window, min(ends))

    def most_blocks(self) -> int:
        return max(nblocks(len(c), self.blksize) for c in self.wire())


# -- an upload ---------------------------------------------------------------------------------

@dataclass
class Upload:
    ep: Endpoint
    name: str
    pairs: Pairs
    tid: tuple = ("", 0)
    oack: dict[str, str] | None = None
    blksize: int = 512
    window: int = 1
    fixed: float | None = None
    data: bytes = b""
    phase: str = "recv"  # recv; done, ended, gone
    # the server's WriteTransfer, mirrored
    received: int = 0
    in_window: int = 0
    gap_acked: bool = False
    dallying: bool = False
    expected: deque[bytes] = field(default_factory=deque)
    last_pkt: bytes = b""
    last_t: float = 0.0
    resends: int = 0
    foreign: int = 0  # ERROR 5s the server has sent to other ports of the client's host
    timeouts: int = 0  # timer resends in all, progress or not
    outcome: str | None = None
    # The ACK last taken as foretold repeated the one before it after a full RTO: it
    # may have been the timer's resend, the foretold one then still to come.
    maybe_timer: bool = False

    @property
    def live(self) -> bool:
        return self.phase == "recv"

    @property
    def n(self) -> int:
        return nblocks(len(self.data), self.blksize)

    def fail(self, what: str) -> ModelError:
        return ModelError(f"WRQ {self.name} {self.pairs} from port {self.ep.port} (received "
                          f"{self.received}/{self.n}, window {self.window}, blksize "
                          f"{self.blksize}): {what}")

    def server_gets(self, k: int) -> None:
        """What WriteTransfer does with DATA k: the ACKs it will send, in order."""
        wire = k & 0xFFFF
        if self.dallying:
            if wire == self.received & 0xFFFF:
                self.expected.append(P.encode_ack(wire))
            return
        if k != self.received + 1:
            if not self.gap_acked:
                self.gap_acked = True
                self.in_window = 0
                self.expected.append(P.encode_ack(self.received & 0xFFFF))
            return
        self.received = k
        self.gap_acked = False
        self.in_window += 1
        self.resends = 0
        if k == self.n:
            self.dallying = True
            self.expected.append(P.encode_ack(wire))
        elif self.in_window >= self.window:
            self.in_window = 0
            self.expected.append(P.encode_ack(wire))

    def rto_bound(self) -> float:
        if self.fixed is not None:
            return self.fixed
        # The backoff lasts until the client shows progress (WriteTransfer).
        return min(INITIAL_RTO * 2 ** self.resends, 10.0)

    def absorb(self, data: bytes, src: tuple, t: float) -> None:
        if self.phase != "recv" and not (self.phase == "done" and self.dallying):
            return
        if src != self.tid:
            raise self.fail(f"datagram from {src}, not the transfer's port {self.tid}")
        floor = min(INITIAL_RTO, self.fixed or INITIAL_RTO) - EPS
        maybe_timer, self.maybe_timer = self.maybe_timer, False
        if self.expected and data == self.expected[0]:
            self.expected.popleft()
            self.maybe_timer = data == self.last_pkt and t - self.last_t >= floor
        elif data == self.last_pkt and (not self.dallying or self.expected):
            # (Dallying with ACKs still foretold: the timer fired before the server
            # read the last DATA, as below.)
            gap = t - self.last_t
            if gap < floor and maybe_timer:
                # The timer's resend came first and was taken for the foretold ACK
                # (the server read our DATA late, after its timer fired): this is
                # the foretold one, and the one before was the timer's.
                self.resends += 1
                self.timeouts += 1
                self.in_window = 0
                self.last_pkt, self.last_t = data, t
                return
            if gap < floor:
                raise self.fail(f"{P.parse(data)!r} repeated {gap * 1000:.1f} ms later: "
                                f"not a timer's resend")
            if self.expected:
                # The timer fired before the server read our DATA: its window count
                # restarted, so the ACKs foretold no longer hold. Rare; stop here.
                self.phase = "gone"
                return
            self.resends += 1
            self.timeouts += 1
            event("upload: timer resend")
            self.in_window = 0
            if self.resends > RETRIES:
                raise self.fail(f"{self.resends} timer resends, more than --retries")
        else:
            raise self.fail(f"unexpected {data[:30]!r} (expected "
                            f"{[bytes(e) for e in self.expected]}, last {self.last_pkt!r})")
        self.last_pkt, self.last_t = data, t


# -- the machine -----------------------------------------------------------------------------

Transfer = Read | Upload


class ProtocolModel(RuleBasedStateMachine):
    daemon: Daemon  # set per data path before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[Read] = []
        self.uploads: list[Upload] = []
        self.disk: dict[str, bytes] = {n: (self.daemon.root / n).read_bytes() for n in FILES}
        self.generation = int(time.time() * 1000) % 1_000_000_000

    @property
    def server(self) -> tuple:
        return (self.daemon.host, self.daemon.port)

    def live_reads(self) -> list[Read]:
        return [r for r in self.reads if r.live]

    def live_uploads(self) -> list[Upload]:
        return [u for u in self.uploads if u.live]

    # -- reading the sockets -----------------------------------------------------------------

    def drain(self, tr: Transfer) -> None:
        """Take in everything the server has sent this transfer so far."""
        for _ in range(100_000):
            got = tr.ep.recv(0)
            if got is None:
                break
            tr.absorb(*got)
        self.retire(tr)

    def retire(self, tr: Transfer) -> None:
        """A transfer the server may have given up on (its tries spent) is left alone."""
        if isinstance(tr, Read) and tr.live and tr.timer_bursts >= tr.limit():
            tr.phase = "gone"
        if isinstance(tr, Upload) and tr.live and tr.resends >= RETRIES:
            tr.phase = "gone"

    def wait_until(self, tr: Transfer, done: object, what: str, timeout: float = REPLY) -> None:
        """Read until `done()` holds (checking every datagram); fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while not done():  # type: ignore[operator]
            left = deadline - time.monotonic()
            got = tr.ep.recv(left) if left > 0 else None
            if got is None:
                raise tr.fail(f"{what}: nothing within {timeout} s")
            tr.absorb(*got)
            if not tr.live and tr.phase != "done":
                return

    # -- reads ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.reads) < 6)
    @rule(name=st.sampled_from(sorted(FILES)), mode=st.sampled_from(["octet", "netascii"]),
          pairs=OPTIONS)
    def start_read(self, name: str, mode: str, pairs: Pairs) -> None:
        ep = Endpoint()
        raw = self.disk[name]
        wire = netascii(raw) if mode == "netascii" else raw
        want = expected_oack(pairs, len(wire))
        r = Read(ep, name, mode, pairs, [raw])
        self.reads.append(r)
        t0 = ep.send(encode_request(P.RRQ, name, mode, pairs), self.server)
        got = ep.recv(REPLY)
        if got is None:
            raise r.fail(f"no answer to the RRQ within {REPLY} s")
        data, src, t = got
        assert src[1] != self.daemon.port, "a transfer answers from a port of its own"
        r.tid, r.burst_t, r.ack_t = src, t, t0
        pkt = P.parse(data)
        if want:
            if not isinstance(pkt, P.OAck):
                raise r.fail(f"answered {pkt!r}, want OACK {want}")
            check_oack_bounds(pkt.options, pairs)
            if pkt.options != want:
                raise r.fail(f"OACK {pkt.options}, want {want}")
            r.oack = pkt.options
            r.blksize = int(want.get("blksize", 512))
            r.window = int(want.get("windowsize", 1))
            r.fixed = float(want["timeout"]) if "timeout" in want else None
            r.phase = "oack"
        else:
            if not isinstance(pkt, P.Data) or pkt.block != 1:
                raise r.fail(f"answered {pkt!r}, want DATA 1 (no option to acknowledge)")
            r.sent_upto = 1
            r.awaiting = 1
            r.absorb(data, src, t)

    def pick(self, items: list, index: int) -> Transfer | None:
        for tr in items:
            self.drain(tr)
        live = [tr for tr in items if tr.live]
        return live[index % len(live)] if live else None

    @precondition(lambda self: self.reads)
    @rule(index=st.integers(0, 7), inside=st.integers(0, 100))
    def ack(self, index: int, inside: int) -> None:
        """ACK 0 after the OACK; else the window, or (inside > 70) a block inside it:
        RFC 7440's loss report, after which the next window starts there."""
        r = self.pick(self.reads, index)
        if r is None:
            return
        assert isinstance(r, Read)
        self.ack_read(r, inside)

    def ack_read(self, r: Read, inside: int = 0) -> None:
        if r.phase == "oack":
            t = r.ep.send(P.encode_ack(0), r.tid)
            if r.timer_bursts == 0:
                r.sample(t - r.burst_t)
            r.phase, r.ack0, r.ack_t = "data", True, t
            r.sent_upto = min(r.window, r.most_blocks())
            r.awaiting, r.timer_bursts = 1, 0
            return
        end = r.window_end()
        self.wait_until(r, lambda: all(k in r.got for k in range(r.last_acked + 1, end + 1)),
                        f"blocks {r.last_acked + 1}..{end} of the window")
        if not r.live:
            return
        target = end
        if inside > 70 and end - r.last_acked >= 2:
            target = r.last_acked + 1 + inside % (end - r.last_acked - 1)
        t = r.ep.send(P.encode_ack(target & 0xFFFF), r.tid)
        if target == end and not r.burst_timer:
            r.sample(t - r.burst_t)
        r.prev_acked, r.last_acked, r.ack_t = r.last_acked, target, t
        r.timer_bursts = 0
        last = [c for c in r.candidates() if nblocks(len(c), r.blksize) == target]
        if last:
            # The last block acknowledged: the transfer is over, byte for byte.
            got = b"".join(r.got[k] for k in range(1, target + 1))
            if got not in last:
                raise r.fail("the blocks received do not make the file")
            r.phase, r.outcome, r.awaiting = "done", "ok", None
            event("read: complete" + (" (the file changed meanwhile)"
                                      if len(r.versions) > 1 else ""))
            return
        r.awaiting = target + 1
        r.sent_upto = min(target + r.window, r.most_blocks())

    @precondition(lambda self: self.reads)
    @rule(index=st.integers(0, 7))
    def drive_to_end(self, index: int) -> None:
        r = self.pick(self.reads, index)
        if r is None:
            return
        assert isinstance(r, Read)
        for _ in range(70_000):
            if not r.live:
                break
            self.ack_read(r)
        assert not r.live or r.phase == "gone", r.fail("not over after every block")

    @precondition(lambda self: self.reads)
    @rule(index=st.integers(0, 7))
    def duplicate_ack(self, index: int) -> None:
        """Repeat the last ACK: never a resend on it (RFC 1123 4.2.3.1)."""
        r = self.pick([r for r in self.reads if r.ack0 or r.last_acked], index)
        if r is None:
            return
        assert isinstance(r, Read)
        t = r.ep.send(P.encode_ack(r.last_acked & 0xFFFF), r.tid)
        if r.last_acked > 0 and r.timer_bursts:
            r.timer_bursts = 0  # the client is there: the backoff and the count end
        if t - r.burst_t < 0.1:
            # A resend the duplicate caused would come now; the timer's cannot yet.
            deadline = time.monotonic() + 0.06
            while (left := deadline - time.monotonic()) > 0 and r.live:
                got = r.ep.recv(left)
                if got is None:
                    break
                r.absorb(*got)

    @precondition(lambda self: self.reads)
    @rule(index=st.integers(0, 7), future=st.booleans(), back=st.integers(1, 3))
    def stale_ack(self, index: int, future: bool, back: int) -> None:
        """An ACK of a block long acknowledged, or of one not sent yet: ignored."""
        r = self.pick(self.reads, index)
        if r is None:
            return
        assert isinstance(r, Read)
        if future:
            n = r.sent_upto + back
        elif r.last_acked >= back:
            n = r.last_acked - back
        else:
            return
        if r.phase == "oack" and n == 0:
            return
        r.ep.send(P.encode_ack(n & 0xFFFF), r.tid)

    @precondition(lambda self: self.reads or self.uploads)
    @rule(index=st.integers(0, 7))
    def withhold(self, index: int) -> None:
        """Send nothing: the server's timer resends, within its RTO."""
        tr = self.pick(self.reads + self.uploads, index)  # type: ignore[operator]
        if tr is None:
            return
        if isinstance(tr, Read):
            if tr.rto_bound() > 1.0 or tr.timer_bursts + 1 >= tr.limit():
                return
            before = tr.timer_bursts
            bound = tr.rto_bound() * 1.5 + 0.4
            wait = tr.burst_t + bound - time.time()
            self.wait_until(tr, lambda: tr.timer_bursts > before,
                            f"a timer resend (RTO at most ~{tr.rto_bound():.2f} s)",
                            max(wait, 0.05))
        else:
            if tr.rto_bound() > 1.0 or tr.resends + 1 >= RETRIES or tr.expected:
                return
            before = tr.resends
            bound = tr.rto_bound() * 1.5 + 0.4
            wait = tr.last_t + bound - time.time()
            self.wait_until(tr, lambda: tr.resends > before or not tr.live,
                            f"a timer resend of the last ACK (RTO ~{tr.rto_bound():.2f} s)",
                            max(wait, 0.05))
        self.retire(tr)

    @precondition(lambda self: self.reads or self.uploads)
    @rule(index=st.integers(0, 7), what=st.sampled_from(["ack", "data", "rrq"]))
    def foreign_tid(self, index: int, what: str) -> None:
        """A datagram from another port of the client's host: ERROR 5 to that port (the
        first FOREIGN_REPLIES times a transfer, then nothing), the transfer goes on."""
        tr = self.pick(self.reads + self.uploads, index)  # type: ignore[operator]
        if tr is None:
            return
        other = Endpoint()
        try:
            datagram = {"ack": P.encode_ack(1), "data": P.encode_data(1, b"x" * 10),
                        "rrq": P.encode_rrq("f1")}[what]
            other.send(datagram, tr.tid)
            answered = tr.foreign < FOREIGN_REPLIES
            got = other.recv(REPLY if answered else SILENCE)
            if got is None:
                if answered:
                    raise tr.fail(f"no ERROR 5 for a {what} from foreign port {other.port}")
                return
            data, src, _ = got
            if not answered:
                raise tr.fail(f"ERROR 5 number {tr.foreign + 1}, past {FOREIGN_REPLIES}")
            if src != tr.tid or P.parse(data) != P.Error(5, "Unknown transfer ID"):
                raise tr.fail(f"foreign port got {data!r} from {src}, want ERROR 5")
            tr.foreign += 1
        finally:
            other.close()

    @precondition(lambda self: self.reads or self.uploads)
    @rule(index=st.integers(0, 7), code=st.sampled_from([0, 8, 9, 1, 4]))
    def client_error(self, index: int, code: int) -> None:
        """ERROR from the client: after the OACK with 0, 8 or 9 a probe, else aborted."""
        tr = self.pick(self.reads + self.uploads, index)  # type: ignore[operator]
        if tr is None:
            return
        tr.ep.send(P.encode_error(code, "model says stop"), tr.tid)
        probe = isinstance(tr, Read) and tr.phase == "oack" and code in (0, 8, 9)
        tr.phase, tr.outcome = "ended", "probe" if probe else "aborted"

    @rule(name=st.sampled_from(sorted(FILES)),
          how=st.sampled_from(["replace", "truncate", "rewrite", "append"]),
          reading=st.integers(0, 9))
    def change_file(self, name: str, how: str, reading: int) -> None:
        """Replace (rename over), truncate, rewrite in place or append to a file: a read
        already running gets the whole old file, the whole new one, or an ERROR.
        Mostly (reading < 8) the file of a read that is running."""
        live = [r.name for r in self.reads if r.live]
        if live and reading < 8:
            name = live[reading % len(live)]
        path = self.daemon.root / name
        old = self.disk[name]
        self.generation += 1
        if how == "replace":
            new = content(name, FILES[name], self.generation)
            tmp = path.with_name(f".{name}.new")
            tmp.write_bytes(new)
            os.replace(tmp, path)
        elif how == "truncate":
            new = old[:len(old) // 2]
            with open(path, "r+b") as f:
                f.truncate(len(new))
        elif how == "rewrite":
            new = content(name, len(old), self.generation)
            with open(path, "r+b") as f:
                f.write(new)
        else:
            new = old + content(name, 100, self.generation)
            with open(path, "ab") as f:
                f.write(new[len(old):])
        if new == old:
            return
        self.disk[name] = new
        for r in self.reads:
            if r.name == name and r.live:
                r.versions.append(new)
                event(f"file {how} under a live read")

    # -- uploads -------------------------------------------------------------------------

    @precondition(lambda self: len(self.uploads) < 4)
    @rule(pairs=OPTIONS, full=st.integers(0, 6), tail=st.sampled_from([0, 1, -1, 37]))
    def start_upload(self, pairs: Pairs, full: int, tail: int) -> None:
        busy = {u.name for u in self.uploads if u.live}
        free = [n for n in UPLOADS if n not in busy]
        if not free:
            return
        name = free[0]
        want = expected_oack(pairs, None)
        ep = Endpoint()
        u = Upload(ep, name, pairs)
        self.uploads.append(u)
        ep.send(encode_request(P.WRQ, name, "octet", pairs), self.server)
        got = ep.recv(REPLY)
        if got is None:
            raise u.fail(f"no answer to the WRQ within {REPLY} s")
        data, src, t = got
        u.tid, u.last_pkt, u.last_t = src, data, t
        pkt = P.parse(data)
        if want:
            if not isinstance(pkt, P.OAck) or pkt.options != want:
                raise u.fail(f"answered {pkt!r}, want OACK {want}")
            check_oack_bounds(pkt.options, pairs)
            u.oack = pkt.options
            u.blksize = int(want.get("blksize", 512))
            u.window = int(want.get("windowsize", 1))
            u.fixed = float(want["timeout"]) if "timeout" in want else None
        elif pkt != P.Ack(0):
            raise u.fail(f"answered {pkt!r}, want ACK 0")
        size = full * u.blksize + (tail % u.blksize)
        self.generation += 1
        u.data = content(name, min(size, 300_000), self.generation)

    def send_blocks(self, u: Upload, blocks: list[int]) -> None:
        for k in blocks:
            u.ep.send(P.encode_data(k & 0xFFFF, block(u.data, k, u.blksize)), u.tid)
            u.server_gets(k)
        self.wait_until(u, lambda: not u.expected, "the ACKs the DATA call for")
        if u.live and u.dallying:
            # The last ACK came after the file was put in place.
            on_disk = (self.daemon.root / u.name).read_bytes()
            if on_disk != u.data:
                raise u.fail(f"{len(on_disk)} bytes on disk, uploaded {len(u.data)}")
            u.phase, u.outcome = "done", "ok"
            event("upload: in place")

    @precondition(lambda self: self.uploads)
    @rule(index=st.integers(0, 7), count=st.integers(1, 5))
    def upload_data(self, index: int, count: int) -> None:
        """The next `count` blocks in order (ACKs after each window, and the last)."""
        u = self.pick(self.uploads, index)
        if u is None:
            return
        assert isinstance(u, Upload)
        first = u.received + 1
        self.send_blocks(u, list(range(first, min(first + count, u.n + 1))))

    @precondition(lambda self: self.uploads)
    @rule(index=st.integers(0, 7), ahead=st.booleans())
    def upload_out_of_order(self, index: int, ahead: bool) -> None:
        """A block repeated, or one past a gap: the last block in order is ACKed once."""
        u = self.pick(self.uploads, index)
        if u is None:
            return
        assert isinstance(u, Upload)
        k = u.received + 2 if ahead else u.received
        if 1 <= k <= u.n:
            self.send_blocks(u, [k])

    @precondition(lambda self: self.uploads)
    @rule(index=st.integers(0, 7))
    def upload_to_end(self, index: int) -> None:
        u = self.pick(self.uploads, index)
        if u is None:
            return
        assert isinstance(u, Upload)
        for _ in range(10_000):
            if not u.live:
                break
            first = u.received + 1
            self.send_blocks(u, list(range(first, min(first + u.window, u.n + 1))))

    # -- after every step, and at the end -----------------------------------------------------

    @invariant()
    def datagrams_so_far_fit_the_model(self) -> None:
        for tr in [*self.reads, *self.uploads]:
            if tr.live:
                self.drain(tr)

    def teardown(self) -> None:
        try:
            ends: list[tuple[Transfer, str]] = []
            for tr in [*self.reads, *self.uploads]:
                if tr.live:
                    self.drain(tr)
                if tr.phase == "gone":  # perhaps given up on, perhaps not
                    tr.ep.send(P.encode_error(0, "model done"), tr.tid)
                if tr.live:
                    probe = isinstance(tr, Read) and tr.phase == "oack"
                    tr.ep.send(P.encode_error(8 if probe else 0, "model done"), tr.tid)
                    tr.phase, tr.outcome = "ended", "probe" if probe else "aborted"
                if tr.outcome is not None:
                    ends.append((tr, tr.outcome))
            # The daemon still serves a plain RRQ within 2 s.
            started = time.monotonic()
            res = client.get(self.daemon.host, self.daemon.port, "f1024", timeout=2.0,
                             retries=1)
            assert res.first_answer is not None and res.first_answer < 2.0, res
            assert res.data == self.disk["f1024"]
            assert time.monotonic() - started < 10
            for tr, outcome in ends:
                self.check_logged(tr, outcome)
        finally:
            for tr in [*self.reads, *self.uploads]:
                tr.ep.close()

    def check_logged(self, tr: Transfer, outcome: str) -> None:
        """Each ending has its log line (unless the per-address throttle held it)."""
        pattern = rf"127\.0\.0\.1:{tr.ep.port} file={re.escape(tr.name)} .*outcome={outcome}"
        try:
            self.daemon.wait_for_log(pattern, timeout=3.0)
        except AssertionError:
            if "more like this" in self.daemon.log_text():
                return
            line = [ln for ln in self.daemon.lines if f":{tr.ep.port} " in ln]
            raise tr.fail(f"no log line with outcome={outcome}; its lines: {line}") from None


# -- running it ------------------------------------------------------------------------------

def model_settings() -> settings:
    """CI's budget, unless a profile asking for more examples is loaded (deep)."""
    loaded = settings()
    default = settings.get_profile("default")
    examples = loaded.max_examples if loaded.max_examples > default.max_examples \
        else CI_EXAMPLES
    return settings(loaded, max_examples=examples, stateful_step_count=STEPS,
                    deadline=None)


@pytest.fixture(scope="module", params=datapaths())
def model_daemon(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp(f"model-{request.param}") / "root"
    root.mkdir()
    for name, size in FILES.items():
        (root / name).write_bytes(content(name, size, 0))
    d = start_daemon(root, "--workers", "2", "-c", "-p", "-T", str(int(INITIAL_RTO * 1e6)),
                     "--retries", str(RETRIES), "--drain-timeout", "2",
                     env={"TFTPD_DATAPATH": request.param})
    try:
        yield d
    finally:
        d.stop()


def test_protocol_model(model_daemon: Daemon) -> None:
    machine = type("ProtocolModelRun", (ProtocolModel,), {"daemon": model_daemon})
    run_state_machine_as_test(machine, settings=model_settings())


# -- examples the state machine found, kept as regression tests -----------------------

def test_upload_backoff_ends_with_progress(model_daemon: Daemon) -> None:
    ep = Endpoint()
    tid: tuple | None = None
    try:
        server = (model_daemon.host, model_daemon.port)
        ep.send(P.encode_wrq("up-backoff", "octet"), server)
        seen = [ep.recv(REPLY) for _ in range(3)]  # ACK 0, then two timer resends
        assert all(s is not None and P.parse(s[0]) == P.Ack(0) for s in seen), seen
        tid = seen[0][1]  # type: ignore[index]
        sent = ep.send(P.encode_data(1, bytes(512)), tid)  # progress
        ack = ep.recv(REPLY)
        assert ack is not None and P.parse(ack[0]) == P.Ack(1)
        resend = ep.recv(INITIAL_RTO * 1.5 + 0.2)  # nothing more: the timer's resend
        assert resend is not None and P.parse(resend[0]) == P.Ack(1), \
            f"no resend of ACK 1 within {INITIAL_RTO * 1.5 + 0.2:.2f} s of progress"
        assert resend[2] - sent < INITIAL_RTO * 1.5 + 0.1
    finally:
        if tid is not None:
            ep.send(P.encode_error(0, "done"), tid)
        ep.close()


def test_ack_of_the_window_after_block1_resend(model_daemon: Daemon) -> None:
    """Shrunk from the machine: start_read(f4100, windowsize=2), ack (ACK 0), withhold,
    withhold, drive_to_end (ACK 2: no DATA 3 ever comes)."""
    # A file of its own: the machine rewrites and truncates the shared ones.
    content = os.urandom(4100)
    (model_daemon.root / "window4100").write_bytes(content)
    ep = Endpoint()
    tid: tuple | None = None
    try:
        server = (model_daemon.host, model_daemon.port)
        ep.send(P.encode_rrq("window4100", "octet", {"windowsize": "2"}), server)
        first = ep.recv(REPLY)
        assert first is not None and P.parse(first[0]) == P.OAck({"windowsize": "2"})
        tid = first[1]
        ep.send(P.encode_ack(0), tid)
        blocks = []
        for _ in range(5):  # the window, its timer resend, then block 1 alone
            got = ep.recv(REPLY)
            assert got is not None
            pkt = P.parse(got[0])
            assert isinstance(pkt, P.Data), pkt
            blocks.append(pkt.block)
        assert blocks == [1, 2, 1, 2, 1], blocks
        ep.send(P.encode_ack(2), tid)  # the client has blocks 1 and 2
        got = ep.recv(0.5)  # the next window, at once
        assert got is not None and P.parse(got[0]) == P.Data(3, block(content, 3, 512)), got
    finally:
        if tid is not None:
            ep.send(P.encode_error(0, "done"), tid)
        ep.close()
