"""The `http` workload: keep-alive GETs of one 1 MiB file over N connections.

    python3 -m bench.run --servers tftpd,nginx --workloads http --clients 64

Each server that serves HTTP (Server.http_launch: tftpd --http, nginx with sendfile on)
runs alone in a network namespace of its own, serving a root that holds one 1 MiB
file on 127.0.0.1:HTTP_PORT; bench/httpload.c, inside the same namespace, keeps
`clients` connections busy asking for it for SECONDS and counts the responses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench import netns
from bench.build import program
from bench.measure import ProcessGroup
from bench.servers import Server

HERE = Path(__file__).resolve().parent
HTTP_PORT = 8080
FILE = "boot/1MiB.bin"
SIZE = 1 << 20
SECONDS = 10.0
DEFAULT_CONNECTIONS = 64


def httpload_binary() -> Path:
    """Path of the load generator, compiled from bench/httpload.c if needed."""
    return program("httpload")


def build_root(root: Path) -> Path:
    (root / os.path.dirname(FILE)).mkdir(parents=True, exist_ok=True)
    (root / FILE).write_bytes(os.urandom(SIZE))
    os.chmod(root, 0o755)
    os.chmod(root / os.path.dirname(FILE), 0o755)
    return root


def _tcp_listening(pid: int, port: int) -> bool:
    """Whether a TCP socket listens on `port` in the namespace of process `pid`."""
    want = f":{port:04X}"
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except (OSError, StopIteration):
            continue
    return False


def run_one(server: Server, connections: int, root: Path, work: Path, workers: int,
            seconds: float = SECONDS) -> dict:
    """One run against one server; the record that goes into results.json."""
    rec: dict = {"server": server.name, "workload": "http", "clients": connections,
                 "loss_pct": 0, "status": "ok", "note": "", "file_bytes": SIZE}
    assert server.http_launch is not None
    tag = f"{server.name}-http-{connections}"[:40]
    ns = netns.create(f"h{os.getpid() % 1000}")
    group = ProcessGroup(f"tftpbench-{os.getpid()}-{tag}")
    log_path = work / f"{tag}.log"
    proc = None
    try:
        launch = server.http_launch(root, HTTP_PORT, work, workers)
        for path, text in launch.files.items():
            Path(path).write_text(text)

        def pre() -> None:
            group.adopt_self()
            netns.enter(ns)
            os.setsid()

        with open(log_path, "wb") as log:
            proc = subprocess.Popen(launch.argv, env={**os.environ, **launch.env},
                                    cwd=launch.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, preexec_fn=pre)
        group.root_pid = proc.pid
        end = time.monotonic() + 20
        while not _tcp_listening(proc.pid, HTTP_PORT):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{server.name} did not listen on {HTTP_PORT}: "
                                   f"{log_path.read_bytes()[-400:].decode(errors='replace')}")
            time.sleep(0.05)
        time.sleep(0.3)  # workers fork after the listen
        cpu0 = group.cpu_seconds()
        out = subprocess.run([str(httpload_binary()), "127.0.0.1", str(HTTP_PORT),
                              f"/{FILE}", str(connections), str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 60,
                             preexec_fn=lambda: netns.enter(ns), check=False)
        if out.returncode != 0:
            raise RuntimeError(f"httpload failed: {out.stderr.strip()}")
        res = json.loads(out.stdout)
        rec.update(res)
        rec["server_cpu_s"] = group.cpu_seconds() - cpu0
        rec["req_per_s"] = res["requests"] / res["wall_s"]
        rec["mb_per_s"] = res["bytes"] / res["wall_s"] / 1e6
        if proc.poll() is not None:
            rec["note"] = f"server exited during the run ({proc.returncode})"
    except Exception as exc:  # noqa: BLE001 - one broken server must not stop the run
        rec["status"] = "error"
        rec["note"] = f"{type(exc).__name__}: {exc}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT if server.name == "nginx" else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        netns.kill_all_in(ns, grace_s=1.0)
        netns.delete(ns)
        group.remove()
    return rec


def progress_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['server']:>12} http c={rec['clients']}: {rec['status']} {rec['note']}"
    return (f"{rec['server']:>12} http c={rec['clients']}: {rec['req_per_s']:.0f} req/s "
            f"{rec['mb_per_s']:.0f} MB/s errors={rec['errors']} p50={rec['p50_s'] * 1e3:.2f}ms "
            f"p99={rec['p99_s'] * 1e3:.2f}ms server_cpu={rec['server_cpu_s']:.1f}s")


def table(records: list[dict]) -> str:
    rows = [r for r in records if r.get("workload") == "http"]
    if not rows:
        return ""
    lines = [f"{'server':>12} {'conns':>5} {'req/s':>8} {'MB/s':>7} {'errors':>6} "
             f"{'p50 ms':>7} {'p99 ms':>7} {'cpu s':>6}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['server']:>12} {r['clients']:>5} {r['status']}: {r['note']}")
            continue
        lines.append(f"{r['server']:>12} {r['clients']:>5} {r['req_per_s']:>8.0f} "
                     f"{r['mb_per_s']:>7.0f} {r['errors']:>6} {r['p50_s'] * 1e3:>7.2f} "
                     f"{r['p99_s'] * 1e3:>7.2f} {r['server_cpu_s']:>6.1f}")
    return "\n".join(lines)
