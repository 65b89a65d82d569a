"""Log handling shared by the master and the workers.

A worker finishes thousands of probes a second, each with its one log line; writing
them one write(2) at a time would cost as much as answering them. Workers switch
their handler to batching and flush once per loop turn.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("tftpd")
ATOMIC_WRITE = 4000  # characters; a pipe write below PIPE_BUF (4096) is atomic


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, once a worker asks for it, writes its lines once per
    loop turn instead of once per record: a few write(2)s for a burst of finished
    probes. Each write holds whole lines and stays under PIPE_BUF, so that on a pipe
    (journald, a supervisor) as in an O_APPEND file the lines of different workers
    never interleave mid-line."""

    batching = False

    def __init__(self, stream: object) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not self.batching:
            super().emit(record)
            return
        try:
            self.pending.append(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never take the server down
            self.handleError(record)
        if len(self.pending) >= 256:
            self.flush()

    def flush(self) -> None:
        # Lines come from more than one thread (the HTTP server has its own): under
        # the handler's lock the lines written so far are taken off the front of the
        # one list, so a line appended meanwhile goes out now or next time, never lost.
        with self.lock:  # type: ignore[union-attr]
            n = len(self.pending)
            pending = self.pending[:n]
            del self.pending[:n]
            chunk: list[str] = []
            size = 0
            try:
                for line in pending:
                    if chunk and size + len(line) > ATOMIC_WRITE:
                        self._write("".join(chunk))
                        chunk, size = [], 0
                    chunk.append(line)
                    size += len(line)
                if chunk:
                    self._write("".join(chunk))
            except OSError:
                pass
            super().flush()

    def _write(self, data: str) -> None:
        self.stream.write(data)
        self.stream.flush()  # one write(2) per chunk, never a split line


def flush_logs() -> None:
    for h in log.handlers:
        h.flush()


def start_batching() -> None:
    for h in log.handlers:
        if isinstance(h, BatchingHandler):
            h.batching = True
    _fast.clear()
    _fast.extend(_direct_lines())


# (handler, prefix, suffix) for each handler, when INFO lines may skip the LogRecord.
_fast: list[tuple[BatchingHandler, str, str]] = []


def _direct_lines() -> list[tuple[BatchingHandler, str, str]]:
    """Where every INFO record would only be formatted by a constant prefix and
    suffix around its message (no time, no filters, no other handler), the worker
    writes its per-request lines straight into the batch: at thousands of probes a
    second, a LogRecord per line costs as much as the answer itself."""
    if not log.isEnabledFor(logging.INFO) or log.filters or not log.handlers \
            or (log.propagate and logging.getLogger().handlers):
        return []
    out = []
    mark = "\x00message\x00"
    for h in log.handlers:
        fmt = h.formatter
        if not isinstance(h, BatchingHandler) or not h.batching or h.filters \
                or h.level > logging.INFO or type(fmt) is not logging.Formatter \
                or fmt.usesTime():
            return []
        record = logging.LogRecord(log.name, logging.INFO, __file__, 0, mark, None, None)
        text = fmt.format(record)
        if text.count(mark) != 1:
            return []
        prefix, suffix = text.split(mark)
        out.append((h, prefix, suffix + "\n"))
    return out


def info_line(message: str) -> None:
    """log.info(message), without a LogRecord where start_batching() found that
    allowed; the same text either way."""
    if not _fast:
        log.info("%s", message)
        return
    for h, prefix, suffix in _fast:
        h.pending.append(prefix + message + suffix)
        if len(h.pending) >= 256:
            h.flush()




class Throttle:
    """A bound on the log lines that strangers can make a worker write.

    Anyone can send a datagram, so every line that input from the network causes
    goes through one of these: at most `per_address` lines from one address and
    `total` (None: no bound) in all per `interval` seconds. What is held back is
    counted, by address, and said once the interval is over ("N more like this from
    ADDR"), so a flood costs a few lines and the counters (metrics) still see every
    event. Memory is bounded too: past `track` addresses in one interval, the rest
    share one count.
    """

    SUMMARY_LINES = 10  # addresses named in a summary; the rest are counted together

    def __init__(self, what: str, per_address: int, total: int | None = None,
                 interval: float = 10.0, track: int = 4096) -> None:
        self.what = what
        self.per_address = per_address
        self.total = total
        self.interval = interval
        self.track = track
        self.window_end = 0.0
        self.lines: dict[str, int] = {}  # lines written this interval, by address
        self.held: dict[str, int] = {}  # lines held back this interval, by address
        self.written = 0
        self.held_untracked = 0

    def allow(self, addr: str, now: float) -> bool:
        """Whether a line caused by `addr` may be written now (counted if not)."""
        if now >= self.window_end:
            self.roll(now)
        n = self.lines.get(addr, 0)
        if n < self.per_address and (self.total is None or self.written < self.total):
            if n or len(self.lines) < self.track:
                self.lines[addr] = n + 1
            self.written += 1
            return True
        if addr in self.held or len(self.held) < self.track:
            self.held[addr] = self.held.get(addr, 0) + 1
        else:
            self.held_untracked += 1
        return False

    def roll(self, now: float) -> None:
        """End the interval if it is over: say what was held back, start afresh."""
        if now < self.window_end:
            return
        if self.held or self.held_untracked:
            top = sorted(self.held.items(), key=lambda kv: -kv[1])
            for addr, n in top[:self.SUMMARY_LINES]:
                log.warning("%d more like this from %s (%s, last %.0fs)", n, addr,
                            self.what, self.interval)
            rest = top[self.SUMMARY_LINES:]
            others = sum(n for _, n in rest) + self.held_untracked
            if others:
                log.warning("%d more like this from %d other address(es) (%s, last %.0fs)",
                            others, len(rest) + (1 if self.held_untracked else 0),
                            self.what, self.interval)
        self.lines.clear()
        self.held.clear()
        self.written = self.held_untracked = 0
        self.window_end = now + self.interval


class SharedThrottle(Throttle):
    """A Throttle that several threads ask (the HTTP threads of one worker): one bound
    for them all, taken under a lock."""

    def __init__(self, what: str, per_address: int, total: int | None = None,
                 interval: float = 10.0, track: int = 4096) -> None:
        super().__init__(what, per_address, total, interval, track)
        self._lock = threading.RLock()  # allow() may roll()

    def allow(self, addr: str, now: float) -> bool:
        with self._lock:
            return super().allow(addr, now)

    def roll(self, now: float) -> None:
        with self._lock:
            super().roll(now)
