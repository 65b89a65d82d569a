"""The load generator: N simulated boot clients against one TFTP server.

One thread, one epoll loop over every client's socket. Each request of each client gets a
UDP socket (its own TID) of its own; the client follows its workload's retry rules, checks
every byte it receives against bench.content, and records why it failed when it does.

    python3 -m bench.loadgen --server 127.0.0.1:69 --clients 100 pxe

runs one storm against a server whose root was built with `python3 -m bench.content`.
The C core (bench/_cgen) runs the same state machine when it can be built; `--engine`
chooses (both give the same StormResult).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from bench.content import expected
from bench.workload import Step, Workload, load

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
_ACK = struct.Struct("!HH")

# Client ports are handed out in turn from this range (bind), not left to the kernel: a
# port the kernel hands back at once after close would make the next request look like a
# repeat of the last one to a server whose transfer has not ended yet (servers merge
# those, RFC 1350 TIDs). In turn, a port comes back only after ~55000 other requests.
PORT_LO, PORT_HI = 10000, 65000

# Client states
_IDLE, _WAIT_FIRST, _WAIT_OACK_DONE, _DATA, _DONE, _FAILED = range(6)


def encode_rrq(filename: str, options: dict[str, int], mode: str = "octet") -> bytes:
    parts = [b"\x00\x01", filename.encode(), b"\x00", mode.encode(), b"\x00"]
    for k, v in options.items():
        parts += [k.encode(), b"\x00", str(v).encode(), b"\x00"]
    return b"".join(parts)


def encode_error(code: int, msg: str) -> bytes:
    return struct.pack("!HH", OP_ERROR, code) + msg.encode() + b"\x00"


ERR_PROBE_DONE = encode_error(8, "probe done")
ERR_ABORT = encode_error(0, "client abort")
ERR_UNKNOWN_TID = encode_error(5, "unknown transfer ID")


def parse_oack(body: bytes | memoryview) -> dict[str, str] | None:
    """Options of an OACK body (after the opcode), or None when malformed."""
    raw = bytes(body)
    if raw and not raw.endswith(b"\x00"):
        return None
    fields = raw.split(b"\x00")[:-1] if raw else []
    if len(fields) % 2:
        return None
    out: dict[str, str] = {}
    for i in range(0, len(fields), 2):
        try:
            out[fields[i].decode("ascii").lower()] = fields[i + 1].decode("ascii")
        except UnicodeDecodeError:
            return None
    return out


@dataclass(frozen=True)
class Faults:
    """Faults the C generator injects on its own datagrams, in both directions: each one
    it sends or receives is dropped with `loss` %; otherwise doubled with `dup` %; each
    copy is held back `hold_ms` (a range, uniform) with `reorder` %, so that the socket's
    later datagrams overtake it. Seeded: the same seed gives the same choices for the
    same traffic. At most `max_held` copies are held at once (beyond: sent at once)."""

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    hold_ms: tuple[float, float] = (1.0, 30.0)
    seed: int = 1
    max_held: int = 65536

    def __bool__(self) -> bool:
        return self.loss > 0 or self.dup > 0 or self.reorder > 0

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`loss=5,dup=5,reorder=5[,hold=1-30][,seed=N]` (percentages, milliseconds)."""
        kw: dict = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"faults: {item!r} is not NAME=VALUE")
            if key in ("loss", "dup", "reorder"):
                pct = float(val)
                if not 0 <= pct < 100:
                    raise ValueError(f"faults: {key} must be in [0, 100)")
                kw[key] = pct
            elif key == "hold":
                lo, _, hi = val.partition("-")
                pair = (float(lo), float(hi or lo))
                if not 0 <= pair[0] <= pair[1] <= 10_000:
                    raise ValueError("faults: hold is MS or MIN-MAX, 0..10000 ms")
                kw["hold_ms"] = pair
            elif key == "seed":
                kw["seed"] = int(val)
            elif key == "max_held":
                kw["max_held"] = int(val)
            else:
                raise ValueError(f"faults: unknown {key!r} (loss, dup, reorder, hold, seed)")
        return cls(**kw)

    def label(self) -> str:
        """Short form for tables: `l5d5r5`."""
        return "".join(f"{k[0]}{v:g}" for k, v in
                       (("loss", self.loss), ("dup", self.dup), ("reorder", self.reorder))
                       if v) or "-"

    def to_json(self) -> dict:
        return {"loss_pct": self.loss, "dup_pct": self.dup, "reorder_pct": self.reorder,
                "hold_ms": list(self.hold_ms), "seed": self.seed, "max_held": self.max_held}


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


