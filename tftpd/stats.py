"""Counters per worker in shared memory, summed by the master.

The master maps one anonymous shared page range before forking; each worker slot
owns a row of 64-bit counters and is the only writer of it. A replacement worker
takes over its slot's row, so totals survive worker restarts.
"""

from __future__ import annotations

import mmap

FIELDS = ("requests", "ok", "probe", "aborted", "failed", "notfound", "denied",
          "refused_busy", "merged", "malformed", "bytes", "retransmits", "cache_hits",
          "miss_cache_hits")
INDEX = {name: i for i, name in enumerate(FIELDS)}
# Outcome of a finished transfer or refusal -> its counter.
OUTCOME = {name: INDEX[name] for name in ("ok", "probe", "aborted", "failed", "notfound",
                                         "denied")}


class Stats:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mm = mmap.mmap(-1, max(1, slots * len(FIELDS) * 8))  # MAP_SHARED|ANONYMOUS
        self._all = memoryview(self._mm).cast("Q")

    def row(self, slot: int) -> memoryview:
        """The writable counters of one worker slot, indexed by INDEX."""
        n = len(FIELDS)
        return self._all[slot * n:(slot + 1) * n]

    def totals(self) -> dict[str, int]:
        n = len(FIELDS)
        out = dict.fromkeys(FIELDS, 0)
        for slot in range(self.slots):
            for i, name in enumerate(FIELDS):
                out[name] += self._all[slot * n + i]
        return out

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.totals().items())
