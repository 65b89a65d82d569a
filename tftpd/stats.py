"""Counters per worker in shared memory, summed by the master.

The master maps one anonymous shared range before forking. Each worker process owns
a row of 64-bit counters and is the only writer of it: a replacement for a dead
worker continues its row, and after a reload the new generation of a slot writes a
row of its own while the old one drains, so no two processes ever add to the same
cell. Totals are sums over all rows, and survive worker restarts and reloads.

The last cell of a row is no counter but the worker's heartbeat: the monotonic clock
(ns) at its last loop turn, which the master reads to find a worker that has stopped
turning (master.HUNG_AFTER).
"""

from __future__ import annotations

import bisect
import mmap
import time

# Histogram bounds, seconds (Prometheus "le" buckets; +Inf is the count).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTOGRAMS = ("duration", "first_answer", "http_duration")

COUNTERS = ("requests", "ok", "probe", "aborted", "failed", "notfound", "denied",
            "refused_busy", "merged", "malformed", "bytes", "retransmits", "cache_hits",
            "miss_cache_hits", "forwarded", "c_starts", "hook_failed", "hook_timed_out")
GAUGES = ("active", "listening")
# HTTP (tftpd.http), written by the worker's HTTP threads under their HttpTally's lock:
# never a cell the TFTP loop adds to, so the TFTP loop takes no lock.
HTTP_COUNTERS = ("http_requests", "http_ok", "http_aborted", "http_failed", "http_notfound",
                 "http_denied", "http_refused_busy", "http_malformed", "http_bytes",
                 "http_hook_failed", "http_hook_timed_out")
HTTP_GAUGES = ("http_connections",)
FIELDS = COUNTERS + GAUGES + HTTP_COUNTERS + HTTP_GAUGES + tuple(
    f"{h}_{suffix}" for h in HISTOGRAMS
    for suffix in [*(f"b{i}" for i in range(len(BUCKETS))), "count", "sum_us"]) + ("beat",)
INDEX = {name: i for i, name in enumerate(FIELDS)}
BEAT = INDEX["beat"]  # not summed
# Outcome of a finished transfer or refusal -> its counter.
OUTCOME = {name: INDEX[name] for name in ("ok", "probe", "aborted", "failed", "notfound",
                                         "denied")}
GENERATIONS = 4  # rows per worker slot: generations alive at once across reloads


# A histogram's cells are contiguous: its buckets, then count, then sum_us.
_FIRST = {h: INDEX[f"{h}_b0"] for h in HISTOGRAMS}
_NB = len(BUCKETS)


def beat(row: memoryview) -> None:
    """The worker owning `row` is alive now (for long steps outside its loop)."""
    row[BEAT] = time.monotonic_ns()


def observe(row: memoryview, histogram: str, seconds: float) -> None:
    """Count one observation into a row's histogram (once or twice per request:
    no string is built here)."""
    base = _FIRST[histogram]
    i = bisect.bisect_left(BUCKETS, seconds)
    if i < _NB:
        row[base + i] += 1
    row[base + _NB] += 1
    row[base + _NB + 1] += max(0, int(seconds * 1e6))


class Stats:
    def __init__(self, slots: int) -> None:
        self.rows = slots * GENERATIONS
        self._mm = mmap.mmap(-1, max(1, self.rows * len(FIELDS) * 8))  # MAP_SHARED|ANON
        self._all = memoryview(self._mm).cast("Q")

    def row(self, slot: int, generation: int = 0) -> memoryview:
        """The writable counters of one worker process, indexed by INDEX."""
        n = len(FIELDS)
        r = slot * GENERATIONS + generation % GENERATIONS
        return self._all[r * n:(r + 1) * n]

    def totals(self) -> dict[str, int]:
        n = len(FIELDS)
        out = dict.fromkeys(FIELDS[:BEAT], 0)
        for r in range(self.rows):
            base = r * n
            for i, name in enumerate(FIELDS[:BEAT]):
                out[name] += self._all[base + i]
        return out

    def summary(self) -> str:
        t = self.totals()
        names = COUNTERS + GAUGES
        if t["http_requests"] or t["http_connections"]:  # HTTP's, once it has served
            names += HTTP_COUNTERS + HTTP_GAUGES
        return " ".join(f"{k}={t[k]}" for k in names)
