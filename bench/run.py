"""Run boot storms against TFTP servers, each in a network namespace of its own.

    python3 -m bench.run --standard                 # the standard set (< 10 minutes)
    python3 -m bench.run --servers hpa,limit --workloads pxe --clients 100,1000
    python3 -m bench.run --servers tftpd --workloads pxe --clients 100 --loss 1,5
    python3 -m bench.run --servers tftpd,limit --clients 1000 --faults loss=5,dup=5,reorder=5
    python3 -m bench.run --list                     # which servers can run here
    python3 -m bench.run --servers tftpd,nginx --workloads http --clients 64   # HTTP

For each storm: a namespace (loopback only) is made, the server is started inside it on
127.0.0.1:69 with a root built from the workload, the load generator runs inside the same
namespace (a forked child that setns(2)s into it), then everything is stopped and the
namespace removed. Results go to bench/results/<time>/ (results.json, table.txt, PNGs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import netns, report
from bench.measure import MemorySampler, ProcessGroup, cleanup_stale_groups, host_cpu
from bench.servers import SERVERS, STANDARD, Server
from tftpd.config import default_workers
from tftpd.storm.content import build_root, expected
from tftpd.storm.engine import choose, run_storm
from tftpd.storm.result import Faults, StormResult
from tftpd.storm.workload import Workload, load

HERE = Path(__file__).resolve().parent
PORT = 69
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# (workload, client counts, runs of each storm). One client in lock-step is a ping-pong
# whose speed depends on whether the scheduler puts client and server on one CPU or two
# (on this VM: 0.8 s or 2.4 s for the same server): the stream takes the median of 3.
STANDARD_SET: list[tuple[str, list[int], int]] = [
    ("pxe", [100, 500, 1000], 1),
    ("mfs", [20, 100], 1),
    ("probe", [64], 1),
    ("probe32", [32], 1),
    ("miss", [64], 1),
    ("stream", [1], 3),
]
# The standard set bounds each storm (without loss) at this, whatever the retry rules
# allow, so that one server that stalls cannot push the set past 10 minutes.
STANDARD_DEADLINE_S = 45.0
KEEP_SAMPLES = 5000


class ServerStartError(RuntimeError):
    pass


def _udp_bound(pid: int, port: int) -> bool:
    """Whether a UDP socket on `port` is bound in the namespace of process `pid`."""
    want = f":{port:04X}"
    try:
        with open(f"/proc/{pid}/net/udp") as fh:
            next(fh)
            for line in fh:
                local = line.split()[1]
                if local.endswith(want):
                    return True
    except (OSError, StopIteration):
        return False
    return False


def start_server(server: Server, ns: str, root: Path, work: Path, group: ProcessGroup,
                 workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    launch = server.launch(root, PORT, work, workers)
    for path, text in launch.files.items():
        Path(path).write_text(text)
    env = dict(os.environ)
    env.update(launch.env)

    def pre() -> None:
        group.adopt_self()
        netns.enter(ns)
        os.setsid()
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(launch.argv, env=env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, preexec_fn=pre)
    finally:
        log.close()
    group.root_pid = proc.pid
    end = time.monotonic() + 20
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise ServerStartError(f"{server.name} exited with {proc.returncode}: "
                                   f"{_tail(log_path)}")
        if _udp_bound(proc.pid, PORT):
            # tftpd's workers fork after the bind: give them a moment to start polling
            time.sleep(0.3)
            return proc
        time.sleep(0.05)
    stop_server(proc, ns)
    raise ServerStartError(f"{server.name} did not bind port {PORT} within 20 s: "
                           f"{_tail(log_path)}")


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


def stop_server(proc: subprocess.Popen[bytes], ns: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    netns.kill_all_in(ns, grace_s=1.0)


def generate_in_ns(ns: str, wl: Workload, clients: int, engine: str, deadline_s: float,
                   files: dict[str, bytes],
                   started: Callable[[], object] | None = None,
                   faults: Faults | None = None) -> StormResult:
    """Run the storm from a forked child inside namespace `ns`; return its result.

    `started` is called in the parent once the child exists (threads are started there,
    never before the fork)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            netns.enter(ns)
            res = run_storm(("127.0.0.1", PORT), wl, clients, engine=engine, files=files,
                            deadline_s=deadline_s, faults=faults)
            payload = json.dumps({"ok": res.to_json()}).encode()
        except BaseException:  # noqa: BLE001 - reported to the parent
            payload = json.dumps({"error": traceback.format_exc()}).encode()
            code = 1
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(code)
    os.close(w)
    if started is not None:
        started()
    chunks = []
    killed = False
    end = time.monotonic() + deadline_s + 60
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if killed:
        raise RuntimeError("load generator overran its deadline and was killed")
    doc = json.loads(b"".join(chunks) or b'{"error": "generator died"}')
    if "error" in doc:
        raise RuntimeError(f"load generator failed:\n{doc['error']}")
    return StormResult(**doc["ok"])


