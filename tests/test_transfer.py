"""The read-transfer state machine on a fake clock: no sockets, no files."""

from __future__ import annotations

import pytest
from conftest import scaled
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import packet as P
from tftpd.transfer import (
    FOREIGN_REPLIES,
    OACK_SENT,
    Finish,
    ReadTransfer,
    Send,
    SendBlocks,
    SendTo,
    WriteTransfer,
    block_count,
    wire_block,
)

PEER = ("192.0.2.1", 2000)


def ack(n: int) -> bytes:
    return P.encode_ack(n)


def test_lock_step_without_options() -> None:
    t = ReadTransfer(PEER, 1000, blksize=512)
    assert t.start(0.0) == [SendBlocks(1, 1)]
    assert t.on_datagram(ack(1), PEER, 0.1) == [SendBlocks(2, 1)]
    assert t.on_datagram(ack(2), PEER, 0.2) == [Finish("ok")]
    assert t.deadline is None and t.outcome == "ok"


def test_multiple_of_blksize_ends_with_empty_block() -> None:
    assert block_count(1024, 512) == 3
    assert block_count(0, 512) == 1
    t = ReadTransfer(PEER, 0)
    assert t.start(0.0) == [SendBlocks(1, 1)]
    assert t.on_datagram(ack(1), PEER, 0.1) == [Finish("ok")]


def test_oack_then_ack0_then_window() -> None:
    t = ReadTransfer(PEER, 10_000, blksize=1000, windowsize=4,
                     oack={"blksize": "1000", "windowsize": "4"})
    assert t.start(0.0) == [Send(P.encode_oack({"blksize": "1000", "windowsize": "4"}))]
    assert t.state == OACK_SENT
    assert t.on_datagram(ack(1), PEER, 0.01) == []  # only ACK 0 answers an OACK
    assert t.on_datagram(ack(0), PEER, 0.01) == [SendBlocks(1, 4)]
    assert t.on_datagram(ack(4), PEER, 0.02) == [SendBlocks(5, 4)]
    assert t.on_datagram(ack(8), PEER, 0.03) == [SendBlocks(9, 3)]  # 11 blocks in all
    assert t.on_datagram(ack(11), PEER, 0.04) == [Finish("ok")]


def test_ack_inside_window_restarts_window_after_it() -> None:
    t = ReadTransfer(PEER, 100_000, blksize=512, windowsize=8, oack={"windowsize": "8"})
    t.start(0.0)
    t.on_datagram(ack(0), PEER, 0.0)
    # RFC 7440: the client lost block 4; the next window starts at 4.
    assert t.on_datagram(ack(3), PEER, 0.01) == [SendBlocks(4, 8)]
    assert t.retransmits == 5


def test_duplicate_ack_never_resends() -> None:
    # The Sorcerer's Apprentice bug: only a timer may retransmit.
    t = ReadTransfer(PEER, 5000)
    t.start(0.0)
    assert t.on_datagram(ack(1), PEER, 0.01) == [SendBlocks(2, 1)]
    for _ in range(5):
        assert t.on_datagram(ack(1), PEER, 0.02) == []
    assert t.on_datagram(ack(0), PEER, 0.02) == []  # stale
    assert t.retransmits == 0


def test_a_repeated_ack_while_backing_off_ends_the_backoff_without_a_resend() -> None:
    t = ReadTransfer(PEER, 5000, timeout=1.0, retries=3)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.1)  # RTT 0.1 s: base RTO 0.3 s
    assert t.base_rto == pytest.approx(0.3)
    assert t.on_timer(0.4) == [SendBlocks(2, 1)]
    assert t.on_timer(1.0) == [SendBlocks(2, 1)]
    assert t.deadline == pytest.approx(2.2) and t.retries == 2  # backed off to 1.2 s
    # The client's own timer repeats its ACK: our resends are what gets lost.
    assert t.on_datagram(ack(1), PEER, 1.5) == []  # still no resend on an ACK
    assert t.deadline == pytest.approx(1.7) and t.retries == 0 and t.rto == t.base_rto
    assert t.on_timer(1.7) == [SendBlocks(2, 1)]
    # Without a backoff, a repeated ACK changes nothing.
    t = ReadTransfer(PEER, 5000, timeout=1.0)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.1)
    before = t.deadline
    assert t.on_datagram(ack(1), PEER, 0.15) == [] and t.deadline == before


