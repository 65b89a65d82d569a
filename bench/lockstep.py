"""Server CPU per lock-step block: C's pump against the pure-Python path, same process.

    python3 -m bench.lockstep [--blocks 40000] [--blksize 1456] [--window 1]

One transfer on loopback. A client socket ACKs each block (or window) as it arrives;
the server step (read the ACK, decide, send the next block) runs either in C
(`tftpd_pump`, what a worker does with the C data path) or in Python
(`ReadTransfer.on_datagram` plus the Python twin's send, what it does without). Only
the server step is timed, with the thread's CPU clock, so the client's work is not in
the figures; the kernel's loopback delivery that a send triggers is (it runs in the
sender's context). Runs alternate C, Python, C, Python... and the medians are quoted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

from tftpd import packet as P
from tftpd.datapath import encode_sockaddr, get_datapath
from tftpd.transfer import ReadTransfer, SendBlocks


def run(path: str, blocks: int, blksize: int, window: int, mode: str) -> float:
    """CPU seconds of the server step for one whole transfer of `blocks` blocks."""
    size = blocks * blksize - 1
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    client.settimeout(5)
    peer = client.getsockname()
    fd = os.open(path, os.O_RDONLY)
    dp = get_datapath(mode)
    pump = dp.pump()
    slot, state = pump.new_state() if pump else (-1, None)
    t = ReadTransfer(peer, size, blksize=blksize, windowsize=window, timeout=1.0, state=state)
    if pump:
        pump.watch(slot, server, encode_sockaddr(peer), fd)
    sockaddr = encode_sockaddr(peer)
    cpu = 0.0
    try:
        first = t.start(time.monotonic())[0]
        assert isinstance(first, SendBlocks)
        dp.send_window(server, peer, sockaddr, fd, first.first, first.count, blksize, size)
        received = 0
        while True:
            for _ in range(min(window, t.nblocks - received)):
                data = client.recv(70000)
                received += 1
            if received >= t.nblocks:
                break
            client.sendto(P.encode_ack(received & 0xFFFF), server.getsockname())
            c0 = time.thread_time()
            if pump:
                while not pump.run(time.monotonic()) and t.s.sent_upto <= received:
                    pass  # the ACK is on its way through loopback
            else:
                while True:
                    try:
                        data, src = server.recvfrom(70000)
                        break
                    except BlockingIOError:
                        continue
                for a in t.on_datagram(data, src, time.monotonic()):
                    if isinstance(a, SendBlocks):
                        dp.send_window(server, peer, sockaddr, fd, a.first, a.count, blksize,
                                       size)
            cpu += time.thread_time() - c0
        return cpu
    finally:
        if pump:
            pump.release(slot, server)
            pump.close()
        server.close()
        client.close()
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=40000)
    ap.add_argument("--blksize", type=int, default=1456)
    ap.add_argument("--window", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ns = ap.parse_args(argv)
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(ns.blocks * ns.blksize))
        f.flush()
        c, py = [], []
        for _ in range(ns.runs):
            c.append(run(f.name, ns.blocks, ns.blksize, ns.window, "c"))
            py.append(run(f.name, ns.blocks, ns.blksize, ns.window, "python"))
    mc, mp = statistics.median(c), statistics.median(py)
    steps = ns.blocks / ns.window
    print(f"blksize {ns.blksize}, window {ns.window}, {ns.blocks} blocks, {ns.runs} runs "
          "each, server-step CPU (thread clock), medians:")
    print(f"  C pump : {mc * 1e6 / steps:6.2f} us per ACK, {ns.blocks / mc:10.0f} blocks/CPU-s")
    print(f"  Python : {mp * 1e6 / steps:6.2f} us per ACK, {ns.blocks / mp:10.0f} blocks/CPU-s")
    print(f"  ratio C/Python, blocks per CPU-second: {mp / mc:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
