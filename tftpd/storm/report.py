"""How a storm's figures are printed: the cells of bench's table, and tftpd-storm's table
for one server (the figures seen from the client side; the server's CPU and memory are
bench's, which runs the server itself)."""

from __future__ import annotations


def fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def ms(v: float | None) -> str:
    """Seconds as milliseconds, one decimal below 10 ms."""
    if v is None:
        return "-"
    return f"{v * 1000:.0f}" if v >= 0.01 else f"{v * 1000:.1f}"


def reasons(rec: dict) -> str:
    """`data-timeout:2,rrq-timeout:1`: the failures of a storm by reason."""
    by = rec.get("failed_by") or {}
    return ",".join(f"{k}:{v}" for k, v in sorted(by.items()))


def fault_label(f: dict) -> str:
    """`l5d5r5` for loss, dup and reorder percentages of the generator's faults."""
    return "".join(f"{k[0]}{f[k + '_pct']:g}" for k in ("loss", "dup", "reorder")
                   if f.get(k + "_pct")) or "-"


def fault_note(f: dict) -> str:
    parts = []
    for way in ("sent", "received"):
        d = f.get(way)
        if d:
            parts.append(f"{way} {d['seen']}: dropped {d['dropped']}, doubled "
                         f"{d['duplicated']}, held {d['held']} (overtaken {d['overtaken']}, "
                         f"stale {d['stale']})")
    return "; ".join(parts)


CLIENT_COLUMNS = [
    ("server", 21), ("work", 7), ("N", 5), ("ok", 5), ("fail", 5), ("wall s", 7),
    ("done p50", 8), ("p99", 7), ("max", 7), ("1st ms p50", 10), ("p99", 7), ("max", 7),
    ("rrq re", 6), ("MB/s", 6), ("req/s", 7), ("gen cpu", 7),
]


def _row(cells: list[str], columns: list[tuple[str, int]]) -> str:
    return " ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}"
                    for i, (c, (_, w)) in enumerate(zip(cells, columns, strict=True)))


def client_table(rec: dict) -> str:
    """A storm's summary (StormResult.summary() plus `server`) as a table row and notes."""
    head = _row([name for name, _ in CLIENT_COLUMNS], CLIENT_COLUMNS)
    cells = [
        rec["server"], rec["workload"], str(rec["clients"]), str(rec["ok"]),
        str(rec["failed"]), fmt(rec["wall_s"]), fmt(rec["completion_p50_s"]),
        fmt(rec["completion_p99_s"]), fmt(rec["completion_max_s"]),
        ms(rec["first_answer_p50_s"]), ms(rec["first_answer_p99_s"]),
        ms(rec["first_answer_max_s"]), str(rec["rrq_retransmits"]),
        f"{rec['mb_per_s']:.0f}", f"{rec['requests_per_s']:.0f}", fmt(rec["gen_cpu_s"]),
    ]
    lines = [head, "-" * len(head), _row(cells, CLIENT_COLUMNS)]
    notes = []
    if rec["failed"]:
        notes.append(f"failed by reason {reasons(rec)}")
    if rec.get("faults"):
        notes.append(f"faults {fault_label(rec['faults'])}: {fault_note(rec['faults'])}")
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