@dataclass
class StormResult:
    workload: str
    clients: int
    server: str
    engine: str
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    completion_s: list[float] = field(default_factory=list)
    first_answer_s: list[float] = field(default_factory=list)
    requests_ok: int = 0
    requests_failed: int = 0
    rrq_sent: int = 0
    rrq_retransmits: int = 0
    ack_retransmits: int = 0
    wrong_tid_packets: int = 0
    duplicate_data: int = 0
    bytes_ok: int = 0
    gen_cpu_s: float = 0.0
    deadline_hit: bool = False
    # What the fault layer did (C engine, `Faults`): the settings, then per direction
    # ("sent", "received") datagrams seen, dropped, duplicated, held, overtaken (a held
    # copy released after a later datagram of its socket passed it: reordered) and
    # stale (held, but its socket had closed by release: lost).
    faults: dict = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def summary(self) -> dict:
        """Scalar figures of the storm (what the tables print)."""
        wall = self.wall_s or 1e-9
        return {
            "workload": self.workload,
            "clients": self.clients,
            "ok": self.ok,
            "failed": self.n_failed,
            "failed_by": dict(sorted(self.failed.items())),
            "wall_s": self.wall_s,
            "completion_p50_s": percentile(self.completion_s, 50),
            "completion_p99_s": percentile(self.completion_s, 99),
            "completion_max_s": max(self.completion_s) if self.completion_s else None,
            "first_answer_p50_s": percentile(self.first_answer_s, 50),
            "first_answer_p99_s": percentile(self.first_answer_s, 99),
            "first_answer_max_s": max(self.first_answer_s) if self.first_answer_s else None,
            "requests_ok": self.requests_ok,
            "requests_per_s": self.requests_ok / wall,
            "rrq_sent": self.rrq_sent,
            "rrq_retransmits": self.rrq_retransmits,
            "ack_retransmits": self.ack_retransmits,
            "wrong_tid_packets": self.wrong_tid_packets,
            "duplicate_data": self.duplicate_data,
            "bytes_ok": self.bytes_ok,
            "mb_per_s": self.bytes_ok / wall / 1e6,
            "gen_cpu_s": self.gen_cpu_s,
            "deadline_hit": self.deadline_hit,
            "engine": self.engine,
            "faults": self.faults,
        }

    def to_json(self) -> dict:
        return asdict(self)


class _Storm:
    """Shared state of one storm (the Python engine)."""

    def __init__(self, server: tuple[str, int], workload: Workload, files: dict[str, bytes],
                 steps: tuple[Step, ...], rrqs: list[bytes], result: StormResult) -> None:
        self.server = server
        self.workload = workload
        self.files = files
        self.steps = steps
        self.rrqs = rrqs
        self.result = result
        self.ep = select.epoll()
        self.by_fd: dict[int, _Client] = {}
        self.next_port = PORT_LO + (os.getpid() * 7919) % (PORT_HI - PORT_LO)
        self.reasons: Counter[str] = Counter()
        self.rules = workload.client


