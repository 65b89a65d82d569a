"""Every setting declared once; the command line is generated from this list.

Flags follow in.tftpd (tftp-hpa) so that someone replacing it can keep typing what
they type. """

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tftpd import __version__
from tftpd.options import BLKSIZE_MAX, BLKSIZE_MIN, WINDOW_MAX

if TYPE_CHECKING:
    from tftpd.outside import Opener

DEFAULT_PORT = 69
HTTP_PORT = 80


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Address:
    family: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 \
            else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """ADDR, ADDR:PORT, :PORT, [V6], [V6]:PORT or a bare IPv6 address."""
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"bad address {text!r}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    host = host or "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"bad address {text!r}: port must be 0..65535")
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(family, str(ip), int(port))


def _address_text(text: str) -> str:
    parse_address(text)  # validated now, bound by the master
    return text


def _http_address(text: str) -> Address:
    return parse_address(text, HTTP_PORT)


# Fewer transfer ports than this and a spoofer's guesses hit too often (a hit lets it
# acknowledge blocks for the client whose address it forges): warned about at the start.
GUESSABLE_PORTS = 4096


def _port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 1 <= int(lo) <= int(hi) <= 65535:
        raise ConfigError(f"bad port range {text!r}: want LOW:HIGH within 1..65535")
    return int(lo), int(hi)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        if not text.isdigit() or not lo <= int(text) <= hi:
            raise ConfigError(f"{text!r} is not a whole number in {lo}..{hi}")
        return int(text)
    return check


