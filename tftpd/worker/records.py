"""The books of a worker: its counters (the stats row the master reads) and the log
record of each request it answers and each transfer that ends."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tftpd import logs
from tftpd import stats as S
from tftpd.files import FileCache, sanitize
from tftpd.transfer import Finish
from tftpd.worker.sessions import Session, peer_text

log = logging.getLogger("tftpd")

BUSY_LOG_INTERVAL = 10.0  # s between "server full" reports
# Log lines that input from the network causes, per worker and 10 s (logs.Throttle):
# - from requests and datagrams that proved nothing (refusals, misses, malformed or
#   stray datagrams, foreign TIDs, transfers never answered): anyone can send them,
#   from any address, so per address and in all;
NOISE_PER_ADDRESS, NOISE_TOTAL = 100, 1000
# - records of transfers whose client answered from its address (a round trip to a
#   port no one could guess): per address, and in all with room for a storm's
#   thousands of real clients (an mfs boot is 11 records), since one host may answer
#   from every address of its IPv6 /64.
RECORDS_PER_ADDRESS, RECORDS_TOTAL = 200, 20_000


@dataclass(slots=True)  # not frozen: made per transfer, and frozen costs 4x to make
class Record:
    """One finished transfer, as its log line tells it."""

    peer: tuple
    name: str
    mode: str
    nbytes: int
    blksize: int
    window: int
    duration: float
    retransmits: int
    outcome: str
    detail: str
    asked: dict
    granted: dict
    op: str  # RRQ or WRQ
    answered: bool  # the client answered from its address (proved it is there)


class TransferLog:
    def __init__(self, counters: memoryview, files: FileCache, json_log: bool) -> None:
        self.counters = counters
        self.files = files
        self.json_log = json_log
        self.noise = logs.Throttle("unproven input", NOISE_PER_ADDRESS, NOISE_TOTAL)
        self.records = logs.Throttle("transfer records", RECORDS_PER_ADDRESS, RECORDS_TOTAL)
        self.busy_refusals = 0
        self.busy_logged_at = 0.0
        self._hits_reported = 0
        self._misses_reported = 0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[S.INDEX[name]] += n

    def roll(self, now: float) -> None:
        """What the throttles held back, said once a while."""
        self.noise.roll(now)
        self.records.roll(now)

    def refused(self, src: tuple, code: int, message: str, outcome: str, name: str,
                mode: str, options: dict, reason: str, now: float, live: int) -> None:
        """A request answered with an ERROR (`live`: transfers in this worker)."""
        if outcome == "busy":
            # A flood of refusals is counted, and logged once per interval.
            self.counters[S.INDEX["refused_busy"]] += 1
            self.busy_refusals += 1
            if now - self.busy_logged_at >= BUSY_LOG_INTERVAL:
                log.warning("server full (%d transfers in this worker): refused %d "
                            "request(s) since the last report", live, self.busy_refusals)
                self.busy_refusals = 0
                self.busy_logged_at = now
            return
        self.counters[S.OUTCOME.get(outcome, S.INDEX["failed"])] += 1
        if self.noise.allow(src[0], now):
            self._refusal_line(src, name, mode, outcome, code, reason or message, options)

    def answered_miss(self, src: tuple, note: tuple, now: float) -> None:
        """A known miss the data path answered (note: KnownAnswer.note)."""
        if not self.noise.allow(src[0], now):
            return
        name, mode, code, reason, options = note
        self._refusal_line(src, name, mode, "notfound", code, reason, options)

    def _refusal_line(self, src: tuple, name: str, mode: str, outcome: str, code: int,
                      reason: str, options: dict) -> None:
        if not self.json_log:
            logs.info_line(f"{peer_text(src)} file={name} protocol=tftp mode={mode} "
                           f"outcome={outcome} error={code} reason={reason}")
            return
        extra = {"transfer": {"client": src[0], "port": src[1], "file": name,
                              "protocol": "tftp", "mode": mode,
                              "options": clean(options), "outcome": outcome,
                              "error": code, "reason": reason}}
        log.info("%s file=%s protocol=tftp mode=%s outcome=%s error=%d reason=%s",
                 peer_text(src), name, mode, outcome, code, reason, extra=extra)

    def ended(self, session: Session, fin: Finish, now: float, live: int) -> None:
        """A transfer ended (`live`: the transfers left in this worker)."""
        t = session.transfer
        c = self.counters
        c[S.OUTCOME.get(fin.outcome, S.INDEX["failed"])] += 1
        c[S.INDEX["bytes"]] += t.bytes_sent
        c[S.INDEX["retransmits"]] += t.retransmits
        c[S.INDEX["active"]] = live
        S.observe(c, "duration", now - session.started)
        st = self.files.stats
        # Deltas: after a reload another process may continue this row's totals.
        c[S.INDEX["cache_hits"]] += st.hits - self._hits_reported
        c[S.INDEX["miss_cache_hits"]] += st.miss_hits - self._misses_reported
        self._hits_reported, self._misses_reported = st.hits, st.miss_hits
        if self.admits(session.peer, t.answered):
            self.write(Record(session.peer, session.name, session.mode, t.bytes_sent,
                              t.blksize, t.windowsize, now - session.started,
                              t.retransmits, fin.outcome, fin.detail, session.asked,
                              session.granted, "WRQ" if session.upload else "RRQ",
                              t.answered))

    def admits(self, peer: tuple, answered: bool) -> bool:
        """Whether the record of this peer's transfer is written: a client who never
        answered from its address gets the budget of unproven input. Asked before the
        record is made, since a storm's records are mostly held back."""
        throttle = self.records if answered else self.noise
        return throttle.allow(peer[0], time.monotonic())

    def write(self, r: Record) -> None:
        """One line per finished transfer, whatever its end, once admits() let it."""
        reason = f" reason={sanitize(r.detail, 200)}" if r.detail else ""
        if not self.json_log:
            logs.info_line(f"{peer_text(r.peer)} file={r.name} protocol=tftp mode={r.mode} "
                           f"bytes={r.nbytes} blksize={r.blksize} window={r.window} "
                           f"duration={r.duration:.3f}s retransmits={r.retransmits} "
                           f"outcome={r.outcome}{reason}")
            return
        extra = {"transfer": {
            "client": r.peer[0], "port": r.peer[1], "file": r.name, "protocol": "tftp",
            "mode": r.mode,
            "op": r.op, "options": clean(r.asked), "granted": r.granted, "bytes": r.nbytes,
            "blksize": r.blksize, "windowsize": r.window,
            "duration_s": round(r.duration, 6), "retransmits": r.retransmits,
            "outcome": r.outcome, "reason": sanitize(r.detail, 200)}}
        log.info("%s file=%s protocol=tftp mode=%s bytes=%d blksize=%d window=%d "
                 "duration=%.3fs retransmits=%d outcome=%s%s", peer_text(r.peer), r.name,
                 r.mode, r.nbytes,
                 r.blksize, r.window, r.duration, r.retransmits, r.outcome, reason,
                 extra=extra)


def clean(options: dict[str, str]) -> dict[str, str]:
    return {sanitize(k, 20): sanitize(v, 20) for k, v in options.items()}


def opts_text(options: dict[str, str]) -> str:
    return " ".join(f"{sanitize(k, 20)}={sanitize(v, 20)}" for k, v in options.items())