class _Client:
    __slots__ = (
        "st", "idx", "started", "step", "state", "sock", "fd", "tid", "t_req", "rrq_try",
        "deadline", "retries", "blksize", "window", "inwin", "nblk", "exp", "size",
        "gap_acked", "wrong_tid", "iteration", "loop_end", "last_ack", "acked",
    )

    def __init__(self, st: _Storm, idx: int) -> None:
        self.st = st
        self.idx = idx
        self.started = 0.0
        self.step = 0
        self.state = _IDLE
        self.sock: socket.socket | None = None
        self.fd = -1
        self.tid: tuple[str, int] | None = None
        self.t_req = 0.0
        self.rrq_try = 0
        self.deadline = 0.0
        self.retries = 0
        self.blksize = 512
        self.window = 1
        self.inwin = 0
        self.nblk = 1
        self.exp = b""
        self.size = 0
        self.gap_acked = False
        self.wrong_tid = 0
        self.iteration = 0
        self.loop_end = 0.0
        self.last_ack = b""
        self.acked = -1

    # -- lifecycle -------------------------------------------------------------------

    def begin(self, now: float) -> None:
        self.started = now
        rep = self.st.workload.repeat
        self.loop_end = now + rep.seconds if rep else 0.0
        self.step = 0
        self.start_step(now)

    def start_step(self, now: float) -> None:
        st = self.st
        step = st.steps[self.step]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for _ in range(64):
            port = st.next_port
            st.next_port = port + 1 if port + 1 < PORT_HI else PORT_LO
            try:
                sock.bind(("0.0.0.0", port))
                break
            except OSError:
                continue
        self.sock = sock
        self.fd = sock.fileno()
        st.by_fd[self.fd] = self
        st.ep.register(self.fd, select.EPOLLIN)
        self.tid = None
        self.wrong_tid = 0
        self.blksize = 512
        self.window = 1
        self.inwin = 0
        self.nblk = 1
        self.gap_acked = False
        self.retries = 0
        self.last_ack = b""
        self.acked = -1
        if step.expect != "notfound":
            self.exp = st.files[step.file]
            self.size = len(self.exp)
        self.state = _WAIT_FIRST
        self.rrq_try = 0
        self.t_req = now
        self.send_rrq(now)

    def send_rrq(self, now: float) -> None:
        st = self.st
        try:
            self.sock.sendto(st.rrqs[self.step], st.server)  # type: ignore[union-attr]
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self.fail(f"send-{errno.errorcode.get(exc.errno or 0, exc.errno)}")
                return
        st.result.rrq_sent += 1
        if self.rrq_try:
            st.result.rrq_retransmits += 1
        self.deadline = now + st.rules.rrq_timeouts_s[self.rrq_try]
        self.rrq_try += 1

    def close_sock(self) -> None:
        if self.sock is not None:
            st = self.st
            try:
                st.ep.unregister(self.fd)
            except (OSError, ValueError):
                pass
            st.by_fd.pop(self.fd, None)
            self.sock.close()
            self.sock = None
            self.fd = -1

    def step_done(self, now: float) -> None:
        st = self.st
        st.result.requests_ok += 1
        self.close_sock()
        self.step += 1
        if self.step == len(st.steps):
            self.iteration += 1
            rep = st.workload.repeat
            if rep is not None and self.iteration < rep.max and now < self.loop_end:
                self.step = 0
            else:
                self.state = _DONE
                st.result.ok += 1
                st.result.completion_s.append(now - self.started)
                return
        self.start_step(now)

    def fail(self, reason: str) -> None:
        st = self.st
        if self.state in (_DONE, _FAILED):
            return
        if self.sock is not None and self.tid is not None:
            try:
                self.sock.sendto(ERR_ABORT, self.tid)
            except OSError:
                pass
        self.close_sock()
        self.state = _FAILED
        st.reasons[reason] += 1
        st.result.requests_failed += 1

    # -- events ----------------------------------------------------------------------

    def timeout(self, now: float) -> None:
        rules = self.st.rules
        if self.state == _WAIT_FIRST:
            if self.rrq_try < len(rules.rrq_timeouts_s):
                self.send_rrq(now)
            else:
                self.fail("wrong-tid" if self.wrong_tid else "rrq-timeout")
            return
        # Waiting for DATA (or for the server's reaction to ACK 0): re-send the last ACK.
        if self.retries >= rules.ack_retries:
            self.fail("wrong-tid" if self.wrong_tid else "data-timeout")
            return
        self.retries += 1
        self.st.result.ack_retransmits += 1
        self._ack_in_order()
        self.deadline = now + rules.ack_timeout_s

    def _ack_in_order(self) -> None:
        """ACK the last block received in order; the window restarts after it."""
        self.inwin = 0
        self.acked = (self.nblk - 1) & 0xFFFF
        self.last_ack = _ACK.pack(OP_ACK, self.acked)
        try:
            self.sock.sendto(self.last_ack, self.tid)  # type: ignore[union-attr,arg-type]
        except OSError:
            pass

    def packet(self, buf: memoryview, n: int, addr: tuple[str, int], now: float) -> None:
        st = self.st
        if addr != self.tid:
            if self.tid is None and addr[0] == st.server[0] and addr[1] != st.server[1]:
                self.tid = addr
                st.result.first_answer_s.append(now - self.t_req)
            else:
                # Not the transfer's TID: an answer from the listen port itself, a second
                # port, or another host. RFC 1350: drop it, tell the sender.
                self.wrong_tid += 1
                st.result.wrong_tid_packets += 1
                try:
                    self.sock.sendto(ERR_UNKNOWN_TID, addr)  # type: ignore[union-attr]
                except OSError:
                    pass
                return
        if n < 4:
            self.fail("short-packet")
            return
        op = (buf[0] << 8) | buf[1]
        if op == OP_DATA:
            self.data(buf, n, now)
        elif op == OP_OACK:
            self.oack(buf, n, now)
        elif op == OP_ERROR:
            code = (buf[2] << 8) | buf[3]
            step = st.steps[self.step]
            if self.state == _WAIT_FIRST and step.expect == "notfound" and code == 1:
                self.tid = None  # nothing to abort
                self.step_done(now)
            else:
                self.tid = None
                self.fail(f"error-{code}")
        else:
            self.fail("protocol")

    def oack(self, buf: memoryview, n: int, now: float) -> None:
        st = self.st
        step = st.steps[self.step]
        if self.state != _WAIT_FIRST:
            if self.state == _WAIT_OACK_DONE:
                # Our ACK 0 was lost and the server repeats its OACK.
                st.result.duplicate_data += 1
                try:
                    self.sock.sendto(self.last_ack, self.tid)  # type: ignore[union-attr,arg-type]
                except OSError:
                    pass
                return
            if self.state == _DATA:
                # A repeated OACK overtaken by DATA (reordered on the way): ignored.
                st.result.duplicate_data += 1
                return
            self.fail("protocol")
            return
        opts = parse_oack(buf[2:n])
        if opts is None:
            self.fail("bad-oack")
            return
        asked = step.options
        blksize = 512
        window = 1
        for k, v in opts.items():
            if k not in asked or not v.isdigit():
                self.fail("bad-oack")
                return
            val = int(v)
            if k == "blksize":
                if val > asked[k] or val < 8:
                    self.fail("bad-oack")
                    return
                blksize = val
            elif k == "windowsize":
                if val > asked[k] or val < 1:
                    self.fail("bad-oack")
                    return
                window = val
            elif k == "tsize":
                if step.expect != "notfound" and val != self.size:
                    self.fail("bad-tsize")
                    return
            elif k == "timeout" and val != asked[k]:
                self.fail("bad-oack")
                return
        if step.expect == "notfound":
            self.fail("found")
            return
        if step.expect == "probe":
            if "tsize" not in opts:
                self.fail("no-tsize")
                return
            try:
                self.sock.sendto(ERR_PROBE_DONE, self.tid)  # type: ignore[union-attr,arg-type]
            except OSError:
                pass
            self.tid = None
            self.step_done(now)
            return
        self.blksize = blksize
        self.window = window
        self.state = _WAIT_OACK_DONE
        self.acked = 0
        self.last_ack = _ACK.pack(OP_ACK, 0)
        try:
            self.sock.sendto(self.last_ack, self.tid)  # type: ignore[union-attr,arg-type]
        except OSError:
            pass
        self.retries = 0
        self.deadline = now + st.rules.ack_timeout_s

    def data(self, buf: memoryview, n: int, now: float) -> None:
        st = self.st
        if self.state == _WAIT_FIRST:
            step = st.steps[self.step]
            if step.expect == "probe":
                self.fail("no-oack")
                return
            if step.expect == "notfound":
                self.fail("found")
                return
            self.state = _DATA  # options ignored: plain 512-byte lock-step
        elif self.state == _WAIT_OACK_DONE:
            self.state = _DATA
        blk = (buf[2] << 8) | buf[3]
        want = self.nblk & 0xFFFF
        if blk != want:
            diff = (blk - want) & 0xFFFF
            if diff < 0x8000:
                # A gap: RFC 7440, ACK the last block received in order, once.
                if not self.gap_acked:
                    self.gap_acked = True
                    self._ack_in_order()
            else:
                st.result.duplicate_data += 1
                if blk == self.acked:
                    # The server did not see our ACK: repeat it.
                    try:
                        self.sock.sendto(self.last_ack, self.tid)  # type: ignore[union-attr,arg-type]
                    except OSError:
                        pass
            return
        plen = n - 4
        bs = self.blksize
        if plen > bs:
            self.fail("oversize-block")
            return
        off = (self.nblk - 1) * bs
        if off + plen > self.size:
            self.fail("long-file")
            return
        if not self.exp.startswith(buf[4:n], off):
            self.fail("corrupt")
            return
        st.result.bytes_ok += plen
        self.gap_acked = False
        self.retries = 0
        self.deadline = now + st.rules.ack_timeout_s
        self.nblk += 1
        if plen < bs:
            if off + plen != self.size:
                self.fail("short-file")
                return
            try:
                self.sock.sendto(_ACK.pack(OP_ACK, blk), self.tid)  # type: ignore[union-attr,arg-type]
            except OSError:
                pass
            self.tid = None
            self.step_done(now)
            return
        self.inwin += 1
        if self.inwin >= self.window:
            self.inwin = 0
            self.acked = blk
            self.last_ack = _ACK.pack(OP_ACK, blk)
            try:
                self.sock.sendto(self.last_ack, self.tid)  # type: ignore[union-attr,arg-type]
            except OSError:
                pass


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _cpu_now() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def apply_overrides(workload: Workload, overrides: dict[str, int] | None) -> tuple[Step, ...]:
    """The workload's steps with `overrides` applied to the options of every data step."""
    if not overrides:
        return workload.sequence
    out = []
    for s in workload.sequence:
        if s.expect == "data":
            opts = dict(s.options)
            for k, v in overrides.items():
                if v < 0:
                    opts.pop(k, None)
                else:
                    opts[k] = v
            s = Step(file=s.file, options=opts, expect=s.expect)
        out.append(s)
    return tuple(out)