def _choice(*allowed: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in allowed:
            raise ConfigError(f"{text!r} is not one of {', '.join(allowed)}")
        return text
    return check


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ConfigError(f"{text!r}: want more than 0 and at most 3600 seconds")
    return value


def _hook_spec(text: str) -> str:
    from tftpd.hook import parse_spec  # the hook itself is loaded by each worker

    try:
        parse_spec(text)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return text.strip()


def _umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ConfigError(f"bad umask {text!r}: want octal") from None
    if not 0 <= value <= 0o777:
        raise ConfigError(f"bad umask {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # Config attribute
    flags: tuple[str, ...]
    help: str
    default: Any = None
    convert: Callable[[str], Any] | None = None  # None: a switch
    repeat: bool = False
    count: bool = False
    metavar: str | None = None

    @property
    def key(self) -> str:
        """Its name in tftpd.conf: the long flag without the dashes."""
        return self.flags[-1].lstrip("-")


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", ("-l", "--listen"),
            "standalone: detach from the terminal and serve (in.tftpd -l)", False),
    Setting("foreground", ("-L", "--foreground"),
            "standalone in the foreground, logging to stderr (in.tftpd -L)", False),
    Setting("addresses", ("-a", "--address"),
            "listen on ADDR[:PORT] (IPv4, [IPv6]); repeatable; default 0.0.0.0:69",
            (), parse_address, repeat=True, metavar="ADDR[:PORT]"),
    Setting("secure", ("-s", "--secure"),
            "chroot to ROOT when started as root; names are always relative to ROOT", False),
    Setting("user", ("-u", "--user"), "run as USER (and its groups) after binding; "
            "started as root, the default is nobody (as in.tftpd), unless nobody cannot read "
            "ROOT (then root, with a warning); -u root stays root",
            None, str, metavar="USER"),
    Setting("create", ("-c", "--create"), "allow uploads (WRQ); new files may be created",
            False),
    Setting("permissive", ("-p", "--permissive"), "an upload may replace any regular file "
            "the server can write, not only world-writable ones", False),
    Setting("umask", ("-U", "--umask"), "umask for uploaded files (octal)",
            0o022, _umask, metavar="UMASK"),
    Setting("max_upload", ("--max-upload",), "largest upload in bytes (tsize is checked "
            "against it up front)", 1 << 30, _int_in(0, 1 << 62), metavar="BYTES"),
    Setting("max_blksize", ("-B", "--blocksize"),
            f"largest blksize granted ({BLKSIZE_MIN}..{BLKSIZE_MAX})", BLKSIZE_MAX,
            _int_in(BLKSIZE_MIN, BLKSIZE_MAX), metavar="MAX"),
    Setting("retransmit_us", ("-T", "--retransmit"),
            "initial retransmission timeout in microseconds (adapts to the RTT after)",
            1_000_000, _int_in(10_000, 255_000_000), metavar="USEC"),
    Setting("port_range", ("-R", "--port-range"),
            "transfer ports drawn at random from LOW:HIGH (default: the kernel's ephemeral "
            "range, also at random); each port serves one transfer. A range of fewer than "
            f"{GUESSABLE_PORTS} is warned about: its ports are what keeps a spoofer from "
            "acknowledging for a client, and few are easily guessed", None,
            _port_range, metavar="LOW:HIGH"),
    Setting("refuse", ("-r", "--refuse"), "never negotiate OPTION (blksize, tsize, timeout, "
            "windowsize); repeatable", (), str, repeat=True, metavar="OPTION"),
    Setting("verbose", ("-v", "--verbose"), "more logging: -v requests, -vvv every packet",
            0, count=True),
    Setting("workers", ("--workers",), "worker processes (default: the CPUs this process "
            "may run on, less one, at least 1)",
            None, _int_in(1, 256), metavar="N"),
    Setting("max_windowsize", ("--windowsize",), "largest windowsize granted (RFC 7440)",
            64, _int_in(1, WINDOW_MAX), metavar="MAX"),
    Setting("max_window_bytes", ("--window-bytes",), "largest window in bytes (windowsize "
            "times blksize): one window is one burst the client's socket buffer must hold",
            128 * 1024, _int_in(512, 1 << 30), metavar="BYTES"),
    Setting("retries", ("--retries",), "timeouts in a row before a transfer is given up "
            "(at most 3 while the client has acknowledged nothing)", 8, _int_in(1, 50),
            metavar="N"),
    Setting("rollover", ("--rollover",), "block number after 65535: 0 or 1", 0,
            _int_in(0, 1), metavar="0|1"),
    Setting("drain_s", ("--drain-timeout",), "on SIGTERM, seconds running transfers get "
            "to finish", 30, _int_in(0, 3600), metavar="SECONDS"),
    Setting("max_transfers", ("--max-transfers",), "transfers at once, all workers together; "
            "more are refused with an error", 10000, _int_in(1, 1_000_000), metavar="N"),
    Setting("max_per_client", ("--max-per-client",), "transfers at once from one client "
            "address, per worker (0: no limit; loopback and NAT put many clients on one)",
            0, _int_in(0, 1_000_000), metavar="N"),
    Setting("gz", ("--gz",), "answer X.gz from X (compressed) and X from X.gz "
            "(decompressed) when only the other exists", False),
    Setting("gz_cache", ("--gz-cache",), "directory for files made by --gz (default "
            "/var/cache/tftpd as root, else a per-user directory under /tmp)", None, str,
            metavar="DIR"),
    Setting("gz_cache_mb", ("--gz-cache-max",), "bound on that directory, MiB", 1024,
            _int_in(1, 1 << 20), metavar="MIB"),
    Setting("map_file", ("-m", "--map-file"), "filename remapping rules (tftp-hpa syntax)",
            None, str, metavar="FILE"),
    Setting("idle_s", ("-t", "--timeout"), "when started by inetd: leave after SECONDS "
            "without requests or transfers (inetd then takes the port back)", 900,
            _int_in(0, 1 << 30), metavar="SECONDS"),
    Setting("metrics", ("--metrics",), "serve Prometheus metrics over HTTP on ADDR:PORT",
            None, _address_text, metavar="ADDR:PORT"),
    Setting("http", ("--http",), "also serve the root over HTTP/1.1 (GET, HEAD, byte ranges) "
            "on ADDR[:PORT] (default port 80), from the same workers and under the same "
            "rules (map file, confinement, --gz); repeatable", (), _http_address,
            repeat=True, metavar="ADDR[:PORT]"),
    Setting("http_max_connections", ("--http-max-connections",), "HTTP connections at once "
            "per worker; past it a connection is answered 503 and closed", 512,
            _int_in(1, 1_000_000), metavar="N"),
    Setting("http_threads", ("--http-threads",), "HTTP threads per worker, each with its "
            "own connections (a body is sent by sendfile outside Python's lock, so two "
            "threads keep two copies going)", 2, _int_in(1, 64), metavar="N"),
    Setting("http_head_timeout", ("--http-head-timeout",), "seconds an HTTP request's head "
            "may take to arrive (slow senders are closed)", 10, _int_in(1, 3600),
            metavar="SECONDS"),
    Setting("http_idle_timeout", ("--http-idle-timeout",), "seconds an idle HTTP keep-alive "
            "connection is kept", 30, _int_in(1, 3600), metavar="SECONDS"),
    Setting("http_send_timeout", ("--http-send-timeout",), "seconds an HTTP response may "
            "make no progress before its connection is closed", 60, _int_in(1, 3600),
            metavar="SECONDS"),
    Setting("log_format", ("--log-format",), "one line per finished transfer as text or "
            "json", "text", _choice("text", "json"), metavar="text|json"),
    Setting("log_file", ("--log-file",), "append the log to FILE instead of stderr (or "
            "syslog with -l)", None, str, metavar="FILE"),
    Setting("content_hook", ("--content-hook",), "call FUNCTION of the Python module "
            "MODULE with each read request (TFTP and HTTP): it returns None (serve the name "
            "asked), bytes (served as the file) or a path under ROOT (served instead); "
            "MODULE is looked for in the config file's directory, then the current "
            "directory, then sys.path, and loaded by each worker", None, _hook_spec,
            metavar="MODULE:FUNCTION"),
    Setting("content_hook_timeout", ("--content-hook-timeout",), "seconds a content hook "
            "call may take, waiting for a thread included; later, the request is refused "
            "(TFTP error 0, HTTP 504)", 2.0, _seconds, metavar="SECONDS"),
    Setting("root_per_client", ("--root-per-client",), "try ROOT/CLIENT/NAME before "
            "ROOT/NAME, CLIENT being the client's IP address (ip) or its MAC as PXELINUX "
            "writes it, 01-aa-bb-cc-dd-ee-ff (mac, from the kernel's neighbour table)",
            None, _choice("ip", "mac"), metavar="ip|mac"),
    Setting("datapath", ("--datapath",), "force the C or the pure-Python data path "
            "(default: C when built; also TFTPD_DATAPATH)", None, _choice("c", "python"),
            metavar="c|python"),
)

