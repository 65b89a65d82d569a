"""`tftpd [options] [ROOT]`: argv -> Config -> a running master."""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import pwd
import shutil
import socket
import sys
import tempfile
import time

from tftpd.config import GUESSABLE_PORTS, Address, Config, ConfigError, from_argv
from tftpd.logs import BatchingHandler

log = logging.getLogger("tftpd")

EXIT_USAGE = 2
EXIT_STARTUP = 1
DEMO_PORT = 6969
DEMO_HTTP_PORT = 6970
# boot.ipxe in the demo root: an iPXE script loaded by TFTP that fetches the image by
# HTTP from the same root (HOST:PORT filled in).
DEMO_IPXE = """#!ipxe
# Loaded by TFTP from tftpd; the image comes by HTTP from the same root.
imgfetch http://{http}/boot.img || goto failed
imgstat
echo boot.img came by HTTP
exit
:failed
echo boot.img did not come: ${{errno}}
"""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: a finished transfer's record, or any other message."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
            f".{int(record.msecs):03d}Z"
        body = getattr(record, "transfer", None)
        if body is None:
            body = {"level": record.levelname.lower(), "msg": record.getMessage()}
            if record.exc_info:
                body["traceback"] = self.formatException(record.exc_info)
        return json.dumps({"ts": ts, "pid": record.process, **body}, separators=(",", ":"))


def _setup_logging(cfg: Config, syslog: bool) -> None:
    # A record per transfer at tens of thousands a second: skip what we never print
    # (the caller's file and line, thread and process names cost a stack walk each).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    level = logging.DEBUG if cfg.verbose >= 3 else logging.INFO
    handler: logging.Handler
    if cfg.log_file:
        # Appending (O_APPEND): workers' whole-line writes do not overwrite each other.
        handler = BatchingHandler(open(cfg.log_file, "a", encoding="utf-8"))  # noqa: SIM115
    elif syslog and os.path.exists("/dev/log"):
        # As in.tftpd logs: the daemon facility.
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    else:
        handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg.log_format == "json"
                         else logging.Formatter("tftpd[%(process)d]: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _demo(cfg: Config) -> tuple[Config, str]:
    from tftpd.listening import http_missing

    root = tempfile.mkdtemp(prefix="tftpd-demo-")
    with open(os.path.join(root, "hello.txt"), "w") as f:
        f.write("Hello from tftpd: served over TFTP from a preforked pool.\n")
    with open(os.path.join(root, "boot.img"), "wb") as f:
        f.write(os.urandom(1 << 20))
    addresses = cfg.addresses or (Address(socket.AF_INET, "127.0.0.1", DEMO_PORT),)
    http = cfg.http or (Address(socket.AF_INET, addresses[0].host, DEMO_HTTP_PORT),)
    if http_missing() is not None:
        http = ()  # TFTP alone; main() says what HTTP needs
    else:
        with open(os.path.join(root, "boot.ipxe"), "w") as f:
            f.write(DEMO_IPXE.format(http=http[0]))
    # The demo root is private to whoever started it: the server stays that user.
    user = cfg.user or pwd.getpwuid(os.geteuid()).pw_name
    return dataclasses.replace(cfg, root=root, addresses=addresses, http=http,
                               foreground=True, workers=min(cfg.workers, 2), user=user), root


def _warn_of_guessable_ports(cfg: Config) -> None:
    if cfg.port_range is None:
        return
    lo, hi = cfg.port_range
    if hi - lo + 1 < GUESSABLE_PORTS:
        logging.getLogger("tftpd").warning(
            "--port-range %d:%d holds %d ports: a spoofer can guess a transfer's port and "
            "acknowledge for its client; give it at least %d", lo, hi, hi - lo + 1,
            GUESSABLE_PORTS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = from_argv(args)
    except ConfigError as err:
        print(f"tftpd: {err}", file=sys.stderr)
        return EXIT_USAGE
    demo_root = None
    if cfg.demo:
        cfg, demo_root = _demo(cfg)
    try:
        return _serve(cfg, args, demo_root)
    finally:
        # Workers never return here (they leave through os._exit), only the master.
        if demo_root:
            shutil.rmtree(demo_root, ignore_errors=True)


def _serve(cfg: Config, args: list[str], demo_root: str | None) -> int:
    from tftpd import systemd
    from tftpd.master import Master, StartupError, daemonize, workers_text

    # Where the listen sockets come from: systemd (LISTEN_FDS), inetd (a socket on
    # standard input, `wait` mode), or our own binds.
    mode, inherited = "standalone", systemd.listen_fds()
    if inherited:
        mode = "systemd"
    elif not cfg.listen and not cfg.foreground and _stdin_is_socket():
        sock = systemd.inetd_socket()
        if sock is not None:
            mode, inherited = "inetd", [sock]
    # in.tftpd under inetd logs to syslog; so do we, and when detached.
    _setup_logging(cfg, syslog=(mode == "inetd") or (cfg.listen and not cfg.foreground))
    _warn_of_guessable_ports(cfg)
    try:
        from tftpd.datapath import get_datapath

        datapath = get_datapath(cfg.datapath)
    except ImportError as err:
        print(f"tftpd: {err}", file=sys.stderr)
        return EXIT_STARTUP
    master = Master(cfg, datapath, argv=args, mode=mode)
    try:
        if not os.path.isdir(cfg.root):
            raise StartupError(f"root {cfg.root!r} does not exist or is not a directory")
        master.bind(inherited)
        master.prepare()
    except (StartupError, PermissionError) as err:
        print(f"tftpd: {err}", file=sys.stderr)
        return EXIT_STARTUP
    master.install_signals()
    # The listen sockets are bound: requests queue from here on, so this line is the
    # moment a test or a supervisor may start sending (or signalling).
    print(f"tftpd: listening on {', '.join(master.bound)} ({workers_text(cfg.workers)}, "
          f"root {cfg.root}, {datapath.name} data path)"
          + (f"; http on {', '.join(master.http_bound)}" if master.http_bound else ""),
          file=sys.stderr, flush=True)
    if demo_root:
        print(_demo_text(demo_root, master.bound[0], master.http_bound), flush=True)
    if cfg.listen and not cfg.foreground and mode == "standalone":
        daemonize()
    return master.run()


def _demo_text(root: str, addr: str, http_bound: list[str]) -> str:
    if not http_bound:
        return (f"Demo root {root} holds hello.txt and boot.img (1 MiB). Fetch one with:\n\n"
                f"    curl -s tftp://{addr}/hello.txt\n\n"
                "HTTP on the same root needs h11 (pip install h11, or pip install .).\n"
                "Ctrl-C stops the server.")
    return (f"Demo root {root} holds hello.txt, boot.img (1 MiB) and boot.ipxe\n"
            "(an iPXE script that goes from TFTP to HTTP). Fetch one with:\n\n"
            f"    curl -s tftp://{addr}/hello.txt\n"
            f"    curl -s http://{http_bound[0]}/hello.txt\n\n"
            "Ctrl-C stops the server.")


def _stdin_is_socket() -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.fstat(0).st_mode)
    except OSError:
        return False