def test_a_repeated_rrq_gets_the_first_packet_again_unless_answered() -> None:
    t = ReadTransfer(PEER, 5000, timeout=1.0, oack={"tsize": "5000"})
    oack = Send(P.encode_oack({"tsize": "5000"}))
    assert t.start(0.0) == [oack]
    assert t.on_repeat(0.00001) == []  # a legacy ROM's double RRQ: no second OACK
    t.on_timer(1.0)  # the timer resent it (unanswered: no backoff)
    assert t.on_repeat(1.5) == [oack]  # the client did not get it: again, at once
    # A try like the timer's: a repeated (perhaps spoofed) RRQ buys no more of them.
    assert t.retransmits == 2 and t.retries == 2 and t.deadline == pytest.approx(2.5)
    assert t.on_repeat(2.0) == [oack] and t.retries == 3
    assert t.on_repeat(2.5) == []  # out of tries: the timer ends it
    t.on_datagram(ack(0), PEER, 1.6)
    assert t.on_repeat(3.0) == []  # answered: a repeat changes nothing
    # Without options the first packet is DATA 1.
    t = ReadTransfer(PEER, 5000, timeout=1.0)
    t.start(0.0)
    assert t.on_repeat(0.5) == [SendBlocks(1, 1)]
    t.on_datagram(ack(1), PEER, 0.6)
    assert t.on_repeat(2.0) == []


def test_timeout_resends_with_backoff_then_gives_up() -> None:
    t = ReadTransfer(PEER, 5000, timeout=1.0, retries=3)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.0)  # answered; a loopback RTT: the RTO floor, 0.2 s
    assert t.on_timer(0.1) == []  # not yet
    assert t.deadline == pytest.approx(0.2)
    assert t.on_timer(0.2) == [SendBlocks(2, 1)]
    assert t.deadline == pytest.approx(0.6)  # backed off: 0.4 s
    assert t.on_timer(t.deadline) == [SendBlocks(2, 1)]
    assert t.deadline == pytest.approx(1.4)  # 0.8 s
    assert t.on_timer(t.deadline) == [SendBlocks(2, 1)]
    assert t.on_timer(3.0) == [Finish("failed", "timeout: client stopped answering")]
    assert t.retransmits == 3


def test_unanswered_transfers_give_up_early() -> None:
    # A spoofed RRQ: the "client" never answers; three resends, not the full retries.
    # Nor does it back off: its slot is held four RTOs, not fifteen.
    t = ReadTransfer(PEER, 5000, timeout=1.0, retries=8, oack={"tsize": "5000"})
    t.start(0.0)
    sent = [a for now in (1.0, 2.0, 3.0, 4.0) for a in t.on_timer(now)]
    assert sent[:3] == [Send(P.encode_oack({"tsize": "5000"}))] * 3
    assert sent[3] == Finish("failed", "timeout: client stopped answering")
    # Once the client has answered, it gets the whole patience.
    t = ReadTransfer(PEER, 5000, timeout=1.0, retries=8)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.1)
    now = 0.1
    for _ in range(8):
        now = t.deadline or now
        assert t.on_timer(now) == [SendBlocks(2, 1)]
    assert t.on_timer(t.deadline or now)[0].outcome == "failed"


def test_progress_ends_the_backoff() -> None:
    t = ReadTransfer(PEER, 50_000, timeout=1.0)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.0)
    t.on_timer(t.deadline or 0.0)
    t.on_timer(t.deadline or 0.0)
    assert t.rto == pytest.approx(0.8)
    t.on_datagram(ack(2), PEER, 0.7)
    assert t.rto == t.base_rto and t.retries == 0


def _window_16_down_to_block_1() -> ReadTransfer:
    """A transfer whose client sent ACK 0 and then nothing for two timeouts: its
    window went out twice, then block 1 alone."""
    t = ReadTransfer(PEER, 1 << 20, blksize=1024, windowsize=16, timeout=1.0, retries=5,
                     oack={"blksize": "1024", "windowsize": "16"})
    t.start(0.0)
    assert t.on_datagram(ack(0), PEER, 0.0) == [SendBlocks(1, 16)]
    sent = [t.on_timer(t.deadline or 0.0)[0] for _ in range(2)]
    assert sent == [SendBlocks(1, 16), SendBlocks(1, 1)]
    return t