@dataclass(frozen=True, slots=True)
class EnvVar:
    """An environment variable tftpd, its build or its tests read: a switch for
    debugging and measurement, not configuration (no flag, no tftpd.conf key)."""

    name: str
    help: str  # "VALUE: what it does"


# Every TFTPD_* variable read anywhere in the product, declared here once; the
# ENVIRONMENT section of tftpd(8) is made from this list, and a test fails when the
# source reads a TFTPD_* name missing here. Each is read where it acts (the module
# named in its help).
ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("TFTPD_DATAPATH", "c or python: force a data path, as --datapath"),
    EnvVar("TFTPD_HANG_CHECK", "0: never kill a worker for a missing heartbeat, so that "
           "one can be stopped in a debugger (the master)"),
    EnvVar("TFTPD_PUMP", "0: with the C data path, a worker waits in Python's selector "
           "and Python answers every ACK, C only sends (the worker; for measuring C's "
           "pump against Python)"),
    EnvVar("TFTPD_GSO", "0: send windows with sendmmsg, never with UDP segmentation "
           "(the data path)"),
    EnvVar("TFTPD_PROFILE", "DIR: each worker writes a cProfile file, "
           "DIR/worker-PID.prof, when it exits (the master)"),
    EnvVar("TFTPD_REQUIRE_EXT", "1: building (setup.py) and the tests fail when the C "
           "data path does not build or load, instead of falling back to Python"),
    EnvVar("TFTPD_SANITIZE", "address,undefined (any -fsanitize= list): build the C "
           "data path with those sanitizers (_ext/build_datapath.py, tests/asan.sh)"),
    EnvVar("TFTPD_STORM_CACHE", "DIR: a private directory where tftpd-storm builds its C "
           "engine (default $XDG_CACHE_HOME/tftpd-storm or ~/.cache/tftpd-storm)"),
    EnvVar("TFTPD_INVENTORY", "FILE: the inventory the example content hook "
           "examples/pernode_hook.py reads (default inventory.toml beside it)"),
)



