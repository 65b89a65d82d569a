"""The storm's Python engine: N simulated boot clients against one TFTP server.

One thread, one epoll loop over every client's socket. Each request of each client gets a
UDP socket (its own TID) of its own; the client follows its workload's retry rules, checks
what it receives, and records why it failed when it does. What it checks depends on what
it knows of a file (`files` of run_storm_python): its bytes (every payload byte is
compared), or nothing (None: the bytes received must add up to the tsize the server
announced, when the step asks tsize).

The C engine (tftpd/storm/_cgen.c) is a transcription of this state machine; both give
the same StormResult.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import struct
import time
from collections import Counter

from tftpd.storm.content import expected
from tftpd.storm.result import StormResult
from tftpd.storm.workload import Step, Workload, size_sources

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6
_ACK = struct.Struct("!HH")

# Client ports are handed out in turn from this range (bind), not left to the kernel: a
# port the kernel hands back at once after close would make the next request look like a
# repeat of the last one to a server whose transfer has not ended yet (servers merge
# those, RFC 1350 TIDs). In turn, a port comes back only after ~55000 other requests.
PORT_LO, PORT_HI = 10000, 65000

# A file whose size no one has announced (no tsize asked, bytes unknown).
UNKNOWN_SIZE = -1

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


class _Storm:
    """Shared state of one storm (the Python engine)."""

    def __init__(self, server: tuple[str, int], workload: Workload, files: dict[str, bytes | None],
                 steps: tuple[Step, ...], rrqs: list[bytes], result: StormResult) -> None:
        self.server = server
        self.workload = workload
        self.files = files
        self.steps = steps
        self.sources = size_sources(steps)
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
        "gap_acked", "wrong_tid", "iteration", "loop_end", "last_ack", "acked", "announced",
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
        self.exp: bytes | None = b""
        self.size = 0  # UNKNOWN_SIZE until an OACK announces it
        self.announced = [UNKNOWN_SIZE] * len(st.steps)  # tsize each step was told
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
            if self.exp is not None:
                self.size = len(self.exp)
            else:  # held to the size an earlier step was told, if one asked
                source = st.sources[self.step]
                self.size = self.announced[source] if source >= 0 else UNKNOWN_SIZE
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
                if step.expect == "notfound":
                    pass
                elif self.exp is None and self.size == UNKNOWN_SIZE:
                    self.size = val  # the bytes are unknown: hold the server to its word
                    self.announced[self.step] = val
                elif val != self.size:
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
        """DATA for this client. The block rules are transfer.Receiver's, written out
        here rather than called: this is the load generator whose numbers are compared
        with other servers', and it behaves as the ROMs it stands for (it repeats its
        last ACK on every copy of the block that ACK named, and counts copies and gaps
        apart for the report), which the Receiver, a careful client, does not. Its
        rollover is 0 (the default of every server benchmarked), and it keeps the
        per-block work inline, one datagram per call at storm rates. The C generator
        (tftpd/storm/_cgen.c, on_data) does the same."""
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
        if self.size != UNKNOWN_SIZE and off + plen > self.size:
            self.fail("long-file")
            return
        if self.exp is not None and not self.exp.startswith(buf[4:n], off):
            self.fail("corrupt")
            return
        st.result.bytes_ok += plen
        self.gap_acked = False
        self.retries = 0
        self.deadline = now + st.rules.ack_timeout_s
        self.nblk += 1
        if plen < bs:
            if self.size != UNKNOWN_SIZE and off + plen != self.size:
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


def raise_nofile(need: int) -> int:
    """Raise the soft limit of open files towards `need` (within the hard limit unless
    privileged); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


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
    files: dict[str, bytes | None] | None = None,
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
    raise_nofile(clients + 256)
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