def test_a_peer_that_acknowledged_no_data_is_sent_two_windows_then_single_blocks() -> None:
    # ACK 0 alone proves nothing: anyone who knows the transfer's port can send it
    # for someone else. Until a DATA block is acknowledged, the window goes out twice
    # at most; later tries carry its first block only, and a repeated ACK 0 brings
    # the next try sooner but buys no more of them.
    t = _window_16_down_to_block_1()
    assert t.on_datagram(ack(0), PEER, 1.0) == []  # the repeat: no send on an ACK
    assert t.retries == 2 and t.deadline == pytest.approx(1.0 + 0.2)
    now = 0.0
    for _ in range(3):
        now = t.deadline or now
        assert t.on_timer(now) == [SendBlocks(1, 1)]
    assert t.on_timer(t.deadline or now)[0] == Finish("failed",
                                                      "timeout: client stopped answering")
    assert t.retransmits == 16 + 4
    # Once block 1 is acknowledged the client has proved it is there: whole windows.
    t = ReadTransfer(PEER, 1 << 20, blksize=1024, windowsize=16, timeout=1.0,
                     oack={"blksize": "1024", "windowsize": "16"})
    t.start(0.0)
    t.on_datagram(ack(0), PEER, 0.0)
    t.on_datagram(ack(1), PEER, 0.1)
    for _ in range(3):
        assert t.on_timer(t.deadline or 0.0) == [SendBlocks(2, 16)]


def test_an_ack_of_the_first_window_counts_after_single_block_resends() -> None:
    # The client had the whole first window; its ACK 16 and the window's re-send were
    # lost, so the server is down to block 1 alone. The ACK 16 the client repeats on
    # its own timeouts (block 1 is an old block to it: no ACK) must count: it did
    # not (block 16 was no longer "in flight") and the client gave up.
    t = _window_16_down_to_block_1()
    assert t.on_datagram(ack(16), PEER, 3.0) == [SendBlocks(17, 16)]
    assert t.last_acked == 16 and t.retries == 0


def test_client_timeout_is_used_as_is() -> None:
    t = ReadTransfer(PEER, 5000, timeout=5, client_timeout=True, oack={"timeout": "5"})
    t.start(0.0)
    t.on_datagram(ack(0), PEER, 0.001)
    assert t.deadline == pytest.approx(5.001)  # no RTT adaptation
    t.on_timer(5.001)
    assert t.deadline == pytest.approx(10.001)  # and no backoff


def test_rtt_adapts_the_timeout_with_a_floor() -> None:
    t = ReadTransfer(PEER, 50_000, timeout=1.0)
    t.start(0.0)
    t.on_datagram(ack(1), PEER, 0.0001)
    assert t.base_rto == 0.2  # loopback-fast RTT, held at the floor


def test_lost_oack_is_resent() -> None:
    t = ReadTransfer(PEER, 10, oack={"tsize": "10"})
    oack = t.start(0.0)
    assert t.on_timer(1.0) == oack
    assert t.retransmits == 1


def test_error_after_oack_is_a_probe() -> None:
    for code in (0, 8, 9):
        t = ReadTransfer(PEER, 10, oack={"tsize": "10"})
        t.start(0.0)
        assert t.on_datagram(P.encode_error(code, "x"), PEER, 0.0) == [Finish("probe")]
        assert t.deadline is None  # no retransmission timer left behind


def test_other_errors_abort() -> None:
    t = ReadTransfer(PEER, 10, oack={"tsize": "10"})
    t.start(0.0)
    assert t.on_datagram(P.encode_error(2, "no"), PEER, 0.0)[0].outcome == "aborted"
    t = ReadTransfer(PEER, 5000)
    t.start(0.0)
    # GRUB-style ERROR 0 in the middle of the data is an abort, not a probe.
    assert t.on_datagram(P.encode_error(0, "closed"), PEER, 0.0)[0].outcome == "aborted"


def test_foreign_tid_gets_error_5_and_transfer_goes_on() -> None:
    t = ReadTransfer(PEER, 5000)
    t.start(0.0)
    other = (PEER[0], PEER[1] + 1)  # the client's host, another port (RFC 1350's case)
    out = t.on_datagram(ack(1), other, 0.01)
    assert out == [SendTo(other, P.encode_error(5, "Unknown transfer ID"))]
    assert t.last_acked == 0
    assert t.on_datagram(ack(1), PEER, 0.02) == [SendBlocks(2, 1)]


@pytest.mark.parametrize("kind", ["read", "write"])
def test_foreign_tids_tell_strangers_nothing(kind: str) -> None:
    """ERROR 5 would tell another host that this port is a live transfer (the port is
    what keeps a spoofer from acknowledging for its victim): it gets nothing. The
    client's own host gets ERROR 5, FOREIGN_REPLIES times at most: no reflector."""
    t: ReadTransfer | WriteTransfer = ReadTransfer(PEER, 5000) if kind == "read" \
        else WriteTransfer(PEER)
    t.start(0.0)
    assert t.on_datagram(ack(1), ("192.0.2.9", 3000), 0.01) == []
    replies = [t.on_datagram(ack(1), (PEER[0], 40000 + i), 0.01) for i in range(10)]
    assert replies[:FOREIGN_REPLIES] == [
        [SendTo((PEER[0], 40000 + i), P.encode_error(5, "Unknown transfer ID"))]
        for i in range(FOREIGN_REPLIES)]
    assert replies[FOREIGN_REPLIES:] == [[]] * (10 - FOREIGN_REPLIES)


