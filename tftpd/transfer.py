"""The read-transfer state machine (RFC 1350, 2347, 7440), sans I/O.

Everything that affects a transfer's state lives here. The worker feeds it datagrams
(`on_datagram`) and the clock (`on_timer`); it answers with actions for the worker to
carry out. No socket, clock or file inside: hypothesis drives it with a fake clock.

Blocks are counted by absolute index k = 1, 2, ... so that block numbers rolling
over past 65535 (more than once, files past 4 GiB) are only a matter of encoding:
`wire_block` maps k to the 16-bit number on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from tftpd import packet as P

# The Sorcerer's Apprentice bug (RFC 1123 4.2.3.1): only a timer retransmits.
RTO_FLOOR = 0.2  # s; loopback RTTs are microseconds, but a storm's queueing is not
RTO_CEILING = 10.0  # s
DEFAULT_RETRIES = 8
# An address that has not proved it is there must not be sent much: a spoofed RRQ (and
# a spoofed ACK 0) must not turn the server into an amplifier aimed at its owner.
# - A transfer the client has never answered gives up after this many tries, without
#   backing off (its slot is held seconds, not the 15 s a backoff from 1 s makes).
UNANSWERED_RETRIES = 3
# - One that has acknowledged no DATA block yet (ACK 0 at most) is sent its first
#   window, that window once more, then only its first block on each later timeout:
#   two windows and a few blocks in all, whatever the windowsize.
# - A datagram to a transfer's port from another TID gets ERROR 5 (RFC 1350) only from
#   the client's own host, and this many times per transfer at most. Answering another
#   host would tell it that the port is a live transfer, and the random port is all that
#   keeps a spoofer from acknowledging blocks for its victim; answering without bound
#   would make the port a reflector.
FOREIGN_REPLIES = 3


def foreign_reply(peer: tuple, src: tuple, replied: int) -> list[Action]:
    """What a datagram from `src`, not the transfer's `peer`, is answered with."""
    if src[0] != peer[0] or replied >= FOREIGN_REPLIES:
        return []
    return [SendTo(src, P.encode_error(P.E_UNKNOWN_TID, "Unknown transfer ID"))]


def wire_block(k: int, rollover: int = 0) -> int:
    """The 16-bit block number of absolute block k (rollover to 0 or 1 past 65535).
    C twin: tftpd_wire_block (_ext/tftpd_send.c)."""
    if k < 65536:
        return k
    return rollover + (k - 65536) % (65536 - rollover)


# ERROR codes that answer an OACK when the client only wanted its tsize: an existence
# probe (PXE, EDK2, U-Boot send 8; GRUB and others 0; Qualcomm modems 9).
PROBE_END_CODES = frozenset({0, 8, 9})


def is_probe_end(datagram: bytes) -> bool:
    """The datagram is ERROR 0, 8 or 9: to an OACK, an existence probe's end.
    C twin: tftpd_is_probe_end (_ext/tftpd_ack.c)."""
    return len(datagram) >= 4 and datagram[:3] == b"\x00\x05\x00" \
        and datagram[3] in PROBE_END_CODES


def block_count(size: int, blksize: int) -> int:
    """Blocks needed for `size` bytes; a size that is a multiple ends with an empty block."""
    return size // blksize + 1