def default_workers() -> int:
    """One worker per CPU we may run on, less one, and at least one.

    The spare CPU is for what runs beside the workers and competes with them for
    every datagram: the kernel's receive path, the DHCP server a PXE setup runs
    next to us, a load generator. Measured on 2 CPUs with the generator beside
    (bench/RESULTS.md, 2026-11-26 at b3f5467): one worker served 63-72k probes/s against two
    workers' 46-49k, mfs at 100 clients in 5.5-5.8 s against 6.3-7.6 s, and a
    1000-client pxe storm in the same time (3.3-4.6 s against 3.4-3.8 s).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)

@dataclass(frozen=True, slots=True)
class Config:
    root: str = "/srv/tftp"
    listen: bool = False
    foreground: bool = False
    addresses: tuple[Address, ...] = ()
    secure: bool = False
    user: str | None = None
    create: bool = False
    permissive: bool = False
    umask: int = 0o022
    max_upload: int = 1 << 30
    max_blksize: int = BLKSIZE_MAX
    retransmit_us: int = 1_000_000
    port_range: tuple[int, int] | None = None
    refuse: tuple[str, ...] = ()
    verbose: int = 0
    workers: int = field(default_factory=lambda: default_workers())
    max_windowsize: int = 64
    max_window_bytes: int = 128 * 1024
    retries: int = 8
    rollover: int = 0
    drain_s: int = 30
    max_transfers: int = 10000
    max_per_client: int = 0
    gz: bool = False
    gz_cache: str | None = None
    gz_cache_mb: int = 1024
    map_file: str | None = None
    idle_s: int = 900
    metrics: str | None = None
    http: tuple[Address, ...] = ()
    http_max_connections: int = 512
    http_threads: int = 2
    http_head_timeout: int = 10
    http_idle_timeout: int = 30
    http_send_timeout: int = 60
    log_format: str = "text"
    log_file: str | None = None
    content_hook: str | None = None
    content_hook_timeout: float = 2.0
    root_per_client: str | None = None
    datapath: str | None = None
    config: str | None = None
    demo: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tftpd", description="A preforked TFTP server for network-boot storms.")
    for s in SETTINGS:
        kw: dict[str, Any] = {"dest": s.name, "help": s.help}
        if s.count:
            kw.update(action="count", default=0)
        elif s.convert is None:
            kw.update(action="store_true", default=None)
        else:
            kw.update(action="append" if s.repeat else "store", metavar=s.metavar)
        p.add_argument(*s.flags, **kw)
    p.add_argument("-C", "--config", metavar="FILE",
                   help="read settings from FILE (TOML, see tftpd.conf(5)); the command "
                        "line wins; re-read on SIGHUP")
    p.add_argument("-V", "--version", action=_VersionAction)
    p.add_argument("--demo", action="store_true",
                   help="serve a demo root on 127.0.0.1:6969 (TFTP) and 127.0.0.1:6970 (HTTP) "
                        "and print curl commands")
    p.add_argument("root", nargs="?", help="the directory served (default /srv/tftp)")
    return p


class _VersionAction(argparse.Action):
    """-V: the version text, made only when asked for (it loads the data path)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and the data path in use, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    # The data path is loaded here, when the text is wanted, not when config.py is.
    from tftpd.datapath import ext_error, get_datapath

    try:
        path = get_datapath().name
    except ImportError as err:
        return f"tftpd {__version__} (data path unavailable: {err})"
    why = ext_error()
    note = f"; C extension unavailable: {why}" if path == "python" and why else ""
    return f"tftpd {__version__} ({path} data path{note})"


def _convert(s: Setting, raw: Any, where: str) -> Any:
    """A value from the command line (strings) or tftpd.conf (TOML types)."""
    try:
        if s.count:
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise ConfigError(f"{raw!r} is not a count")
            return raw
        if s.convert is None:
            if not isinstance(raw, bool):
                raise ConfigError(f"{raw!r} is not true or false")
            return raw
        if s.repeat:
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            return tuple(s.convert(str(v)) for v in items)
        if isinstance(raw, (list, dict)):
            raise ConfigError(f"{raw!r} is not a single value")
        if s.convert is _umask and isinstance(raw, int):
            raw = oct(raw)[2:]  # a TOML integer 0o22 means the umask 022
        return s.convert(str(raw))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_file(path: str, opener: Opener | None = None) -> dict[str, Any]:
    """Settings from a tftpd.conf (TOML): keys are the long flags without dashes.
    `opener`, when given, opens the file (open()'s argument)."""
    try:
        with open(path, "rb", opener=opener) as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    by_key = {s.key: s for s in SETTINGS}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key == "root":
            if not isinstance(raw, str):
                raise ConfigError(f"{path}: root must be a string")
            values["root"] = raw
            continue
        s = by_key.get(key)
        if s is None:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        values[s.name] = _convert(s, raw, f"{path}: {key}")
    return values


def from_argv(argv: list[str], opener: Opener | None = None) -> Config:
    """The configuration: defaults, then tftpd.conf (-C, opened through `opener` when
    given), then the command line."""
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = read_file(ns.config, opener) if ns.config else {}
    for s in SETTINGS:
        raw = getattr(ns, s.name)
        if raw is None or raw is False or raw == [] or (s.count and raw == 0):
            continue
        values[s.name] = _convert(s, raw, s.flags[-1])
    for opt in values.get("refuse", ()):
        if opt not in ("blksize", "tsize", "timeout", "windowsize", "utimeout"):
            raise ConfigError(f"--refuse {opt!r}: not an option tftpd negotiates")
    if ns.root:
        values["root"] = ns.root
    values["config"] = ns.config
    values["demo"] = bool(ns.demo)
    return Config(**values)