def test_garbage_from_peer_is_ignored() -> None:
    t = ReadTransfer(PEER, 5000)
    t.start(0.0)
    assert t.on_datagram(b"\x00", PEER, 0.0) == []
    assert t.on_datagram(P.encode_data(1, b"x"), PEER, 0.0) == []


def test_wire_block_rollover() -> None:
    assert [wire_block(k) for k in (65535, 65536, 65537, 131072)] == [65535, 0, 1, 0]
    assert [wire_block(k, 1) for k in (65535, 65536, 65537, 131070, 131071)] == \
        [65535, 1, 2, 65535, 1]


def test_rollover_past_65535_twice() -> None:
    for rollover in (0, 1):
        nblocks = 2 * 65536 + 10
        t = ReadTransfer(PEER, (nblocks - 1) * 8 + 3, blksize=8, rollover=rollover)
        assert t.nblocks == nblocks
        t.start(0.0)
        for k in range(1, nblocks):
            out = t.on_datagram(ack(wire_block(k, rollover)), PEER, 0.0)
            assert out == [SendBlocks(k + 1, 1)], (rollover, k)
        assert t.on_datagram(ack(wire_block(nblocks, rollover)), PEER, 0.0) == [Finish("ok")]


# -- a lossy network on a fake clock ---------------------------------------------------

class Receiver:
    """An RFC 7440 receiver: ACK each window's end, the last block in order on a gap."""

    def __init__(self, window: int, nblocks: int) -> None:
        self.window = window
        self.nblocks = nblocks
        self.expected = 1
        self.window_start = 1
        self.done = False

    def on_block(self, k: int) -> int | None:
        if k != self.expected:
            # A gap, or a block again (our ACK was lost): say where we are.
            self.window_start = self.expected
            return self.expected - 1
        self.expected += 1
        if k == self.nblocks:
            self.done = True
            return k
        if k - self.window_start + 1 >= self.window:
            self.window_start = k + 1
            return k
        return None

    def on_timeout(self) -> int:
        self.window_start = self.expected
        return self.expected - 1


@settings(max_examples=scaled(60), deadline=None)
@given(size=st.integers(0, 20_000), blksize=st.sampled_from([8, 512, 1456]),
       window=st.integers(1, 16), oack=st.booleans(),
       losses=st.lists(st.booleans(), min_size=0, max_size=400))
def test_lossy_channel_delivers_everything_in_order(size: int, blksize: int, window: int,
                                                    oack: bool, losses: list[bool]) -> None:
    opts = {"blksize": str(blksize), "windowsize": str(window)} if oack else None
    if not oack:
        blksize, window = 512, 1
    t = ReadTransfer(PEER, size, blksize=blksize, windowsize=window, oack=opts, timeout=1.0,
                     retries=50)
    rx = Receiver(window, t.nblocks)
    lossy = iter(losses)

    def lost() -> bool:
        # The drawn losses, then a clean network; none before the client has answered
        # (an unanswered transfer gives up after three tries, by design: see above).
        answered = t.last_acked > 0 or (oack and t.state != OACK_SENT)
        return next(lossy, False) if answered else False

    now = 0.0
    pending = t.start(now)
    for _ in range(100_000):
        if rx.done and t.outcome == "ok":
            break
        acks: list[int] = []
        for action in pending:
            assert not isinstance(action, SendTo)
            if isinstance(action, Send) and not lost():
                acks.append(0)  # the OACK arrived
            elif isinstance(action, SendBlocks):
                for k in range(action.first, action.first + action.count):
                    if not lost():
                        a = rx.on_block(k)
                        if a is not None:
                            acks.append(a)
            elif isinstance(action, Finish):
                assert action.outcome == "ok", action
        pending = []
        for a in acks:
            now += 0.001
            if not lost():
                pending += t.on_datagram(ack(wire_block(a)), PEER, now)
        if not pending and t.outcome is None:
            assert t.deadline is not None
            now = t.deadline
            if not rx.done and rx.expected > 1 and not lost():
                # The receiver's own timer: ACK the last block in order.
                pending += t.on_datagram(ack(wire_block(rx.on_timeout())), PEER, now)
            pending += t.on_timer(now)
    assert rx.done and rx.expected == t.nblocks + 1
    assert t.outcome == "ok" or (t.outcome is None and rx.done)
