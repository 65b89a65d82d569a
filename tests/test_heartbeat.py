"""A worker that stops turning its loop (SIGSTOPped, stuck in C or in a syscall) keeps
its SO_REUSEPORT socket's share of the clients: the master must notice that it has
stopped beating, kill it and give its socket to a replacement. An idle or draining
worker still beats and is left alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon
from test_process import udp, warm_up

from tftpd import client
from tftpd import packet as P
from tftpd.files import FileCache, Root
from tftpd.gz import CHUNK, GzCache
from tftpd.master import HUNG_AFTER
from tftpd.storm.content import build_root
from tftpd.storm.engine import run_storm
from tftpd.storm.workload import load

# Within this of a SIGSTOP the worker is replaced: HUNG_AFTER, one check period of the
# master, a fork, and slack for a loaded machine.
REPLACED_WITHIN = 10.0
SILENT = r"worker \d+ \(pid {pid}\) silent for [\d.]+s"


def test_stopped_worker_is_replaced(root: Path, datapath: str) -> None:
    (root / "f.bin").write_bytes(os.urandom(20_000))
    want = (root / "f.bin").read_bytes()
    d = start_daemon(root, "--workers", "2", env={"TFTPD_DATAPATH": datapath})
    victim = 0
    try:
        warm_up(d, 2)
        before = d.wait_workers(2)
        victim = before[0]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        after = d.wait_workers(2, timeout=REPLACED_WITHIN, exclude=frozenset({victim}))
        replaced_in = time.monotonic() - stopped_at
        assert set(before) - {victim} < set(after), "a worker other than the victim went"
        d.wait_for_log(SILENT.format(pid=victim) + r".*SIGKILL; replacing")
        # Fresh client ports hash to both sockets: every download is served, and by both
        # the surviving worker and the replacement (the victim's socket, taken over).
        for i in range(24):
            res = client.get(d.host, d.port, "f.bin", timeout=1.0, retries=2)
            assert res.data == want, i
        lines = d.wait_for_log(r"^tftpd\[\d+\]: .* file=f\.bin .*outcome=ok", count=24)
        servers = {int(p) for p in re.findall(r"^tftpd\[(\d+)\]", "\n".join(lines), re.M)}
        assert servers == set(after), (servers, after)
        print(f"replaced {replaced_in:.2f} s after SIGSTOP")
    finally:
        if victim:
            try:
                os.kill(victim, signal.SIGCONT)  # a daemon that did not kill it still stops
            except ProcessLookupError:
                pass
        assert d.stop() == 0


def test_storm_after_a_worker_stopped_loses_nobody(tmp_path: Path) -> None:
    wl = load("pxe")
    root = build_root(wl, tmp_path / "root")
    d = start_daemon(root, "--workers", "2")
    victim = 0
    try:
        warm_up(d, 2)
        # One client first: the load generator's engine is built before the clock runs.
        assert run_storm((d.host, d.port), wl, 1, deadline_s=25).ok == 1
        victim = d.wait_workers(2)[0]
        os.kill(victim, signal.SIGSTOP)
        # Right away: a share of the storm's requests queue on the stopped worker's socket.
        res = run_storm((d.host, d.port), wl, 200, deadline_s=25)
        summary = res.summary()
        assert res.ok == 200 and not res.failed, summary
        assert not res.deadline_hit, summary
        d.wait_for_log(SILENT.format(pid=victim) + r".*SIGKILL; replacing")
        # Those clients waited for the replacement: their RRQs were re-sent meanwhile.
        assert res.rrq_retransmits > 0, summary
        after = d.wait_workers(2, exclude=frozenset({victim}))
        servers = {int(m.group(1)) for m in re.finditer(
            r"^tftpd\[(\d+)\].* file=nbp\.efi .*outcome=ok", d.log_text(), re.M)}
        assert set(after) <= servers, (after, servers)
        # The worker that served on, busy in C's pump, beat all along.
        assert len(re.findall(r"silent for", d.log_text())) == 1, d.log_text()
        print(f"200-client pxe storm with a stopped worker: ok={res.ok} "
              f"wall={res.wall_s:.2f}s completion_max={summary['completion_max_s']:.2f}s "
              f"first_answer_max={summary['first_answer_max_s']:.2f}s "
              f"rrq_retransmits={res.rrq_retransmits}")
    finally:
        if victim:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert d.stop() == 0


def test_idle_workers_are_left_alone(root: Path, datapath: str) -> None:
    (root / "f").write_bytes(b"x" * 3000)
    d = start_daemon(root, "--workers", "2", env={"TFTPD_DATAPATH": datapath})
    try:
        warm_up(d, 2)
        pids = d.wait_workers(2)
        # Idle for twice the limit and more: no worker may be taken for hung.
        with pytest.raises(AssertionError):
            d.wait_for_log(r"silent for", timeout=2 * HUNG_AFTER + 1.5)
        assert sorted(d.worker_pids()) == pids
        assert client.get(d.host, d.port, "f").data == b"x" * 3000
    finally:
        assert d.stop() == 0


def _start_slow_transfer(d: Daemon, name: str, data: bytes):  # noqa: ANN202
    sock = udp()
    sock.sendto(P.encode_rrq(name.encode(), "octet", {}), (d.host, d.port))
    raw, tid = sock.recvfrom(P.MAX_DATAGRAM)
    assert P.parse(raw) == P.Data(1, data[:512])
    return sock, tid


def _finish_transfer(sock, tid, data: bytes) -> bytes:  # noqa: ANN001
    got = [data[:512]]
    block = 1
    sock.sendto(P.encode_ack(1), tid)
    for _ in range(200):  # bounded: the blocks plus a few retransmissions
        raw, src = sock.recvfrom(P.MAX_DATAGRAM)
        pkt = P.parse(raw)
        assert src == tid and isinstance(pkt, P.Data), pkt
        if pkt.block != block + 1:
            continue
        block += 1
        got.append(pkt.payload)
        sock.sendto(P.encode_ack(block), tid)
        if len(pkt.payload) < 512:
            break
    return b"".join(got)


def test_draining_worker_beats_and_a_stuck_one_is_killed(root: Path, datapath: str) -> None:
    """After SIGHUP the old workers finish their transfers: one that takes longer than
    the limit is left to finish; one stopped while it drains is killed (and not
    replaced: its successor already serves)."""
    data = os.urandom(512 * 10 + 7)
    (root / "a.bin").write_bytes(data)
    d = start_daemon(root, "--workers", "1", "--drain-timeout", "60",
                     env={"TFTPD_DATAPATH": datapath})
    try:
        (old,) = d.wait_workers(1)
        sock, tid = _start_slow_transfer(d, "a.bin", data)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded")
        # The old worker drains with the transfer open, longer than the limit.
        with pytest.raises(AssertionError):
            d.wait_for_log(r"silent for", timeout=HUNG_AFTER + 1.5)
        assert old in d.worker_pids()
        assert _finish_transfer(sock, tid, data) == data
        sock.close()
        (new,) = d.wait_workers(1, exclude=frozenset({old}))
        d.wait_for_log(rf"tftpd\[{old}\].*file=a\.bin .*outcome=ok")

        # Again, and this time the draining worker stops.
        sock, tid = _start_slow_transfer(d, "a.bin", data)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log(r"SIGHUP: reloaded", count=2)
        os.kill(new, signal.SIGSTOP)
        line = d.wait_for_log(SILENT.format(pid=new) + r".*SIGKILL",
                              timeout=REPLACED_WITHIN)[0]
        assert "replacing" not in line, line
        d.wait_workers(1, exclude=frozenset({old, new}))
        sock.close()
        assert client.get(d.host, d.port, "a.bin").data == data
    finally:
        assert d.stop() == 0


def test_making_a_gz_file_beats(tmp_path: Path) -> None:
    """A worker's one long step outside its loop beats per chunk, and while it waits for
    the lock of another worker making the same file."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(3 * CHUNK + 5))
    gz = GzCache.open_dir(str(tmp_path / "cache"))
    beats: list[float] = []
    gz.beat = lambda: beats.append(time.monotonic())
    f = FileCache(Root(str(root)), gz=gz).open(b"big.gz")
    assert f.size > 3 * CHUNK and len(beats) >= 4

    lock = tmp_path / "cache" / "x.lock"
    held = os.open(lock, os.O_RDWR | os.O_CREAT)
    mine = os.open(lock, os.O_RDWR)
    waiting = threading.Event()
    gz.beat = waiting.set
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # the other worker
        waiter = threading.Thread(target=gz._lock, args=(mine,))
        waiter.start()
        assert waiting.wait(5.0), "no beat while waiting for the lock"
        assert waiter.is_alive()
        fcntl.flock(held, fcntl.LOCK_UN)
        waiter.join(5.0)
        assert not waiter.is_alive()
    finally:
        os.close(held)
        os.close(mine)
