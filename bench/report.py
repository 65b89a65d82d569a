"""Tables and plots of bench.run results (results.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tftpd.storm.report import fault_label, fault_note, fmt, ms, reasons


def progress_line(rec: dict) -> str:
    head = f"{rec['server']:13} {rec['workload']:7} {rec['clients']:5} loss {rec['loss_pct']}%"
    if rec.get("faults"):
        head += f" faults {fault_label(rec['faults'])}"
    if rec["status"] != "ok":
        return f"{head}  {rec['status'].upper()}: {rec['note'][:200]}"
    return (f"{head}  ok {rec['ok']}/{rec['clients']} {reasons(rec)}  "
            f"wall {rec['wall_s']:.2f}s  max {fmt(rec['completion_max_s'])}s  "
            f"rrq-rexmit {rec['rrq_retransmits']}  {rec['mb_per_s']:.0f} MB/s  "
            f"{rec['requests_per_s']:.0f} req/s  cpu srv {rec['server_cpu_s']:.2f}s "
            f"gen {rec['gen_cpu_s']:.2f}s other {rec.get('other_cpu_s', 0):.2f}s  "
            f"pss {rec['server_peak_pss_mb']:.1f}MB")


COLUMNS = [
    ("server", 12), ("work", 6), ("N", 5), ("loss", 4), ("ok", 5), ("fail", 5),
    ("wall s", 7), ("done p50", 8), ("p99", 7), ("max", 7),
    ("1st ms p50", 10), ("p99", 7), ("max", 7), ("rrq re", 6), ("MB/s", 6), ("req/s", 7),
    ("srv cpu", 7), ("gen cpu", 7), ("other", 6), ("pss MB", 7),
]


def text_table(records: list[dict]) -> str:
    """One row per storm; completion in seconds, first answer in milliseconds."""
    head = " ".join(f"{name:>{w}}" if i > 1 else f"{name:<{w}}"
                    for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for rec in records:
        if rec["status"] != "ok":
            lines.append(f"{rec['server']:<12} {rec['workload']:<6} {rec['clients']:>5} "
                         f"{rec['loss_pct']:>3}%  {rec['status']}: see note")
            notes.append(f"{rec['server']} {rec['workload']} {rec['clients']}: {rec['note']}")
            continue
        cells = [
            rec["server"], rec["workload"], str(rec["clients"]), f"{rec['loss_pct']}%",
            str(rec["ok"]), str(rec["failed"]), fmt(rec["wall_s"]),
            fmt(rec["completion_p50_s"]), fmt(rec["completion_p99_s"]),
            fmt(rec["completion_max_s"]),
            ms(rec["first_answer_p50_s"]), ms(rec["first_answer_p99_s"]),
            ms(rec["first_answer_max_s"]), str(rec["rrq_retransmits"]),
            f"{rec['mb_per_s']:.0f}", f"{rec['requests_per_s']:.0f}",
            fmt(rec["server_cpu_s"]), fmt(rec["gen_cpu_s"]), fmt(rec.get("other_cpu_s")),
            fmt(rec["server_peak_pss_mb"], "{:.1f}"),
        ]
        lines.append(" ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}"
                              for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))))
        if rec["failed"]:
            notes.append(f"{rec['server']} {rec['workload']} {rec['clients']} "
                         f"loss {rec['loss_pct']}%: failed by reason {reasons(rec)}")
        if rec.get("faults"):
            notes.append(f"{rec['server']} {rec['workload']} {rec['clients']} faults "
                         f"{fault_label(rec['faults'])}: {fault_note(rec['faults'])}")
        if rec.get("note"):
            notes.append(f"{rec['server']} {rec['workload']} {rec['clients']}: {rec['note']}")
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def header(meta: dict) -> str:
    m = meta.get("machine", {})
    lines = [
        f"command: {meta.get('command', '?')}",
        f"machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{int(m.get('mem_total_kb', 0)) // 1024} MiB, kernel {m.get('kernel')}, "
        f"Debian {m.get('debian', '?')}, Python {m.get('python')}",
        f"generator engine: {meta.get('engine')}; tftpd/limit workers: {meta.get('workers')}",
        f"load average at start {' '.join(m.get('loadavg', []))}, "
        f"at end {' '.join(meta.get('loadavg_end', []))}",
    ]
    for name, v in meta.get("versions", {}).items():
        lines.append(f"  {name}: {v}")
    for name, why in meta.get("skipped", {}).items():
        lines.append(f"  {name}: SKIPPED ({why})")
    if "total_s" in meta:
        lines.append(f"total run time: {meta['total_s']:.0f} s")
    return "\n".join(lines)


def plots(records: list[dict], out: Path) -> list[Path]:
    """PNG plots: completion-time CDF per server for each storm size; slowest completion
    against client count for each workload. Returns the files written ([] without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.report: matplotlib not installed; no plots (pip install matplotlib)")
        return []
    written: list[Path] = []
    ok = [r for r in records if r["status"] == "ok"]
    names = list(dict.fromkeys(r["server"] for r in records))
    palette = plt.get_cmap("tab10")
    color = {n: palette(i % 10) for i, n in enumerate(names)}
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in ok:
        groups.setdefault((r["workload"], r["clients"], r["loss_pct"]), []).append(r)
    for (wl, n, loss), recs in sorted(groups.items()):
        if n < 2:
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for r in recs:
            xs = sorted(r.get("completion_s") or [])
            if not xs:
                continue
            ys = [(i + 1) / r["clients"] for i in range(len(xs))]
            ax.step(xs, ys, where="post", color=color[r["server"]],
                    label=f"{r['server']} ({r['ok']}/{r['clients']})")
        ax.set_xlabel("completion time of a client (s)")
        ax.set_ylabel("fraction of clients finished")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{wl}: {n} clients" + (f", {loss}% loss" if loss else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / (f"cdf-{wl}-{n}" + ("" if not loss else f"-loss{loss}") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    by_wl: dict[tuple[str, int], dict[str, list[tuple[int, float, int]]]] = {}
    for r in ok:
        series = by_wl.setdefault((r["workload"], r["loss_pct"]), {})
        worst = r["completion_max_s"]
        if r["failed"] or worst is None:
            worst = r["wall_s"]  # a failed client: the storm's whole length
        series.setdefault(r["server"], []).append((r["clients"], worst, r["failed"]))
    for (wl, loss), series in sorted(by_wl.items()):
        if all(len(v) < 2 for v in series.values()):
            continue
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name in names:
            pts = sorted(series.get(name, []))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    color=color[name])
            for x, y, nfail in pts:
                if nfail:
                    ax.annotate(f"{nfail} failed", (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.margins(y=0.12)
        ax.set_xlabel("clients")
        ax.set_ylabel("slowest client's completion (s)")
        ax.set_title(f"{wl}: slowest completion vs clients" + (f", {loss}% loss" if loss else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        path = out / (f"slowest-{wl}" + ("" if not loss else f"-loss{loss}") + ".png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.report",
                                 description="Print the table of a results.json; redo plots.")
    ap.add_argument("results", help="results.json of a bench.run")
    ap.add_argument("--plots", action="store_true", help="write the PNGs beside it")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    print(header(doc["meta"]))
    print(text_table(doc["runs"]))
    if args.plots:
        for p in plots(doc["runs"], Path(args.results).parent):
            print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
