"""Per-block sender CPU of ways to send TFTP DATA blocks over loopback UDP, in one run.

    python3 -m bench.variants.run [--blocks 200000] [--seconds 3] [--reps 1] ...

Variants (see README.md): a = the product's C path through tftpd.datapath, a-raw = the
same C function called straight through cffi, b = the product's pure-Python twin, and the
bench-only C senders of variants.c: c = MSG_MORE header + sendfile (connected), d = sendmsg
over an mmap, e = sendmmsg over an mmap, f = UDP GSO, g = pread + sendmmsg (connected).

Each cell (variant x blksize x mode) sends whole blocks of a 16 MiB file, walking it in
order and wrapping, until --blocks blocks or --seconds seconds, whichever comes first.
The sender is this process, pinned to one CPU; its CPU time is time.process_time().  A
forked receiver, pinned to the other CPU, drains the socket with non-blocking recvmmsg
(spinning, so the sender never pays for a wakeup) and checks every datagram's length,
header, order and first 60 payload bytes, and byte for byte the whole payload of the first
64 and of the first of every recvmmsg batch.  Datagrams go to 127.0.0.1 inside a network
namespace made for the run (root), or on the host's loopback with --no-netns.

A second sink, "drop" (namespace only), sends the same datagrams to 127.0.0.3:9, which an
nftables rule drops at lo's ingress hook: the whole send path and lo's transmit, without the
IP/UDP receive and socket queueing that loopback otherwise charges to the sender (nor, for
GSO, the segmentation, which happens on receive on loopback).  Nothing arrives there, so
nothing is checked; the same C code is checked in the loopback cells.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gzip
import json
import mmap
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import netns
from bench.variants.build import load

BLKSIZES = (512, 1456, 8192, 65464)
MODES = {"lockstep": 1, "window": 16}
FILE_BYTES = 16 << 20  # 32768 blocks of 512: block numbers never wrap
RCVBUF = 64 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; root only
GSO_MAX_PAYLOAD = 65535 - 20 - 8  # one GSO send is one IPv4 datagram before segmentation
SINKS = ("loopback", "drop")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
DROP_DST = ("127.0.0.3", 9)
DROP_TABLE = "tftpbench_vbdrop"


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    connected: bool


VARIANTS = (
    Variant("a", "product C: pread+sendmmsg, unconnected (DataPath.send_window)", False),
    Variant("a-raw", "product C function called directly (no Python checks)", False),
    Variant("b", "product Python twin: preadv + socket.sendmsg per block", False),
    Variant("c", "send(hdr, MSG_MORE) + sendfile(payload), connected", True),
    Variant("d", "sendmsg per block, iovec into mmap, unconnected", False),
    Variant("e", "sendmmsg of the window, iovecs into mmap, unconnected", False),
    Variant("f", "UDP GSO: preadv into header-gapped buffer + sendmsg(UDP_SEGMENT)", False),
    Variant("g", "pread+sendmmsg like a, but connected (control for c)", True),
)
BY_KEY = {v.key: v for v in VARIANTS}
PYTHON = "b"
PRODUCT = "a"


class Unsupported(Exception):
    """This variant cannot run here (e.g. no UDP GSO)."""


@dataclass
class Cell:
    sink: str
    variant: str
    mode: str
    blksize: int
    blocks: int = 0
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    wall_s: float = 0.0
    ksoftirqd_s: float = 0.0
    short_calls: int = 0
    sent_total: int = 0
    rx: dict[str, int] = field(default_factory=dict)
    unsupported: str = ""
    error: str = ""

    @property
    def us_per_block(self) -> float:
        return self.cpu_s / self.blocks * 1e6 if self.blocks else float("nan")

    def verdict(self) -> str:
        """ok, unsupported, unchecked (drop sink), LOSS (all received were right, some
        were dropped by the receiving socket), or the failures ERROR and FAIL."""
        if self.unsupported:
            return "unsupported"
        if self.error:
            return "ERROR"
        if self.sink != "loopback":
            return "unchecked"  # the drop sink: nothing arrives
        rx = self.rx
        bad = rx.get("bad_len", 0) + rx.get("bad_header", 0) + rx.get("bad_payload", 0)
        if rx.get("err") or rx.get("exit") or bad or not rx.get("checked"):
            return "FAIL"
        if rx.get("received") != self.sent_total:
            return "LOSS"
        return "ok"

    def loss_pct(self) -> float:
        if self.sink != "loopback" or not self.sent_total:
            return 0.0
        return 100 * (1 - self.rx.get("received", 0) / self.sent_total)


# ---- environment -----------------------------------------------------------------------


def _kernel_config(name: str) -> str:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith(name + "=") or line.startswith(f"# {name} is not set"):
                    return line.strip()
    except OSError:
        pass
    return f"{name}: unknown (no /proc/config.gz)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _ksoftirqd_pid(cpu: int) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == f"ksoftirqd/{cpu}":
                    return int(entry)
        except OSError:
            continue
    return None


def _schedstat_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


# ---- sockets, receiver -----------------------------------------------------------------


@contextlib.contextmanager
def _maybe_inside(ns: str | None) -> Iterator[None]:
    if ns is None:
        yield
    else:
        with netns.inside(ns):
            yield


def setup_drop(ns: str) -> None:
    """In namespace `ns`, drop UDP to DROP_DST as it enters lo (after lo's transmit).

    Not at output/postrouting: a packet dropped there fails the send with EPERM."""
    rules = (
        f"table netdev {DROP_TABLE} {{\n"
        "  chain in {\n"
        '    type filter hook ingress device "lo" priority 0; policy accept;\n'
        f"    ip daddr {DROP_DST[0]} udp dport {DROP_DST[1]} counter drop\n"
        "  }\n"
        "}\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules,
                          capture_output=True, text=True, check=False, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")


def _sockets(ns: str | None, sink: str, connected: bool
             ) -> tuple[socket.socket, socket.socket | None, tuple[str, int]]:
    """(sender, receiver or None, destination) for one cell."""
    with _maybe_inside(ns):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM) if sink == "loopback" else None
    try:
        if rx is not None:
            try:
                rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            rx.bind(("127.0.0.1", 0))
            rx.setblocking(False)
            tx.bind(("127.0.0.1", 0))
            dst = rx.getsockname()
        else:
            tx.bind(("127.0.0.1", 0))
            dst = DROP_DST
        tx.setblocking(False)  # as the server's transfer sockets
        if connected:
            tx.connect(dst)
    except BaseException:
        tx.close()
        if rx is not None:
            rx.close()
        raise
    return tx, rx, dst


class Receiver:
    """A forked process draining `rx` with vb_rx_run; stats come back in shared memory."""

    def __init__(self, mod: Any, rx: socket.socket, file_ptr: Any, filesize: int,
                 blksize: int, cpu: int | None) -> None:
        ffi, lib = mod.ffi, mod.lib
        self._ffi = ffi
        self._shm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        base = ffi.from_buffer(self._shm)
        self._stop = ffi.cast("int *", base)
        self._stats = ffi.cast("struct vb_rx_stats *", base + 64)
        self._stop[0] = 0
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:  # the receiver
            code = 1
            try:
                # Die with the sender rather than spin on forever.
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                rc = lib.vb_rx_run(rx.fileno(), self._stop, file_ptr, filesize, blksize, 100,
                                   self._stats)
                code = 0 if rc == 0 else 2
            finally:
                os._exit(code)

    def finish(self) -> dict[str, int]:
        self._stop[0] = 1
        _, status = os.waitpid(self.pid, 0)
        s = self._stats
        out = {name: int(getattr(s, name)) for name in (
            "received", "bytes", "checked", "prefix_checked", "bad_len", "bad_header",
            "bad_payload", "out_of_seq", "first_bad_block", "err")}
        out["exit"] = os.waitstatus_to_exitcode(status)
        self._shm.close()
        return out


# ---- the senders -------------------------------------------------------------------------

Sender = Callable[[int, int], int]


def _check_rc(rc: int, mod: Any, what: str) -> int:
    if rc >= 0:
        return rc
    if rc == -mod.lib.VB_ESHORT:
        raise OSError(0, f"{what}: the file came up short")
    if rc == -4097:
        raise OSError(0, f"{what}: a partial send broke a datagram")
    raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def make_sender(key: str, mod: Any, tx: socket.socket, rx_addr: tuple[str, int], fd: int,
                map_ptr: Any, filesize: int, blksize: int, window: int,
                keep: list[Any]) -> Sender:
    """A function (first, count) -> datagrams sent, for variant `key`."""
    from tftpd import datapath

    ffi, lib = mod.ffi, mod.lib
    sockaddr = datapath.encode_sockaddr(rx_addr)
    addrlen = len(sockaddr)
    sfd = tx.fileno()

    if key in ("a", "a-raw", "b"):
        dp = datapath.get_datapath("python" if key == "b" else "c")
        if key != "a-raw":
            def product(first: int, count: int) -> int:
                return dp.send_window(tx, rx_addr, sockaddr, fd, first, count, blksize,
                                      filesize)
            return product
        # The very C function and scratch buffer DataPath.send_window uses, minus its
        # Python argument checks: what the syscalls cost, called like c..g below.
        # Grow the scratch buffer to a whole window, as send_window would: C batches by
        # scratch_len / blksize blocks per sendmmsg.
        dp.send_window(tx, rx_addr, sockaddr, fd, 1, window, blksize, filesize)
        plib, buf, buflen = dp._lib, dp._buf, dp._scratch_len  # noqa: SLF001 - bench-only
        send_window = plib.tftpd_send_window

        def raw(first: int, count: int) -> int:
            return _check_rc(send_window(sfd, sockaddr, addrlen, fd, filesize, blksize, first,
                                         count, 0, buf, buflen), mod, "tftpd_send_window")
        return raw

    if key == "c":
        f_c = lib.vb_sendfile_window

        def sendfile_(first: int, count: int) -> int:
            return _check_rc(f_c(sfd, fd, filesize, blksize, first, count), mod, "sendfile")
        return sendfile_

    if key in ("d", "e"):
        f_m = lib.vb_mmap_sendmsg_window if key == "d" else lib.vb_mmap_sendmmsg_window

        def mapped(first: int, count: int) -> int:
            return _check_rc(f_m(sfd, sockaddr, addrlen, map_ptr, filesize, blksize, first,
                                 count), mod, key)
        return mapped

    if key == "f":
        rc = lib.vb_gso_probe(sfd)
        if rc < 0:
            raise Unsupported(f"UDP_SEGMENT: {os.strerror(-rc)} (needs Linux >= 4.18)")
        max_segs = max(1, min(lib.VB_MAX_WINDOW, GSO_MAX_PAYLOAD // (blksize + 4)))
        slots = min(window, lib.VB_MAX_WINDOW)
        scratch = ffi.new("char[]", slots * (blksize + 4))
        keep.append(scratch)
        f_g = lib.vb_gso_window
        n = len(scratch)
        probe = f_g(sfd, sockaddr, addrlen, fd, filesize, blksize, 1, min(window, 2),
                    max_segs, scratch, n)
        if probe < 0:
            raise Unsupported(f"UDP GSO send failed: {os.strerror(-probe)}")

        def gso(first: int, count: int) -> int:
            return _check_rc(f_g(sfd, sockaddr, addrlen, fd, filesize, blksize, first, count,
                                 max_segs, scratch, n), mod, "gso")
        return gso

    if key == "g":
        scratch = ffi.new("char[]", min(window, lib.VB_MAX_WINDOW) * blksize)
        keep.append(scratch)
        f_p = lib.vb_pread_sendmmsg_connected
        n = len(scratch)

        def connected(first: int, count: int) -> int:
            return _check_rc(f_p(sfd, fd, filesize, blksize, first, count, scratch, n), mod,
                             "pread+sendmmsg connected")
        return connected

    raise ValueError(f"unknown variant {key!r}")


def drive(send: Sender, window: int, nfull: int, start: int, max_blocks: int,
          max_seconds: float) -> tuple[int, int, int]:
    """Send windows from block `start`, wrapping inside 1..nfull, until max_blocks or
    max_seconds; returns (blocks sent, short calls, next block)."""
    k, sent, short = start, 0, 0
    chunk = max(1, 256 // window)
    clock = time.monotonic
    deadline = clock() + max_seconds
    while sent < max_blocks:
        for _ in range(chunk):
            n = send(k, window)
            sent += n
            k += n
            if n < window:
                short += 1
            if k + window - 1 > nfull:
                k = 1
        if clock() >= deadline:
            break
    return sent, short, k


def run_cell(mod: Any, cell: Cell, ns: str | None, fd: int, map_ptr: Any, filesize: int,
             args: argparse.Namespace, ksoftirqd: int | None) -> None:
    variant = BY_KEY[cell.variant]
    window = MODES[cell.mode]
    blksize = cell.blksize
    nfull = filesize // blksize
    tx, rx, dst = _sockets(ns, cell.sink, variant.connected)
    receiver = None
    keep: list[Any] = []
    try:
        try:
            send = make_sender(cell.variant, mod, tx, dst, fd, map_ptr, filesize, blksize,
                               window, keep)
        except Unsupported as exc:
            cell.unsupported = str(exc)
            return
        if rx is not None:
            # Anything make_sender sent while probing goes before the receiver starts.
            _drain(rx)
            receiver = Receiver(mod, rx, map_ptr, filesize, blksize, args.rx_cpu)
        # Warm up (caches, the route, the page tables of the mapping), untimed.
        warm, _, k = drive(send, window, nfull, 1, min(2048, args.blocks), 0.1)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        ks0 = _schedstat_s(ksoftirqd)
        w0 = time.monotonic()
        c0 = time.process_time()
        blocks, short, _ = drive(send, window, nfull, k, args.blocks, args.seconds)
        c1 = time.process_time()
        w1 = time.monotonic()
        ks1 = _schedstat_s(ksoftirqd)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cell.blocks, cell.short_calls = blocks, short
        cell.cpu_s, cell.wall_s = c1 - c0, w1 - w0
        cell.user_s = r1.ru_utime - r0.ru_utime
        cell.sys_s = r1.ru_stime - r0.ru_stime
        cell.ksoftirqd_s = ks1 - ks0
        cell.sent_total = warm + blocks
    except OSError as exc:
        cell.error = str(exc)
    finally:
        if receiver is not None:
            cell.rx = receiver.finish()
        tx.close()
        if rx is not None:
            rx.close()


def _drain(rx: socket.socket) -> None:
    while True:
        try:
            rx.recv(65536)
        except BlockingIOError:
            return


# ---- report ------------------------------------------------------------------------------

Key = tuple[str, str, str, int]  # sink, variant, mode, blksize


def _median(cells: dict[Key, list[Cell]], key: Key) -> Cell | None:
    """The repetition with the median µs/block (the first one if none measured)."""
    got = cells.get(key)
    if not got:
        return None
    reps = [c for c in got if c.blocks and not c.error and not c.unsupported]
    if not reps:
        return got[0]
    return sorted(reps, key=lambda c: c.us_per_block)[len(reps) // 2]


def _measured(c: Cell | None) -> bool:
    return c is not None and c.blocks > 0 and not c.error and not c.unsupported


def report(cells: dict[Key, list[Cell]], sinks: list[str], variants: list[str],
           modes: list[str], blksizes: list[int]) -> list[str]:
    """The tables, as lines."""
    lines: list[str] = []
    hdr = (f"{'mode':<8} {'blksize':>7} {'var':<5} {'blocks':>8} {'cpu s':>6} "
           f"{'µs/blk':>8} {'blk/cpu-s':>11} {'x py':>6} {'sys%':>5} {'ksirq ms':>8} "
           f"{'full chk':>8} {'loss%':>6} check")
    for sink in sinks:
        for mode in modes:
            w = MODES[mode]
            lines.append("")
            lines.append(f"== sink {sink}, {mode} ({w} block{'s' if w > 1 else ''} per call) ==")
            lines.append(hdr)
            for blksize in blksizes:
                py = _median(cells, (sink, PYTHON, mode, blksize))
                py_us = py.us_per_block if py is not None and _measured(py) else float("nan")
                for v in variants:
                    c = _median(cells, (sink, v, mode, blksize))
                    if c is None:
                        continue
                    if not _measured(c):
                        lines.append(f"{mode:<8} {blksize:>7} {v:<5} "
                                     f"{c.verdict()}: {c.unsupported or c.error}")
                        continue
                    sys_pct = 100 * c.sys_s / max(c.user_s + c.sys_s, 1e-9)
                    checked = str(c.rx.get("checked", "-")) if c.sink == "loopback" else "-"
                    lines.append(
                        f"{mode:<8} {blksize:>7} {v:<5} {c.blocks:>8} {c.cpu_s:>6.2f} "
                        f"{c.us_per_block:>8.2f} {c.blocks / c.cpu_s:>11,.0f} "
                        f"{py_us / c.us_per_block:>6.2f} {sys_pct:>5.0f} "
                        f"{c.ksoftirqd_s * 1e3:>8.1f} {checked:>8} {c.loss_pct():>6.2f} "
                        f"{c.verdict()}")
                lines.append("")

    for sink in sinks:
        lines.append(f"== sink {sink}: µs of sender CPU per block, lower is better; "
                     "* = fastest in its column ==")
        cols = [f"{m[:4]} {b}" for m in modes for b in blksizes]
        lines.append(f"{'var':<6}" + "".join(f"{c:>11}" for c in cols))
        best: dict[tuple[str, int], float] = {}
        for mode in modes:
            for b in blksizes:
                us = [c.us_per_block for v in variants
                      if _measured(c := _median(cells, (sink, v, mode, b))) and c is not None]
                best[(mode, b)] = min(us) if us else float("nan")
        for v in variants:
            row = f"{v:<6}"
            for mode in modes:
                for b in blksizes:
                    c = _median(cells, (sink, v, mode, b))
                    if c is None or not _measured(c):
                        row += f"{'n/a':>11}"
                        continue
                    star = "*" if c.us_per_block == best[(mode, b)] else " "
                    row += f"{c.us_per_block:>10.2f}{star}"
            lines.append(row)
        lines.append("")

    lines.append("== issue 4 target: C (product, a) / Python twin (b), blocks per CPU-second, "
                 "blksize 1456, target >= 3x ==")
    for sink in sinks:
        for mode in modes:
            a = _median(cells, (sink, PRODUCT, mode, 1456))
            b = _median(cells, (sink, PYTHON, mode, 1456))
            if a is not None and b is not None and _measured(a) and _measured(b):
                r = b.us_per_block / a.us_per_block
                lines.append(f"{sink:<8} {mode:<8}: a {a.us_per_block:6.2f} µs/block, "
                             f"b {b.us_per_block:6.2f} µs/block -> {r:4.2f}x  "
                             f"{'met' if r >= 3 else 'NOT met'}")
            else:
                lines.append(f"{sink:<8} {mode:<8}: not measured (needs a and b at 1456)")
    return lines


# ---- main ----------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.variants.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=200_000, help="most blocks per cell")
    p.add_argument("--seconds", type=float, default=3.0, help="most seconds per cell")
    p.add_argument("--reps", type=int, default=1,
                   help="repeat every cell; the tables show the median repetition")
    p.add_argument("--variants", default=",".join(v.key for v in VARIANTS),
                   help="comma-separated keys (default: all)")
    p.add_argument("--blksize", default=",".join(map(str, BLKSIZES)),
                   help="comma-separated block sizes")
    p.add_argument("--modes", default=",".join(MODES), help="lockstep,window")
    p.add_argument("--sinks", default=",".join(SINKS),
                   help="loopback (checked by a receiver), drop (namespace only)")
    p.add_argument("--tx-cpu", type=int, default=0)
    p.add_argument("--rx-cpu", type=int, default=1)
    p.add_argument("--no-netns", action="store_true",
                   help="use the host's loopback instead of a namespace made for the run "
                        "(no drop sink)")
    p.add_argument("--json", metavar="PATH", help="also write every cell here")
    args = p.parse_args(argv)
    args.variant_list = _csv(args.variants)
    for v in args.variant_list:
        if v not in BY_KEY:
            p.error(f"unknown variant {v!r} (have {', '.join(BY_KEY)})")
    try:
        args.blksize_list = [int(b) for b in _csv(args.blksize)]
    except ValueError:
        p.error("--blksize takes comma-separated integers")
    for b in args.blksize_list:
        if not 256 <= b <= 65464:  # FILE_BYTES // 256 blocks: numbers never wrap
            p.error(f"blksize {b} outside 256..65464")
    args.mode_list = _csv(args.modes)
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    args.sink_list = _csv(args.sinks)
    for k in args.sink_list:
        if k not in SINKS:
            p.error(f"unknown sink {k!r}")
    if args.blocks < 1 or args.seconds <= 0 or args.reps < 1:
        p.error("--blocks, --seconds and --reps must be positive")
    return args


def _print_cell(rep: int, cell: Cell) -> None:
    verdict = cell.verdict()
    why = cell.error or cell.unsupported
    if verdict in ("FAIL", "LOSS"):
        why = f"{why} {cell.rx} sent {cell.sent_total}"
    print(f"rep {rep} {cell.sink:<8} {cell.mode:<8} {cell.blksize:>5} {cell.variant:<5} "
          f"{cell.us_per_block:8.2f} µs/blk  {verdict} {why}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: receivers stopped, namespace removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # even when started in the background
    mod = load()
    ncpu = os.cpu_count() or 1
    if args.tx_cpu >= ncpu or args.rx_cpu >= ncpu or args.tx_cpu == args.rx_cpu:
        print("note: sender and receiver cannot have a CPU each; both float",
              file=sys.stderr)
        args.rx_cpu = None
    else:
        os.sched_setaffinity(0, {args.tx_cpu})
    ksoftirqd = _ksoftirqd_pid(args.tx_cpu) if args.rx_cpu is not None else None

    ns: str | None = None
    if not args.no_netns:
        why = netns.available()
        if why:
            print(f"note: {why}; using the host's loopback", file=sys.stderr)
        else:
            netns.cleanup_stale()
            ns = netns.create("variants")
    if ns is None and "drop" in args.sink_list:
        args.sink_list.remove("drop")
    given = sys.argv[1:] if argv is None else argv
    command = "python3 -m bench.variants.run" + (" " + shlex.join(given) if given else "")

    cells: dict[Key, list[Cell]] = {}
    failures = 0
    t_start = time.monotonic()
    try:
        if ns is not None and "drop" in args.sink_list:
            setup_drop(ns)
        print(f"command: {command}")
        print(f"host: {platform.node()}  kernel {platform.release()}  {ncpu} CPUs  "
              f"{_cpu_model()}; python {platform.python_version()}")
        print(f"sender pinned to CPU {args.tx_cpu}, receiver to CPU {args.rx_cpu}; "
              f"{'netns ' + ns if ns else 'host loopback'}; file {FILE_BYTES >> 20} MiB on "
              f"{tempfile.gettempdir()} (page cache warm); each cell <= {args.blocks} blocks "
              f"or <= {args.seconds} s after a 0.1 s warm-up; reps {args.reps}")
        print("CPU = time.process_time() of the sending process only (the receiver is "
              "another process on another CPU).  On loopback the kernel runs the receive "
              "path (IP/UDP input, queueing to the receiving socket) in softirq on the "
              "sender's CPU, mostly inline in the send syscall, and that is charged to the "
              "sender; what is deferred to ksoftirqd is not (column 'ksirq ms').  The drop "
              "sink has no receive path: nftables drops the packet at lo's ingress.")
        print(f"kernel: {_kernel_config('CONFIG_IRQ_TIME_ACCOUNTING')} (were it set, inline "
              "softirq time would not be charged to the sender)")
        sys.stdout.flush()
        with tempfile.TemporaryDirectory(prefix="tftpbench-variants-") as tmp:
            path = os.path.join(tmp, "file.bin")
            with open(path, "wb") as f:
                f.write(os.urandom(FILE_BYTES))
            fd = os.open(path, os.O_RDONLY)
            mm = mmap.mmap(fd, FILE_BYTES, prot=mmap.PROT_READ)
            try:
                map_ptr = mod.ffi.from_buffer(mm)
                os.pread(fd, FILE_BYTES, 0)  # page cache
                for rep in range(1, args.reps + 1):
                    for sink in args.sink_list:
                        for blksize in args.blksize_list:
                            for mode in args.mode_list:
                                for v in args.variant_list:
                                    cell = Cell(sink, v, mode, blksize)
                                    run_cell(mod, cell, ns, fd, map_ptr, FILE_BYTES, args,
                                             ksoftirqd)
                                    cells.setdefault((sink, v, mode, blksize), []).append(cell)
                                    if cell.verdict() in ("FAIL", "ERROR"):
                                        failures += 1
                                    _print_cell(rep, cell)
                del map_ptr
            finally:
                mm.close()
                os.close(fd)
    finally:
        if ns is not None:
            netns.delete(ns)

    for line in report(cells, args.sink_list, args.variant_list, args.mode_list,
                       args.blksize_list):
        print(line)
    print(f"\n{sum(len(c) for c in cells.values())} cells in "
          f"{time.monotonic() - t_start:.0f} s; {failures} failed (FAIL/ERROR)")
    print("\nVariants:")
    for v in VARIANTS:
        if v.key in args.variant_list:
            print(f"  {v.key:<5} {v.title}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "cells": [
                {**asdict(c), "us_per_block": c.us_per_block, "verdict": c.verdict()}
                for reps in cells.values() for c in reps]}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
