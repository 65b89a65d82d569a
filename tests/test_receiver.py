"""The receiving side's block rules (transfer.Receiver): against the server's own sender
(ReadTransfer) over a hostile network, and client.get past block 65535 against the
real daemon."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, scaled, start_daemon
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd import client
from tftpd import packet as P
from tftpd.transfer import Finish, ReadTransfer, Receiver, SendBlocks, wire_block

PEER = ("192.0.2.1", 2000)
BLKSIZE = 8


def payload(k: int, nblocks: int, tail: int) -> bytes:
    """Block k of the file: its absolute index, so a block taken twice or out of place
    shows in what was delivered."""
    body = struct.pack(">Q", k)
    return body[:tail] if k == nblocks else body


# -- the receiver against ReadTransfer, sans I/O -----------------------------------------

MAX_STEPS = 4000
FATES = st.sampled_from(["deliver"] * 6 + ["drop", "duplicate", "reorder"])


@settings(max_examples=scaled(100))
@given(base=st.sampled_from([0, 65500, 65530, 65535, 131060]),
       count=st.integers(1, 60),
       tail=st.integers(0, BLKSIZE - 1),
       window=st.integers(1, 12),
       rollover=st.sampled_from([0, 1]),
       fates=st.lists(FATES, max_size=60),
       data=st.data())
def test_delivers_the_file_in_order_exactly_once(base: int, count: int, tail: int,
                                                  window: int, rollover: int,
                                                  fates: list[str], data: st.DataObject
                                                  ) -> None:
    """Datagrams both ways are lost, repeated and reordered (each fate once, then the
    network is perfect): the payloads the receiver takes are the file's blocks, in
    order, once each, whether or not the block numbers roll over on the way."""
    nblocks = base + count
    size = (nblocks - 1) * BLKSIZE + tail
    sender = ReadTransfer(PEER, size, blksize=BLKSIZE, windowsize=window,
                          rollover=rollover, retries=len(fates) + 10)
    sender.start(0.0)
    # Start near the wrap: as though blocks 1..base had gone through already.
    sender.s.last_acked = sender.s.sent_upto = base
    rx = Receiver(BLKSIZE, window, rollover)
    rx.received = base
    last_ack = P.encode_ack(rx.ack_block())
    taken: list[int] = []
    net: list[tuple[str, bytes]] = []  # ("data" | "ack", datagram) in flight
    now = 0.0
    gave_up: list[Finish] = []

    def send(actions: list) -> None:
        for a in actions:
            if isinstance(a, SendBlocks):
                for k in range(a.first, a.first + a.count):
                    net.append(("data", P.encode_data(wire_block(k, rollover),
                                                      payload(k, nblocks, tail))))
            elif isinstance(a, Finish) and a.outcome != "ok" and sender.s.last_acked == 0:
                # Three timeouts on a client that has acknowledged nothing end the
                # transfer (nothing much goes to an address that has not proved it is
                # there): losses at the very start can leave a windowed receiver
                # re-sending ACK 0 while it holds block 1 (docs/design.md).
                assert a.detail == "timeout: client stopped answering", a
                gave_up.append(a)
            else:
                assert not isinstance(a, Finish) or a.outcome == "ok", a

    send(sender.on_timer(sender.deadline or 0.0))  # the window after `base`
    for _ in range(MAX_STEPS):
        if rx.finished or gave_up:
            break
        if not net:
            # Silence: the receiver's timer resends its last ACK, or the sender's its
            # window; either may come first.
            now = max(now, sender.deadline or now) + 0.01
            if data.draw(st.booleans(), label="receiver's timer first"):
                rx.timed_out()
                net.append(("ack", last_ack))
            else:
                send(sender.on_timer(now))
            continue
        fate = fates.pop() if fates else "deliver"
        if fate == "drop":
            net.pop(0)
            continue
        if fate == "duplicate":
            net.append(net[0])
        if fate == "reorder":
            i = data.draw(st.integers(0, len(net) - 1), label="reorder")
            net.insert(i, net.pop(0))
            continue
        kind, datagram = net.pop(0)
        now += 0.001
        if kind == "ack":
            send(sender.on_datagram(datagram, PEER, now))
            continue
        pkt = P.parse(datagram)
        assert isinstance(pkt, P.Data)
        ack = None
        if rx.is_next(pkt.block):
            assert len(pkt.payload) <= BLKSIZE
            taken.append(struct.unpack(">Q", pkt.payload)[0]
                         if len(pkt.payload) == BLKSIZE else nblocks)
            ack = rx.take(len(pkt.payload))
        else:
            ack = rx.stray()
        if ack is not None:
            assert ack == wire_block(rx.received, rollover)  # always the last taken
            last_ack = P.encode_ack(ack)
            net.append(("ack", last_ack))
    assert taken == list(range(base + 1, base + 1 + len(taken)))  # in order, once each
    if gave_up:
        return
    assert rx.finished, f"not finished after {MAX_STEPS} steps: took {len(taken)}/{count}"
    assert taken == list(range(base + 1, nblocks + 1))
    assert rx.received == nblocks


@settings(max_examples=scaled(200))
@given(window=st.integers(2, 16), arrivals=st.lists(st.integers(1, 20), max_size=60),
       rollover=st.sampled_from([0, 1]), base=st.sampled_from([0, 65530]))
def test_one_window_in_any_order(window: int, arrivals: list[int], rollover: int,
                                 base: int) -> None:
    """Blocks base+1.. arrive in any order, repeated or not at all: only the next one in
    order is taken; an ACK always names the last taken; out of order there is at most
    one ACK until the next block is taken."""
    rx = Receiver(BLKSIZE, window, rollover)
    rx.received = base
    strays_acked = 0
    since_ack = 0  # blocks taken since the last ACK of any kind
    for offset in arrivals:
        k = base + offset
        before = rx.received
        if rx.is_next(wire_block(k, rollover)):
            assert k == before + 1
            ack = rx.take(BLKSIZE)
            strays_acked = 0
            since_ack += 1
            assert (ack is not None) == (since_ack == window)  # one ACK per window
            if ack is not None:
                assert ack == wire_block(k, rollover)
                since_ack = 0
        else:
            assert k != before + 1
            ack = rx.stray()
            if ack is not None:
                strays_acked += 1
                since_ack = 0  # the sender starts a window after it
                assert ack == wire_block(before, rollover)
            assert strays_acked <= 1
            assert rx.received == before
    taken = rx.received - base
    assert all(o in arrivals for o in range(1, taken + 1))


def test_the_last_short_block_ends_it_and_its_repeat_is_known() -> None:
    rx = Receiver(4, 4)
    assert rx.take(4) is None
    assert rx.take(2) == 2 and rx.finished
    assert not rx.is_next(3) and rx.is_last_taken(2)


# -- client.get past block 65535 against the real daemon -----------------------------

BIG = 65536 * BLKSIZE + 100  # 65549 blocks of 8 bytes: numbers pass 65535


@pytest.fixture(params=[0, 1], ids=["rollover0", "rollover1"])
def rolling(request: pytest.FixtureRequest, root: Path) -> Iterator[tuple[Daemon, int]]:
    d = start_daemon(root, "--workers", "1", "--rollover", str(request.param))
    try:
        yield d, request.param
    finally:
        d.stop()


def big_file(root: Path) -> bytes:
    nblocks = BIG // BLKSIZE + 1
    data = b"".join(struct.pack(">Q", k) for k in range(1, nblocks + 1))[:BIG]
    (root / "big.bin").write_bytes(data)
    return data


@pytest.mark.parametrize("window", [1, 16])
def test_get_past_block_65535(rolling: tuple[Daemon, int], window: int) -> None:
    """Each block holds its own index: a block wrapped to the wrong number is caught."""
    daemon, rollover = rolling
    data = big_file(daemon.root)
    res = client.get("127.0.0.1", daemon.port, "big.bin", rollover=rollover, timeout=2.0,
                     options={"blksize": str(BLKSIZE), "windowsize": str(window)})
    assert len(res.data) == len(data)
    assert res.data == data