def _thin(values: list[float], keep: int = KEEP_SAMPLES) -> list[float]:
    s = sorted(values)
    if len(s) <= keep:
        return s
    step = len(s) / keep
    return [s[int(i * step)] for i in range(keep)] + [s[-1]]


def run_one(server: Server, wl: Workload, clients: int, loss: int, roots: dict[str, Path],
            work: Path, engine: str, deadline_s: float | None, workers: int,
            files: dict[str, bytes], cap_s: float | None = None,
            faults: Faults | None = None) -> dict:
    """One storm against one server; returns the record that goes into results.json."""
    rec: dict = {"server": server.name, "workload": wl.name, "clients": clients,
                 "loss_pct": loss, "status": "ok", "note": ""}
    if faults:
        rec["faults"] = faults.to_json()
    tag = f"{server.name}-{wl.name}-{clients}-{loss}"[:40]
    ns = netns.create(f"s{os.getpid() % 1000}")
    group = ProcessGroup(f"tftpbench-{os.getpid()}-{tag}")
    log_path = work / f"{tag}.log"
    proc = None
    try:
        proc = start_server(server, ns, roots[wl.name], work, group, workers, log_path)
        if loss:
            netns.set_loss(ns, loss)
        if deadline_s is not None:
            limit = deadline_s
        else:
            # the generator's faults drop each way as the nftables rule does
            limit = wl.default_deadline_s(clients, loss_pct=loss + (faults.loss if faults
                                                                     else 0.0))
            if cap_s is not None and not loss and not faults and wl.deadline_s is None:
                limit = min(limit, cap_s)
        cpu0 = group.cpu_seconds()
        sys0 = group.system_seconds()
        host0 = host_cpu()
        sampler = MemorySampler(group)
        try:
            res = generate_in_ns(ns, wl, clients, engine, limit, files, sampler.start,
                                 faults=faults)
        finally:
            peak = sampler.stop()
        cpu1 = group.cpu_seconds()
        sys1 = group.system_seconds()
        host1 = host_cpu()
        if proc.poll() is not None:
            rec["note"] = f"server exited during the storm ({proc.returncode})"
        rec.update(res.summary())
        rec["server_cpu_s"] = cpu1 - cpu0
        # The kernel's share: what every server pays per datagram, whatever its code.
        if sys0 is not None and sys1 is not None:
            rec["server_sys_s"] = sys1 - sys0
        # Everything else the machine ran meanwhile (this runner's sampling, other
        # programs): large values mean the wall times of this storm are not to be trusted.
        busy = host1["busy"] - host0["busy"]
        rec["host_busy_s"] = busy
        rec["host_steal_s"] = host1["steal"] - host0["steal"]
        rec["other_cpu_s"] = max(0.0, busy - rec["server_cpu_s"] - res.gen_cpu_s)
        rec["server_peak_pss_mb"] = peak / 1e6
        rec["server_procs_peak"] = sampler.peak_procs
        rec["cpu_method"] = group.kind
        rec["deadline_s"] = limit
        rec["completion_s"] = _thin(res.completion_s)
        rec["first_answer_s"] = _thin(res.first_answer_s)
        if loss:
            rec["loss_dropped_packets"] = netns.loss_dropped(ns)
    except ServerStartError as exc:
        rec["status"] = "not-started"
        rec["note"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken server must not stop the run
        rec["status"] = "error"
        rec["note"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None:
            stop_server(proc, ns)
        netns.delete(ns)
        group.remove()
    return rec


def pick(tries: list[dict]) -> dict:
    """Of repeated runs of one storm, the median by wall time (the lower one of an even
    count). The others are kept, without their samples, under `repeats`."""
    ok = sorted((r for r in tries if r["status"] == "ok"), key=lambda r: r["wall_s"])
    best = ok[(len(ok) - 1) // 2] if ok else tries[0]
    if len(tries) > 1:
        best["repeats"] = [{k: v for k, v in r.items()
                            if k not in ("completion_s", "first_answer_s")}
                           for r in tries if r is not best]
    return best


def machine_info() -> dict:
    info = {
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_kb"] = int(fh.readline().split()[1])
        with open("/etc/debian_version") as fh:
            info["debian"] = fh.read().strip()
    except OSError:
        pass
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standard", action="store_true",
                    help="all servers; pxe 100/500/1000, mfs 20/100, probe, probe32, miss, "
                         "stream (x3)")
    ap.add_argument("--servers", default=",".join(STANDARD),
                    help=f"comma list of {', '.join(SERVERS)}")
    ap.add_argument("--workloads", default="pxe", help="comma list of names or JSON paths")
    ap.add_argument("--clients", default="", help="comma list; default: each workload's own")
    ap.add_argument("--loss", default="0", help="comma list of loss percentages (0, 1, 5)")
    ap.add_argument("--faults", default="", metavar="loss=P,dup=P,reorder=P",
                    help="the C generator drops, duplicates and reorders its own datagrams "
                         "(both ways; also hold=MIN-MAX ms, seed=N): see bench/README.md")
    ap.add_argument("--engine", choices=("auto", "c", "python"), default="auto")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="worker processes for tftpd and limit (default: tftpd's own, "
                         "the CPUs less one)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds per storm (default: from the workload's retry rules)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each storm N times; the table keeps the median by wall time")
    ap.add_argument("--out", default=None, help="results directory")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--list", action="store_true", help="list servers and exit")
    return ap.parse_args(argv)


class _Refused(Exception):
    """A run that cannot start; the message is for the person who asked."""


@dataclass(slots=True)
class _Plan:
    """What to run, as the command line asked for it."""

    server_names: list[str]
    runs: list[tuple[str, list[int], int]]  # (workload, client counts, repeats)
    cap: float | None  # each run's deadline in the standard set
    losses: list[int]
    faults: Faults | None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SERVERS.values():
            why = s.missing()
            print(f"{s.name:13} {'ok' if why is None else 'SKIP: ' + why}  ({s.description})")
        return 0
    why = netns.available()
    if why:
        print(f"bench.run: {why}", file=sys.stderr)
        return 2
    for name in netns.cleanup_stale() + cleanup_stale_groups():
        print(f"bench.run: removed stale {name}", file=sys.stderr)
    try:
        plan = _plan(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(args.out) if args.out else HERE / "results" / stamp
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="tftpbench-"))
        os.chmod(work, 0o755)
        args.engine = _choose_engine(args.engine, plan.faults)
    except _Refused as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    servers, skipped = _servers(plan.server_names)
    workloads, roots, http_counts = _workloads(plan.runs, work)
    meta = {
        "started": stamp,
        "command": " ".join(["python3", "-m", "bench.run", *(argv if argv is not None
                                                              else sys.argv[1:])]),
        "machine": machine_info(),
        "versions": {s.name: s.version() for s in servers},
        "skipped": skipped,
        "engine": args.engine,
        "workers": args.workers,
        "repeat": args.repeat,
        "faults": plan.faults.to_json() if plan.faults else None,
    }
    records: list[dict] = []
    t_start = time.monotonic()
    try:
        for wl, counts, reps in workloads:
            _run_workload(args, plan, servers, wl, counts, reps, roots, work, out, meta,
                          records)
        if http_counts:
            _run_http(servers, http_counts[0], args.workers, work, out, meta, records)
    finally:
        meta["total_s"] = time.monotonic() - t_start
        meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        _save(out, meta, records)
        if os.environ.get("TFTPBENCH_KEEP"):  # the servers' logs, for a post-mortem
            print(f"kept: {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    _report(out, meta, records, plots=not args.no_plots)
    return 0


def _plan(args: argparse.Namespace) -> _Plan:
    """The servers, workloads, losses and faults the command line names."""
    if args.standard:
        server_names = list(STANDARD)
        runs = [(w, c, max(r, args.repeat)) for w, c, r in STANDARD_SET]
        cap: float | None = STANDARD_DEADLINE_S
    else:
        server_names = [s for s in args.servers.split(",") if s]
        wanted = [int(c) for c in args.clients.split(",") if c]
        runs = [(w, wanted, args.repeat) for w in args.workloads.split(",") if w]
        cap = None
    losses = [int(x) for x in args.loss.split(",") if x]
    try:
        faults = Faults.parse(args.faults) if args.faults else None
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    if faults and args.engine == "python":
        raise _Refused("--faults needs the C engine")
    unknown = [s for s in server_names if s not in SERVERS]
    if unknown:
        raise _Refused(f"unknown servers {unknown}; known: {list(SERVERS)}")
    return _Plan(server_names, runs, cap, losses, faults)


def _choose_engine(engine: str, faults: Faults | None) -> str:
    """Chosen (and the C engine built) once here, not in every forked generator."""
    try:
        return choose(engine, faults,
                      warn=lambda msg: print(f"bench.run: {msg}", file=sys.stderr))
    except Exception as exc:  # noqa: BLE001 - a C engine that "c" or faults require
        raise _Refused(f"C engine: {exc}") from None


def _servers(names: list[str]) -> tuple[list[Server], dict[str, str]]:
    """The named servers installed here, and why each other one is skipped."""
    servers: list[Server] = []
    skipped: dict[str, str] = {}
    for name in names:
        why = SERVERS[name].missing()
        if why:
            skipped[name] = why
            print(f"bench.run: skipping {name}: {why}", file=sys.stderr)
        else:
            servers.append(SERVERS[name])
    return servers, skipped


def _workloads(runs: list[tuple[str, list[int], int]], work: Path) -> tuple[
        list[tuple[Workload, list[int], int]], dict[str, Path], list[list[int]]]:
    """Each TFTP workload with its root built, and the http workload's client counts."""
    workloads: list[tuple[Workload, list[int], int]] = []
    roots: dict[str, Path] = {}
    http_counts = [c for w, c, _ in runs if w == "http"]  # bench/http.py
    for wname, counts, reps in (r for r in runs if r[0] != "http"):
        wl = load(wname)
        roots[wl.name] = build_root(wl, work / "roots" / wl.name)
        workloads.append((wl, counts or list(wl.clients), reps))
    return workloads, roots, http_counts


def _run_workload(args: argparse.Namespace, plan: _Plan, servers: list[Server],
                  wl: Workload, counts: list[int], reps: int, roots: dict[str, Path],
                  work: Path, out: Path, meta: dict, records: list[dict]) -> None:
    """One workload at each client count and loss, against each TFTP server; the best
    of its repeats is recorded and the results saved after each."""
    files = expected(wl)
    for clients in counts:
        for loss in plan.losses:
            for server in (s for s in servers if s.tftp):
                tries = []
                for _ in range(max(1, reps)):
                    t = time.monotonic()
                    rec = run_one(server, wl, clients, loss, roots, work, args.engine,
                                  args.deadline, args.workers, files, plan.cap, plan.faults)
                    rec["run_s"] = time.monotonic() - t
                    tries.append(rec)
                    print(report.progress_line(rec), flush=True)
                records.append(pick(tries))
                _save(out, meta, records)


def _report(out: Path, meta: dict, records: list[dict], plots: bool) -> None:
    """The table (and plots) of a finished run, written to OUT and printed."""
    from bench import http

    tftp_records = [r for r in records if r["workload"] != "http"]
    table = "\n\n".join(t for t in (report.text_table(tftp_records) if tftp_records
                                      else "", http.table(records)) if t)
    (out / "table.txt").write_text(report.header(meta) + "\n" + table + "\n")
    print()
    print(report.header(meta))
    print(table)
    if plots:
        for path in report.plots(tftp_records, out):
            print(f"plot: {path}")
    print(f"results: {out}/results.json ({meta['total_s']:.0f} s)")


def _run_http(servers: list[Server], counts: list[int], workers: int, work: Path, out: Path,
              meta: dict, records: list[dict]) -> None:
    """The http workload (bench/http.py) against each server that serves HTTP."""
    from bench import http

    root = http.build_root(work / "roots" / "http")
    for connections in counts or [http.DEFAULT_CONNECTIONS]:
        for server in servers:
            if server.http_launch is None:
                continue
            rec = http.run_one(server, connections, root, work, workers)
            print(http.progress_line(rec), flush=True)
            records.append(rec)
            _save(out, meta, records)


def _save(out: Path, meta: dict, records: list[dict]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "runs": records}, indent=1))
    os.replace(tmp, out / "results.json")


if __name__ == "__main__":
    raise SystemExit(main())