def run_storm_python(
    server: tuple[str, int],
    workload: Workload,
    clients: int,
    *,
    files: dict[str, bytes] | None = None,
    deadline_s: float | None = None,
    ramp_ms: float | None = None,
    overrides: dict[str, int] | None = None,
) -> StormResult:
    """One storm with the pure-Python engine. Returns when every client has finished or
    failed, or at the deadline (unfinished clients then fail with reason `deadline`)."""
    files = expected(workload) if files is None else files
    steps = apply_overrides(workload, overrides)
    rrqs = [encode_rrq(s.file, s.options) for s in steps]
    result = StormResult(workload=workload.name, clients=clients,
                         server=f"{server[0]}:{server[1]}", engine="python")
    _raise_nofile(clients + 256)
    st = _Storm(server, workload, files, steps, rrqs, result)
    ramp = (workload.ramp_ms if ramp_ms is None else ramp_ms) / 1000.0
    limit = workload.default_deadline_s(clients) if deadline_s is None else deadline_s
    all_clients = [_Client(st, i) for i in range(clients)]
    buf = bytearray(65536 + 4)
    mv = memoryview(buf)
    cpu0 = _cpu_now()
    t0 = time.monotonic()
    hard_end = t0 + limit
    starts = [t0 + ramp * i / clients for i in range(clients)] if ramp > 0 else None
    next_start = 0
    running: list[_Client] = []
    next_scan = t0
    by_fd = st.by_fd
    poll = st.ep.poll
    mono = time.monotonic
    try:
        while True:
            now = mono()
            if now >= hard_end:
                result.deadline_hit = True
                break
            while next_start < clients and (starts is None or starts[next_start] <= now):
                c = all_clients[next_start]
                next_start += 1
                running.append(c)
                c.begin(now)
            if now >= next_scan:
                alive = []
                for c in running:
                    if c.state == _DONE or c.state == _FAILED:
                        continue
                    if c.deadline <= now:
                        c.timeout(now)
                        if c.state == _DONE or c.state == _FAILED:
                            continue
                    alive.append(c)
                running = alive
                next_scan = now + 0.01
                if not running and next_start >= clients:
                    break
            wait = next_scan - now
            if next_start < clients and starts is not None:
                wait = min(wait, starts[next_start] - now)
            events = poll(max(0.0, wait), 1024)
            if not events:
                continue
            now = mono()
            for fd, _ev in events:
                c = by_fd.get(fd)
                if c is None:
                    continue
                sock = c.sock
                for _ in range(64):
                    try:
                        n, addr = sock.recvfrom_into(buf)  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    except OSError:
                        break  # ICMP errors (port unreachable) surface here; timers decide
                    c.packet(mv, n, addr, now)
                    if c.sock is not sock:
                        break
    finally:
        wall = time.monotonic() - t0
        for c in all_clients:
            if c.state not in (_DONE, _FAILED):
                c.fail("deadline" if c.state != _IDLE else "not-started")
        st.ep.close()
        result.wall_s = wall
        result.gen_cpu_s = _cpu_now() - cpu0
        result.failed = dict(st.reasons)
    return result


