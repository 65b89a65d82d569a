"""The TFTP servers the benchmark knows, and how each one is started fairly.

Each server runs in the foreground inside a network namespace of its own, serves ROOT as
TFTP only on 127.0.0.1:69, and has the limits a storm would hit first lifted (each
launcher below says which). A server whose program is missing is skipped with a note. Servers
with an `http_launch` also run the `http` workload (bench/http.py); nginx runs only that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import BuildError, limit_binary

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_DIR = HERE / ".peers"
ATFTPD = PEERS_DIR / "atftpd" / "usr" / "sbin" / "atftpd"
MAX_TRANSFERS = 4096


@dataclass
class Launch:
    """How to start one server: argv, environment additions, files to write first."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Server:
    name: str
    description: str
    # (root, port, workdir, workers) -> Launch
    launch: Callable[[Path, int, Path, int], Launch]
    # None when it can run here, else why not
    missing: Callable[[], str | None]
    version: Callable[[], str]
    # (root, port, workdir, workers) -> Launch serving ROOT over HTTP on 127.0.0.1:port
    http_launch: Callable[[Path, int, Path, int], Launch] | None = None
    tftp: bool = True  # serves the TFTP workloads
    standard: bool = True  # one of --standard's servers (not a variant of another)


def _run_text(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (
        proc.stdout + proc.stderr).strip() else "?"


def _dpkg_version(pkg: str) -> str:
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return proc.stdout.strip() or "?"


# -- tftpd (this project) --------------------------------------------------------------

def _tftpd_missing() -> str | None:
    if importlib.util.find_spec("tftpd") is None:
        sys.path.insert(0, str(REPO))
    try:
        if importlib.util.find_spec("tftpd.cli") is None:
            return "tftpd.cli is not written yet"
    except ImportError as exc:
        return f"tftpd does not import: {exc}"
    return None


def _tftpd_launch(python_path: bool, *extra: str) -> Callable[[Path, int, Path, int], Launch]:
    def launch(root: Path, port: int, work: Path, workers: int) -> Launch:
        env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if python_path:
            env["TFTPD_DATAPATH"] = "python"
        return Launch(argv=[sys.executable, "-m", "tftpd", "-L", "-a", f"127.0.0.1:{port}",
                            "--workers", str(workers), *extra, str(root)], env=env,
                      cwd=str(REPO))
    return launch


# What a content hook costs a storm: one that answers None serves every name from the
# root, as without a hook, but each request goes through the hook's threads.
NONE_HOOK = "def content(request):\n    return None\n"


def _tftpd_hook_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    conf = work / "tftpd.conf"
    return Launch(argv=[sys.executable, "-m", "tftpd", "-L", "-a", f"127.0.0.1:{port}",
                        "--workers", str(workers), "-C", str(conf), "--content-hook",
                        "nonehook:content", str(root)], env=env, cwd=str(REPO),
                  files={str(conf): "", str(work / "nonehook.py"): NONE_HOOK})


def _tftpd_http_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    env = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Launch(argv=[sys.executable, "-m", "tftpd", "-L", "-a", "127.0.0.1:69",
                        "--http", f"127.0.0.1:{port}", "--http-max-connections", "4096",
                        "--workers", str(workers), str(root)], env=env, cwd=str(REPO))


def _tftpd_version() -> str:
    try:
        import tftpd
        return f"tftpd {tftpd.__version__} (work tree)"
    except Exception:  # noqa: BLE001
        return "tftpd ?"


# -- tftp-hpa ---------------------------------------------------------------------------

def _hpa_missing() -> str | None:
    if not Path("/usr/sbin/in.tftpd").exists():
        return "in.tftpd not installed (apt-get install tftpd-hpa; bench/setup-peers.sh)"
    return None


def _hpa_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    return Launch(argv=["/usr/sbin/in.tftpd", "-L", "-4", "-a", f"127.0.0.1:{port}",
                        "-s", str(root)])


def _inetd_missing() -> str | None:
    if _hpa_missing():
        return _hpa_missing()
    if not Path("/usr/sbin/inetd").exists():
        return "inetd not installed (apt-get install openbsd-inetd; bench/setup-peers.sh)"
    return None


def _inetd_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    conf = work / "inetd.conf"
    line = (f"127.0.0.1:{port} dgram udp4 wait root /usr/sbin/in.tftpd in.tftpd -t 0 "
            f"-s {root}\n")
    return Launch(argv=["/usr/sbin/inetd", "-i", "-R", "1000000", str(conf)],
                  files={str(conf): line})


# -- dnsmasq ----------------------------------------------------------------------------

def _dnsmasq_missing() -> str | None:
    if not shutil.which("dnsmasq"):
        return "dnsmasq not installed (apt-get install dnsmasq-base; bench/setup-peers.sh)"
    return None


def _dnsmasq_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    argv = [shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground",
            "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
            "--enable-tftp", f"--tftp-root={root}", f"--tftp-max={MAX_TRANSFERS}",
            "--listen-address=127.0.0.1", "--bind-interfaces", "--user=nobody",
            "--pid-file", "--log-facility=/dev/null"]
    if port != 69:
        raise ValueError("dnsmasq serves TFTP on port 69 only")
    return Launch(argv=argv)


# -- atftpd -----------------------------------------------------------------------------

def _atftpd_path() -> Path | None:
    if ATFTPD.exists():
        return ATFTPD
    found = shutil.which("atftpd")
    return Path(found) if found else None


def _atftpd_missing() -> str | None:
    if _atftpd_path() is None:
        return "atftpd not unpacked (bench/setup-peers.sh puts it in bench/.peers/)"
    return None


def _atftpd_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    return Launch(argv=[str(_atftpd_path()), "--daemon", "--no-fork", "--port", str(port),
                        "--bind-address", "127.0.0.1", "--maxthread", str(MAX_TRANSFERS),
                        "--logfile", "/dev/null", "--verbose=0", str(root)])


def _atftpd_version() -> str:
    v = PEERS_DIR / "atftpd" / "VERSION"
    if v.exists():
        return f"atftpd {v.read_text().strip()} (unpacked .deb)"
    return f"atftpd {_dpkg_version('atftpd')}"


# -- limit ------------------------------------------------------------------------------

def _limit_missing() -> str | None:
    try:
        limit_binary()
    except BuildError as exc:
        return str(exc)
    return None


def _limit_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    return Launch(argv=[str(limit_binary()), "-a", f"127.0.0.1:{port}", "--workers",
                        str(workers), str(root)])


# -- nginx (HTTP only: the http workload) ---------------------------------------------------

def _nginx_missing() -> str | None:
    if not shutil.which("nginx"):
        return "nginx not installed (apt-get install nginx-light or nginx)"
    return None


def _nginx_tftp(root: Path, port: int, work: Path, workers: int) -> Launch:
    raise ValueError("nginx serves HTTP only (the http workload)")


def _nginx_launch(root: Path, port: int, work: Path, workers: int) -> Launch:
    """nginx as shipped but for sendfile on, as many workers as tftpd, a log line per
    request as tftpd writes, and no bound on requests per connection (tftpd has none)."""
    conf = work / "nginx.conf"
    temp = work / "nginx-temp"
    text = f"""daemon off;
worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 8192; }}
http {{
    sendfile on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    access_log {work}/nginx-access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""
    temp.mkdir(exist_ok=True)
    return Launch(argv=[shutil.which("nginx") or "nginx", "-e", f"{work}/nginx-error.log",
                        "-c", str(conf), "-p", str(work)], files={str(conf): text})


SERVERS: dict[str, Server] = {
    s.name: s
    for s in [
        Server("tftpd", "tftpd, C data path (preforked workers)", _tftpd_launch(False),
               _tftpd_missing, _tftpd_version, http_launch=_tftpd_http_launch),
        Server("tftpd-python", "tftpd, TFTPD_DATAPATH=python", _tftpd_launch(True),
               _tftpd_missing, _tftpd_version),
        # Variants of tftpd, beside it in one run: what HTTP being on, or a content
        # hook that answers None, costs the TFTP figures.
        Server("tftpd-http", "tftpd with --http 127.0.0.1:8080 open (idle)",
               _tftpd_launch(False, "--http", "127.0.0.1:8080"), _tftpd_missing,
               _tftpd_version, standard=False),
        Server("tftpd-hook", "tftpd with a content hook that answers None",
               _tftpd_hook_launch, _tftpd_missing, _tftpd_version, standard=False),
        Server("hpa", "tftp-hpa in.tftpd standalone (-L)", _hpa_launch, _hpa_missing,
               lambda: f"tftpd-hpa {_dpkg_version('tftpd-hpa')}"),
        Server("hpa-inetd", "tftp-hpa per request under openbsd-inetd (-t 0)",
               _inetd_launch, _inetd_missing,
               lambda: f"tftpd-hpa {_dpkg_version('tftpd-hpa')}, openbsd-inetd "
                       f"{_dpkg_version('openbsd-inetd')}"),
        Server("dnsmasq", f"dnsmasq TFTP only, --tftp-max={MAX_TRANSFERS}", _dnsmasq_launch,
               _dnsmasq_missing, lambda: _run_text(["dnsmasq", "--version"])),
        Server("atftpd", f"atftpd --maxthread {MAX_TRANSFERS}", _atftpd_launch,
               _atftpd_missing, _atftpd_version),
        Server("limit", "reference C sender, files in memory (bench/limit.c)", _limit_launch,
               _limit_missing, lambda: "bench/limit.c"),
        Server("nginx", "nginx, sendfile on (the http workload only)", _nginx_tftp,
               _nginx_missing, lambda: _run_text(["nginx", "-v"]),
               http_launch=_nginx_launch, tftp=False),
    ]
}

STANDARD = [name for name, s in SERVERS.items() if s.tftp and s.standard]
