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
DEFAULT_RETRIES = 5


def wire_block(k: int, rollover: int = 0) -> int:
    """The 16-bit block number of absolute block k (rollover to 0 or 1 past 65535)."""
    if k < 65536:
        return k
    return rollover + (k - 65536) % (65536 - rollover)


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


class ReadTransfer:
    """Serve one RRQ: `size` bytes in blocks of `blksize`, `windowsize` at a time."""

    def __init__(self, peer: tuple, size: int, *, blksize: int = 512, windowsize: int = 1,
                 oack: dict[str, str] | None = None, timeout: float | None = None,
                 client_timeout: bool = False, retries: int = DEFAULT_RETRIES,
                 rollover: int = 0) -> None:
        self.peer = peer
        self.size = size
        self.blksize = blksize
        self.windowsize = windowsize
        self.oack = oack
        self.rollover = rollover
        self.retries_max = retries
        # A timeout the client asked for (RFC 2349) is used as it is; otherwise the
        # retransmission timeout adapts to measured round trips (RFC 6298 style).
        self.fixed_rto = client_timeout
        self.base_rto = timeout if timeout is not None else 1.0  # from RTT samples
        self.rto = self.base_rto  # base_rto backed off by the timeouts in a row
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.nblocks = block_count(size, blksize)
        self.state = OACK_SENT if oack else SENDING
        self.last_acked = 0  # highest absolute block the client has acknowledged
        self.sent_upto = 0  # highest absolute block sent
        self.retries = 0  # consecutive timeouts without progress
        self.retransmits = 0  # blocks (or OACKs) sent again, for the log
        self.deadline: float | None = None
        self._sent_at = 0.0
        self._resent = False  # Karn: no RTT sample from a retransmitted window
        self.outcome: str | None = None
        self.detail = ""

    # -- the worker's entry points -------------------------------------------------

    def start(self, now: float) -> list[Action]:
        if self.oack:
            return [self._arm(now, Send(P.encode_oack(self.oack)))]
        return [self._send_window(now, 1)]

    def on_datagram(self, data: bytes, src: tuple, now: float) -> list[Action]:
        if self.state == DONE:
            return []
        if src != self.peer:
            # RFC 1350: a packet from another TID gets ERROR 5; the transfer goes on.
            return [SendTo(src, P.encode_error(P.E_UNKNOWN_TID, "Unknown transfer ID"))]
        try:
            pkt = P.parse(data)
        except P.PacketError:
            return []  # garbage from our own peer: ignore, the timer covers loss
        if isinstance(pkt, P.Ack):
            return self._on_ack(pkt.block, now)
        if isinstance(pkt, P.Error):
            return self._on_error(pkt)
        return []  # a stray RRQ/DATA/OACK on a read transfer: nothing to do

    def on_timer(self, now: float) -> list[Action]:
        if self.state == DONE or self.deadline is None or now < self.deadline:
            return []
        if self.retries >= self.retries_max:
            return [self._finish("failed", "timeout: client stopped answering")]
        self.retries += 1
        self._resent = True
        if not self.fixed_rto:
            # Exponential backoff; it lasts until the client shows progress again
            # (see _progress), so one loss does not slow the rest of the transfer.
            self.rto = min(self.base_rto * 2 ** self.retries, RTO_CEILING)
        if self.state == OACK_SENT:
            self.retransmits += 1
            return [self._arm(now, Send(P.encode_oack(self.oack or {})), fresh=False)]
        first = self.last_acked + 1
        action = self._send_window(now, first, fresh=False)
        self.retransmits += action.count if isinstance(action, SendBlocks) else 0
        return [action]

    @property
    def bytes_sent(self) -> int:
        """Payload bytes the client has acknowledged."""
        return min(self.last_acked * self.blksize, self.size)

    # -- internals -----------------------------------------------------------------

    def _arm(self, now: float, action: Action, fresh: bool = True) -> Action:
        if fresh:
            self._sent_at = now
            self._resent = False
        self.deadline = now + self.rto
        return action

    def _send_window(self, now: float, first: int, fresh: bool = True) -> SendBlocks:
        count = min(self.windowsize, self.nblocks - first + 1)
        self.sent_upto = first + count - 1
        action = SendBlocks(first, count)
        self._arm(now, action, fresh)
        return action

    def _absolute(self, n: int) -> int | None:
        """The absolute block acknowledged by wire number n, or None if not in flight."""
        base = self.last_acked
        for cycle in (65536, 65535) if self.rollover else (65536,):
            k = base + (n - wire_block(base, self.rollover)) % cycle
            if k <= self.sent_upto and wire_block(k, self.rollover) == n:
                return k
        return None

    def _sample_rtt(self, now: float) -> None:
        if self.fixed_rto or self._resent:
            return
        r = max(0.0, now - self._sent_at)
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r
        self.base_rto = min(max(self.srtt + 4 * self.rttvar, RTO_FLOOR), RTO_CEILING)
        self.rto = self.base_rto

    def _progress(self) -> None:
        self.retries = 0
        self.rto = self.base_rto

    def _on_ack(self, n: int, now: float) -> list[Action]:
        if self.state == OACK_SENT:
            if n != 0:
                return []
            self._sample_rtt(now)
            self.state = SENDING
            self._progress()
            return [self._send_window(now, 1)]
        k = self._absolute(n)
        if k is None or k == self.last_acked:
            # A duplicate or stale ACK: never resend on it (Sorcerer's Apprentice).
            return []
        complete = k == self.sent_upto
        if complete:
            self._sample_rtt(now)
        self.last_acked = k
        self._progress()
        if k == self.nblocks:
            return [self._finish("ok")]
        if not complete:
            # RFC 7440: an ACK inside the window means the client lost block k+1;
            # the next window starts there.
            self.retransmits += self.sent_upto - k
        return [self._send_window(now, k + 1)]

    def _on_error(self, pkt: P.Error) -> list[Action]:
        if self.state == OACK_SENT and pkt.code in (0, 8, 9):
            # A client that read the OACK's tsize and stops: an existence probe (PXE,
            # EDK2, U-Boot send 8; GRUB and others 0; Qualcomm modems 9).
            return [self._finish("probe")]
        return [self._finish("aborted", f"client error {pkt.code}: {pkt.message}")]

    def _finish(self, outcome: str, detail: str = "") -> Finish:
        self.state = DONE
        self.deadline = None
        self.outcome = outcome
        self.detail = detail
        return Finish(outcome, detail)