def run_storm(
    server: tuple[str, int],
    workload: Workload,
    clients: int,
    *,
    engine: str = "auto",
    files: dict[str, bytes] | None = None,
    deadline_s: float | None = None,
    ramp_ms: float | None = None,
    overrides: dict[str, int] | None = None,
    faults: Faults | None = None,
) -> StormResult:
    """One storm: `clients` clients of `workload` against `server` (host, port).

    engine: "python", "c" (bench/_cgen, built at first use), or "auto" (C when it builds).
    `faults` need the C engine.
    """
    if faults and engine == "python":
        raise ValueError("faults are injected by the C engine only")
    if faults:
        from bench import cgen
        return cgen.run_storm_c(server, workload, clients, files=files, deadline_s=deadline_s,
                                ramp_ms=ramp_ms, overrides=overrides, faults=faults)
    if engine in ("c", "auto"):
        try:
            from bench import cgen
            runner = cgen.run_storm_c
        except Exception as exc:  # noqa: BLE001 - a missing compiler falls back
            if engine == "c":
                raise
            print(f"bench.loadgen: C engine unavailable ({exc}); using Python",
                  file=sys.stderr)
        else:
            return runner(server, workload, clients, files=files, deadline_s=deadline_s,
                          ramp_ms=ramp_ms, overrides=overrides)
    return run_storm_python(server, workload, clients, files=files, deadline_s=deadline_s,
                            ramp_ms=ramp_ms, overrides=overrides)


