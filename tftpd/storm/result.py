"""What a storm measured (StormResult) and the faults the C engine injects (Faults).

Both engines fill a StormResult; `summary()` holds the scalar figures the tables print and
`tftpd-storm --json` emits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _number(kind: type, key: str, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} is not a number: {text!r}") from None


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
                pct = _number(float, key, val)
                if not 0 <= pct < 100:
                    raise ValueError(f"faults: {key} must be in [0, 100)")
                kw[key] = pct
            elif key == "hold":
                lo, _, hi = val.partition("-")
                pair = (_number(float, key, lo), _number(float, key, hi or lo))
                if not 0 <= pair[0] <= pair[1] <= 10_000:
                    raise ValueError("faults: hold is MS or MIN-MAX, 0..10000 ms")
                kw["hold_ms"] = pair
            elif key == "seed":
                kw["seed"] = _number(int, key, val)
            elif key == "max_held":
                kw["max_held"] = _number(int, key, val)
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