@dataclass(frozen=True, slots=True)
class Send:
    """Send this datagram to the transfer's peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendTo:
    """Send this datagram to another address (ERROR 5 to a foreign TID)."""

    addr: tuple
    data: bytes


@dataclass(frozen=True, slots=True)
class SendBlocks:
    """Send DATA blocks first .. first+count-1 (absolute indices) to the peer."""

    first: int
    count: int


@dataclass(frozen=True, slots=True)
class Finish:
    """The transfer is over; `outcome` is ok, probe, aborted or failed."""

    outcome: str
    detail: str = ""


Action = Send | SendTo | SendBlocks | Finish

OACK_SENT, SENDING, DONE = "oack-sent", "sending", "done"


class XferState:
    """The numbers of a read transfer, in the shape of C's `struct tftpd_xfer`.

    The pure-Python twin of the C struct: with the C data path the worker hands
    ReadTransfer a cffi struct instead, and C's pump answers the common ACK itself,
    with the same rules as `ReadTransfer._on_ack` (see _ext/tftpd_ack.c).
    """

    __slots__ = ("sock", "fd", "addrlen", "addr", "filesize", "nblocks", "last_acked",
                 "sent_upto", "retransmits", "blksize", "windowsize", "rollover", "fast",
                 "resent", "fixed_rto", "retries", "sent_at", "armed_at", "rto", "base_rto",
                 "srtt", "rttvar", "gso")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class ReadTransfer:
    """Serve one RRQ: `size` bytes in blocks of `blksize`, `windowsize` at a time."""

    def __init__(self, peer: tuple, size: int, *, blksize: int = 512, windowsize: int = 1,
                 oack: dict[str, str] | None = None, timeout: float | None = None,
                 client_timeout: bool = False, retries: int = DEFAULT_RETRIES,
                 rollover: int = 0, state: object | None = None,
                 oack_packet: bytes | None = None) -> None:
        self.peer = peer
        self.oack = oack
        self.foreign_replies = 0  # ERROR 5s sent to other TIDs
        # The encoded OACK, when the caller has it already (the same for every
        # transfer of the same request): P.encode_oack(oack) otherwise.
        self._oack_packet = oack_packet if oack else None
        self.retries_max = retries
        s = self.s = state if state is not None else XferState()
        s.filesize = size
        s.blksize = blksize
        s.windowsize = windowsize
        s.rollover = rollover
        s.nblocks = block_count(size, blksize)
        s.last_acked = 0  # highest absolute block the client has acknowledged
        s.sent_upto = 0  # highest absolute block sent
        s.retries = 0  # consecutive timeouts without progress
        s.retransmits = 0  # blocks (or OACKs) sent again, for the log
        # A timeout the client asked for (RFC 2349) is used as it is; otherwise the
        # retransmission timeout adapts to measured round trips (RFC 6298 style).
        s.fixed_rto = 1 if client_timeout else 0
        s.base_rto = timeout if timeout is not None else 1.0  # from RTT samples
        s.rto = s.base_rto  # base_rto backed off by the timeouts in a row
        s.srtt = -1.0  # no sample yet
        s.rttvar = 0.0
        s.sent_at = 0.0
        s.armed_at = 0.0
        s.resent = 0  # Karn: no RTT sample from a retransmitted window
        s.fast = 0  # 1 while sending: C's pump may answer ACKs itself
        s.gso = 1  # its route takes UDP segmentation, until it refuses (the data path's)
        self.state = OACK_SENT if oack else SENDING
        self.outcome: str | None = None
        self.detail = ""
        # The peer has sent us a well-formed datagram at the transfer's port, one it
        # could only learn from our answer: the address is its own (logs.Throttle).
        self.heard = False

    @property
    def answered(self) -> bool:
        """The peer answered from its address (C's pump counts its ACKs here)."""
        return self.heard or self.s.last_acked > 0

    # -- read-only views for the worker, logs and tests -------------------------------

    size = property(lambda self: self.s.filesize)
    blksize = property(lambda self: self.s.blksize)
    windowsize = property(lambda self: self.s.windowsize)
    rollover = property(lambda self: self.s.rollover)
    nblocks = property(lambda self: self.s.nblocks)
    last_acked = property(lambda self: self.s.last_acked)
    sent_upto = property(lambda self: self.s.sent_upto)
    retransmits = property(lambda self: self.s.retransmits)
    retries = property(lambda self: self.s.retries)
    rto = property(lambda self: self.s.rto)
    base_rto = property(lambda self: self.s.base_rto)

    @property
    def deadline(self) -> float | None:
        """When the timer fires: derived, so C's progress moves it without Python."""
        if self.state == DONE:
            return None
        return self.s.armed_at + self.s.rto

    @property
    def bytes_sent(self) -> int:
        """Payload bytes the client has acknowledged."""
        return min(self.s.last_acked * self.s.blksize, self.s.filesize)

    # -- the worker's entry points -------------------------------------------------

    def start(self, now: float) -> list[Action]:
        if self.oack:
            return [self._arm(now, Send(self._oack_bytes()))]
        self.s.fast = 1
        return [self._send_window(now, 1)]

    def on_datagram(self, data: bytes, src: tuple, now: float) -> list[Action]:
        if self.state == DONE:
            return []
        if src != self.peer:  # another TID: the transfer goes on
            out = foreign_reply(self.peer, src, self.foreign_replies)
            self.foreign_replies += len(out)
            return out
        try:
            pkt = P.parse(data)
        except P.PacketError:
            return []  # garbage from our own peer: ignore, the timer covers loss
        self.heard = True
        if isinstance(pkt, P.Ack):
            return self._on_ack(pkt.block, now)
        if isinstance(pkt, P.Error):
            return self._on_error(pkt)
        return []  # a stray RRQ/DATA/OACK on a read transfer: nothing to do

    def on_timer(self, now: float) -> list[Action]:
        deadline = self.deadline
        if deadline is None or now < deadline:
            return []
        s = self.s
        answered = self._acknowledged()
        limit = self.retries_max if answered else min(self.retries_max, UNANSWERED_RETRIES)
        if s.retries >= limit:
            return [self._finish("failed", "timeout: client stopped answering")]
        s.retries += 1
        s.resent = 1
        if not s.fixed_rto and answered:
            # Exponential backoff; it lasts until the client shows progress again
            # (see _progress), so one loss does not slow the rest of the transfer.
            s.rto = min(s.base_rto * 2 ** s.retries, RTO_CEILING)
        if self.state == OACK_SENT:
            s.retransmits += 1
            return [self._arm(now, Send(self._oack_bytes()), fresh=False)]
        if s.last_acked > 0 or s.retries <= 1:
            action: Action = self._send_window(now, s.last_acked + 1, fresh=False)
            s.retransmits += action.count
        else:
            # Block 1 alone. The window in flight stays what it was: the client may
            # hold all of it, and its ACK of any of it must still count.
            action = self._arm(now, SendBlocks(1, 1), fresh=False)
            s.retransmits += 1
        return [action]

    def on_repeat(self, now: float) -> list[Action]:
        """The same RRQ again, from the same address and port (merged, never a second
        transfer). While the client has answered nothing, it did not get our first
        packet: it is sent again at once, unless we sent it less than RTO_FLOOR ago
        (legacy ROMs send every RRQ twice, microseconds apart). A PXE ROM that
        reboots reuses its port too; a stale transfer must not swallow its requests
        until the timer backs off to nothing. C twin of the OACK_SENT case, for a
        transfer C started: tftpd_repeat (_ext/tftpd_requests.c)."""
        s = self.s
        if now - s.armed_at < RTO_FLOOR or s.last_acked > 0 \
                or s.retries >= UNANSWERED_RETRIES:
            return []
        if self.state == OACK_SENT:
            action: Action = self._arm(now, Send(self._oack_bytes()), fresh=False)
            s.retransmits += 1
        elif self.state == SENDING and not self.oack:  # (with one, ACK 0 answered it)
            action = self._send_window(now, 1, fresh=False)
            s.retransmits += action.count
        else:
            return []
        # A try like a timer's: a spoofed RRQ repeated does not hold the slot longer.
        s.resent = 1
        s.retries += 1
        return [action]

    def fail(self, detail: str) -> Finish:
        """The worker could not go on (a send failed, the file shrank)."""
        return self._finish("failed", detail)

    def end(self, outcome: str, detail: str) -> Finish:
        """Ended from outside (superseded, a socket error, shutdown): as it says, since
        a read is done only when its last block is acknowledged."""
        return self._finish(outcome, detail)

    def on_pumped_done(self) -> list[Action]:
        """C's pump saw the last ACK (and finished the numbers); close the books."""
        return [self._finish("ok")]

    # -- internals -----------------------------------------------------------------

    def _oack_bytes(self) -> bytes:
        if self._oack_packet is None:
            self._oack_packet = P.encode_oack(self.oack or {})
        return self._oack_packet

    def _arm(self, now: float, action: Action, fresh: bool = True) -> Action:
        s = self.s
        if fresh:
            s.sent_at = now
            s.resent = 0
        s.armed_at = now
        return action

    def _send_window(self, now: float, first: int, fresh: bool = True) -> SendBlocks:
        """The window from `first`. C twin: tftpd_next_window (_ext/tftpd_ack.c)."""
        s = self.s
        count = min(s.windowsize, s.nblocks - first + 1)
        s.sent_upto = first + count - 1
        action = SendBlocks(first, count)
        self._arm(now, action, fresh)
        return action

    def _absolute(self, n: int) -> int | None:
        """The absolute block acknowledged by wire number n, or None if not in flight.
        C twin: tftpd_absolute (_ext/tftpd_ack.c)."""
        s = self.s
        base = s.last_acked
        for cycle in (65536, 65535) if s.rollover else (65536,):
            k = base + (n - wire_block(base, s.rollover)) % cycle
            if k <= s.sent_upto and wire_block(k, s.rollover) == n:
                return k
        return None

    def _sample_rtt(self, now: float) -> None:
        """An RTT sample and the RTO from it. C twin: tftpd_sample_rtt (tftpd_ack.c)."""
        s = self.s
        if s.fixed_rto or s.resent:
            return
        r = max(0.0, now - s.sent_at)
        if s.srtt < 0:
            s.srtt, s.rttvar = r, r / 2
        else:
            s.rttvar = 0.75 * s.rttvar + 0.25 * abs(s.srtt - r)
            s.srtt = 0.875 * s.srtt + 0.125 * r
        s.base_rto = min(max(s.srtt + 4 * s.rttvar, RTO_FLOOR), RTO_CEILING)
        s.rto = s.base_rto

    def _acknowledged(self) -> bool:
        """The client has acknowledged something of ours: a DATA block, or the OACK."""
        return self.s.last_acked > 0 or (self.oack is not None and self.state != OACK_SENT)

    def _progress(self) -> None:
        s = self.s
        s.retries = 0
        s.rto = s.base_rto

    def _on_ack(self, n: int, now: float) -> list[Action]:
        """C twin (once SENDING, for the ACKs C's pump answers): tftpd_on_ack
        (_ext/tftpd_ack.c)."""
        s = self.s
        if self.state == OACK_SENT:
            if n != 0:
                return []
            self._sample_rtt(now)
            self.state = SENDING
            s.fast = 1
            self._progress()
            return [self._send_window(now, 1)]
        # C's tftpd_pump does exactly this for the ACKs it answers; keep them alike.
        k = self._absolute(n)
        if k is None or k == s.last_acked:
            # A duplicate or stale ACK: never resend on it (Sorcerer's Apprentice).
            if k is not None and s.retries:
                self._revive(now)
            return []
        complete = k == s.sent_upto
        if complete:
            self._sample_rtt(now)
        s.last_acked = k
        self._progress()
        if k == s.nblocks:
            return [self._finish("ok")]
        if not complete:
            # RFC 7440: an ACK inside the window means the client lost block k+1;
            # the next window starts there.
            s.retransmits += s.sent_upto - k
        return [self._send_window(now, k + 1)]

    def _revive(self, now: float) -> None:
        """The client repeats its ACK while we back off: it is there and still waits,
        so our retransmissions are what gets lost. The backoff ends, and so does the
        count of timeouts (a client that keeps asking is not given up on); the timer
        comes within RTO_FLOOR, not at once: only a timer retransmits (RFC 1123
        4.2.3.1). A storm's RTT samples can put the base RTO at seconds; under 5 %
        loss its backoff outlasted a PXE client's 6 s of patience."""
        s = self.s
        deadline = min(s.armed_at + s.rto, now + RTO_FLOOR)
        if s.last_acked > 0:
            self._progress()
        else:
            # Until a DATA block is acknowledged the tries keep counting: a repeated
            # ACK 0, which anyone who knows the port can spoof, buys no more of them.
            s.rto = s.base_rto
        s.armed_at = deadline - s.rto

    def _on_error(self, pkt: P.Error) -> list[Action]:
        if self.state == OACK_SENT and pkt.code in PROBE_END_CODES:
            # A client that read the OACK's tsize and stops: an existence probe.
            return [self._finish("probe")]
        return [self._finish("aborted", f"client error {pkt.code}: {pkt.message}")]

    def _finish(self, outcome: str, detail: str = "") -> Finish:
        self.state = DONE
        self.s.fast = 0
        self.outcome = outcome
        self.detail = detail
        return Finish(outcome, detail)


# -- receiving -------------------------------------------------------------------------

class Receiver:
    """The receiving side's block rules (RFC 1350, 7440), sans I/O: the server's upload
    (WriteTransfer, DATA in answer to its ACK 0 or OACK) and client.get (DATA in answer
    to its RRQ or OACK) both keep one.

    Blocks are counted by absolute index, as ReadTransfer counts them; `rollover` (0 or
    1, the sender's) says which wire number follows 65535. A block is taken only when
    it is the next in order, so the payloads taken are the file, in order, once each.
    ACKs name the last block taken: after every `windowsize` blocks, at the last (short)
    block, and once on a block out of order (a gap, a repeat or an old block: RFC 7440
    says where we are; once until progress, so a window of strays is not a window of
    ACKs). The caller sends them and resends the last one on its timer.
    """

    __slots__ = ("blksize", "windowsize", "rollover", "received", "in_window",
                 "gap_acked", "finished")

    def __init__(self, blksize: int = 512, windowsize: int = 1, rollover: int = 0) -> None:
        self.blksize = blksize
        self.windowsize = windowsize
        self.rollover = rollover
        self.received = 0  # absolute blocks taken, in order
        self.in_window = 0  # taken since the last ACK
        self.gap_acked = False  # an out-of-order block was answered since progress
        self.finished = False  # the last (short) block was taken

    def is_next(self, block: int) -> bool:
        """The wire block number is the next block in order."""
        return not self.finished and block == wire_block(self.received + 1, self.rollover)

    def is_last_taken(self, block: int) -> bool:
        """The wire block number is the last block taken (a repeat of it)."""
        return self.received > 0 and block == wire_block(self.received, self.rollover)

    def ack_block(self) -> int:
        """The wire number an ACK of everything taken so far carries."""
        return wire_block(self.received, self.rollover)

    def take(self, size: int) -> int | None:
        """The next block arrived with `size` bytes (at most blksize; the caller refuses
        a larger one): the wire number to ACK now, or None until the window is full."""
        self.received += 1
        self.gap_acked = False
        self.in_window += 1
        if size < self.blksize:
            self.finished = True
        if self.finished or self.in_window >= self.windowsize:
            self.in_window = 0
            return self.ack_block()
        return None

    def stray(self) -> int | None:
        """A block out of order: the wire number to ACK (the last taken), once until
        progress; None when that ACK went already."""
        if self.gap_acked:
            return None
        self.gap_acked = True
        self.in_window = 0
        return self.ack_block()

    def timed_out(self) -> None:
        """The caller's timer resent the last ACK: the sender starts a window after it."""
        self.in_window = 0


# -- uploads ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Write:
    """Append this payload to the upload at `offset` (the worker writes the file)."""

    offset: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """The last block arrived: put the file in place (the worker renames it)."""


RECEIVING, DALLYING = "receiving", "dallying"


class WriteTransfer:
    """Receive one WRQ (RFC 1350, 2347, 7440), sans I/O.

    Which block comes next and what to ACK are the Receiver's rules. After the last block
    the transfer dallies for one timeout, answering a repeated last DATA with its
    ACK in case that ACK was lost (RFC 1350 section 6), then ends ok.
    """

    def __init__(self, peer: tuple, *, blksize: int = 512, windowsize: int = 1,
                 oack: dict[str, str] | None = None, timeout: float = 1.0,
                 client_timeout: bool = False, retries: int = DEFAULT_RETRIES,
                 max_size: int | None = None, rollover: int = 0) -> None:
        self.peer = peer
        self.foreign_replies = 0  # ERROR 5s sent to other TIDs
        self.blksize = blksize
        self.windowsize = windowsize
        self.oack = oack
        self.rollover = rollover
        self.retries_max = retries
        self.max_size = max_size
        self.fixed_rto = client_timeout
        self.base_rto = timeout
        self.rto = timeout  # base_rto backed off by the timeouts in a row
        self.rx = Receiver(blksize, windowsize, rollover)
        self.size = 0  # bytes received in order
        self.retries = 0
        self.retransmits = 0
        self.state = RECEIVING
        self.deadline: float | None = None
        self.outcome: str | None = None
        self.detail = ""
        self._last: bytes = b""  # the last packet we sent (OACK or ACK), for timeouts
        self.heard = False  # as ReadTransfer.heard

    @property
    def answered(self) -> bool:
        return self.heard

    @property
    def bytes_sent(self) -> int:  # the log's byte count, whichever way they went
        return self.size

    def start(self, now: float) -> list[Action]:
        first = P.encode_oack(self.oack) if self.oack else P.encode_ack(0)
        return [self._send(now, first)]

    def on_datagram(self, data: bytes, src: tuple, now: float) -> list[Action]:
        if self.state == DONE:
            return []
        if src != self.peer:  # another TID: the transfer goes on
            out = foreign_reply(self.peer, src, self.foreign_replies)
            self.foreign_replies += len(out)
            return out
        try:
            pkt = P.parse(data)
        except P.PacketError:
            return []
        self.heard = True
        if isinstance(pkt, P.Error):
            return [self.end("aborted", f"client error {pkt.code}: {pkt.message}")]
        if not isinstance(pkt, P.Data):
            return []
        rx = self.rx
        if self.state == DALLYING:
            if rx.is_last_taken(pkt.block):
                self.retransmits += 1
                return [Send(self._last)]  # our final ACK was lost
            return []
        if not rx.is_next(pkt.block):
            ack = rx.stray()
            return [] if ack is None else [self._send(now, P.encode_ack(ack))]
        if len(pkt.payload) > self.blksize:
            return self._error(P.E_ILLEGAL_OP, "DATA larger than the block size")
        if self.max_size is not None and self.size + len(pkt.payload) > self.max_size:
            return self._error(P.E_DISK_FULL, "Upload exceeds the size limit")
        actions: list[Action] = [Write(self.size, pkt.payload)]
        self.size += len(pkt.payload)
        self.retries = 0
        self.rto = self.base_rto  # progress ends the backoff, as for reads (_progress)
        self.deadline = now + self.rto  # the timer measures the client's silence
        ack = rx.take(len(pkt.payload))
        if rx.finished:
            actions.append(Commit())
            self.state = DALLYING  # for one timeout, from the ACK below
        if ack is not None:
            actions.append(self._send(now, P.encode_ack(ack)))
        return actions

    def on_timer(self, now: float) -> list[Action]:
        if self.state == DONE or self.deadline is None or now < self.deadline:
            return []
        if self.state == DALLYING:
            return [self._finish("ok")]
        if self.retries >= self.retries_max:
            return [self._finish("failed", "timeout: client stopped sending")]
        self.retries += 1
        self.retransmits += 1
        self.rx.timed_out()
        if not self.fixed_rto:
            self.rto = min(self.rto * 2, RTO_CEILING)
        return [self._send(now, self._last)]

    def fail(self, detail: str) -> Finish:
        """The worker could not carry out this transfer's actions (a write, the commit
        that puts the file in place): failed, dallying or not."""
        return self._finish("failed", detail)

    def end(self, outcome: str, detail: str) -> Finish:
        """Ended from outside (superseded, a socket error, shutdown). While dallying the
        file is already in place (the worker carried out the Commit, or failed the
        transfer), so the upload is ok whatever ends the dally."""
        if self.state == DALLYING:
            return self._finish("ok")
        return self._finish(outcome, detail)

    def _send(self, now: float, data: bytes) -> Send:
        self._last = data
        self.deadline = now + self.rto
        return Send(data)

    def _error(self, code: int, message: str) -> list[Action]:
        return [Send(P.encode_error(code, message)), self._finish("failed", message)]

    def _finish(self, outcome: str, detail: str = "") -> Finish:
        self.state = DONE
        self.deadline = None
        self.outcome = outcome
        self.detail = detail
        return Finish(outcome, detail)