def parse_overrides(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k.strip()] = int(v) if v else -1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", help="workload name (bench/workloads/NAME.json) or path")
    ap.add_argument("--server", default="127.0.0.1:69", help="HOST:PORT (default %(default)s)")
    ap.add_argument("--clients", type=int, default=None, help="default: the workload's first")
    ap.add_argument("--deadline", type=float, default=None, help="seconds; default from rules")
    ap.add_argument("--ramp-ms", type=float, default=None)
    ap.add_argument("--engine", choices=("auto", "python", "c"), default="auto")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="override an option of every data step (NAME= drops it)")
    ap.add_argument("--faults", default="", metavar="loss=P,dup=P,reorder=P",
                    help="inject faults on the generator's datagrams (C engine; see "
                         "bench/README.md, Faults)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args(argv)
    wl = load(args.workload)
    host, _, port = args.server.rpartition(":")
    clients = args.clients if args.clients is not None else wl.clients[0]
    res = run_storm((host, int(port)), wl, clients, engine=args.engine,
                    deadline_s=args.deadline, ramp_ms=args.ramp_ms,
                    overrides=parse_overrides(args.option),
                    faults=Faults.parse(args.faults) if args.faults else None)
    if args.json:
        json.dump(res.to_json(), sys.stdout)
        print()
    else:
        for k, v in res.summary().items():
            print(f"{k:20} {v}")
    return 0 if res.n_failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
