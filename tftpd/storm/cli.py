"""tftpd-storm: a boot storm against any TFTP server, by an operator, without root.

    tftpd-storm HOST:PORT --workload pxe --clients 200 [--json] [--root DIR]
    tftpd-storm --make-root DIR --workload pxe

The server's files are the workload's names. Without --root the tool knows only their
names: each transfer must complete and, when the workload asks the name's tsize (in that
step or an earlier one, as a probe before a plain read), add up to the size announced.
With --root (a copy of the files the server serves) every byte received is compared
with the copy. --make-root writes a workload's files, for an operator to serve them.
Exit status: 0 every client finished, 1 some failed, 2 a usage error or a server that
does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import select
import socket
import sys
import time
from pathlib import Path

from tftpd.storm import cgen, content, report
from tftpd.storm.engine import ENGINES, choose, run_storm
from tftpd.storm.pyengine import encode_error, encode_rrq, raise_nofile
from tftpd.storm.result import Faults
from tftpd.storm.workload import Workload, WorkloadError, load, names

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_CLIENTS = 10_000
MAX_TIMEOUT_S = 3600.0
# The answer the reachability check waits for: within the workload's RRQ retries, and
# within this whatever they are (a server that takes longer to answer one RRQ is down).
REACH_BUDGET_S = 10.0
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # Linux: ICMP errors reach recvfrom


class UsageError(Exception):
    """A command line or an environment the storm cannot run with (exit 2)."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tftpd-storm", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("server", nargs="?", metavar="HOST:PORT",
                    help="the TFTP server (IPv4 address or name; port 69 when left out)")
    ap.add_argument("--workload", default="pxe", metavar="NAME|FILE.json",
                    help=f"a workload that comes with the tool ({', '.join(names())}) or a "
                         "JSON file in the same format (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=None, metavar="N",
                    help=f"simulated clients, 1..{MAX_CLIENTS} (default: the workload's "
                         "first storm size)")
    ap.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="bound on the storm; clients still running then fail with reason "
                         f"deadline (default: from the workload's retry rules; at most "
                         f"{MAX_TIMEOUT_S:.0f})")
    ap.add_argument("--root", metavar="DIR",
                    help="a copy of the served files: compare every byte received with it")
    ap.add_argument("--make-root", metavar="DIR",
                    help="write the workload's files under DIR for a server to serve, and exit")
    ap.add_argument("--engine", choices=ENGINES, default="auto",
                    help="auto: the C engine when it builds, else Python (default)")
    ap.add_argument("--faults", default="", metavar="loss=P,dup=P,reorder=P",
                    help="the C engine drops, duplicates and reorders its own datagrams, both "
                         "ways (also hold=MIN-MAX ms, seed=N)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object with every figure instead of the table")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    return ap


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.split("%")[0])
    except ValueError:
        return False
    return True


def parse_server(text: str) -> tuple[str, int]:
    """HOST[:PORT] as (IPv4 address, port)."""
    if text.startswith("[") or _is_ipv6(text):
        raise UsageError(f"{text}: IPv6 is not supported; give an IPv4 address or name")
    if text.count(":") > 1:
        raise UsageError(f"{text}: expected HOST:PORT")
    host, sep, port_text = text.partition(":")
    try:
        port = int(port_text) if sep else 69
    except ValueError:
        raise UsageError(f"{text}: the port must be a number") from None
    if not host or not 0 < port < 65536:
        raise UsageError(f"{text}: expected HOST:PORT")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise UsageError(f"{host}: {exc.strerror}") from None
    return infos[0][4][0], port


def known_files(wl: Workload, root: str | None) -> dict[str, bytes | None]:
    """What the clients know of each file: the copy's bytes under `root`, or nothing."""
    if root is None:
        return dict.fromkeys(wl.files)
    base = Path(root)
    if not base.is_dir():
        raise UsageError(f"--root {root}: not a directory")
    out: dict[str, bytes | None] = {}
    for path in wl.files:
        try:
            out[path] = (base / path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--root {root}: {path}: {exc.strerror or exc} (the root must "
                             "hold a copy of the workload's files: tftpd-storm "
                             "--make-root)") from None
    return out


def check_reachable(server: tuple[str, int], wl: Workload, budget_s: float) -> None:
    """One request of the workload's first step, retried by its rules: any answer from the
    server's address will do (an ERROR too); the transfer is then aborted. No answer, or
    an ICMP error, is a UsageError."""
    step = wl.sequence[0]
    rrq = encode_rrq(step.file, step.options)
    end = time.monotonic() + budget_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        for wait in wl.client.rrq_timeouts_s:
            if time.monotonic() >= end:
                break
            try:
                sock.sendto(rrq, server)
            except OSError as exc:
                raise UsageError(f"{server[0]}:{server[1]}: {exc.strerror or exc}") from None
            until = min(end, time.monotonic() + wait)
            while (left := until - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH,
                                     errno.ENETUNREACH, errno.EHOSTDOWN):
                        raise UsageError(f"{server[0]}:{server[1]}: "
                                         f"{exc.strerror}") from None
                    continue
                if addr[0] != server[0]:
                    continue
                if data[:2] != b"\x00\x05" and addr[1] != server[1]:
                    with contextlib.suppress(OSError):  # the server may time it out alone
                        sock.sendto(encode_error(0, "reachability check done"), addr)
                return
    raise UsageError(f"{server[0]}:{server[1]}: no answer to a read request within "
                     f"{budget_s:.0f} s (is a TFTP server running there?)")


def make_root(wl: Workload, root: str) -> int:
    try:
        base = content.build_root(wl, root)
    except OSError as exc:
        raise UsageError(f"--make-root {root}: {exc}") from None
    misses = sorted({s.file for s in wl.sequence if s.expect == "notfound"})
    print(f"{base}: {len(wl.files)} files, {sum(wl.files.values())} bytes for workload "
          f"{wl.name}" + (f"; must stay missing: {', '.join(misses)}" if misses else ""))
    return EXIT_OK


def _clients(args: argparse.Namespace, wl: Workload) -> int:
    clients = args.clients if args.clients is not None else wl.clients[0]
    if not 1 <= clients <= MAX_CLIENTS:
        raise UsageError(f"--clients must be 1..{MAX_CLIENTS}")
    # A client holds one socket at a time; the C engine and the interpreter need a few.
    have = raise_nofile(clients + 256)
    if have < clients + 64:
        raise UsageError(f"--clients {clients}: the open-file limit is {have} (ulimit -n); "
                         f"at most {max(0, have - 64)} clients here")
    return clients


def _timeout(args: argparse.Namespace, wl: Workload, clients: int,
             faults: Faults | None) -> float:
    if args.timeout is None:
        return min(MAX_TIMEOUT_S, wl.default_deadline_s(
            clients, loss_pct=faults.loss if faults else 0.0))
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise UsageError(f"--timeout must be in (0, {MAX_TIMEOUT_S:.0f}] seconds")
    return args.timeout


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in names():
            wl = load(name)
            print(f"{name:9} {len(wl.files)} files, {len(wl.sequence)} requests a client, "
                  f"{sum(wl.files.values())} bytes")
        return EXIT_OK
    try:
        wl = load(args.workload)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--workload {args.workload}: {exc}") from None
    if args.make_root:
        if args.server or args.root:
            raise UsageError("--make-root takes only --workload")
        return make_root(wl, args.make_root)
    if not args.server:
        raise UsageError("give HOST:PORT (or --make-root DIR, or --list)")
    server = parse_server(args.server)
    try:
        faults = Faults.parse(args.faults) if args.faults else None
    except ValueError as exc:
        raise UsageError(f"--faults {args.faults}: {exc}") from None
    clients = _clients(args, wl)
    timeout = _timeout(args, wl, clients, faults)
    files = known_files(wl, args.root)
    try:
        engine = choose(args.engine, faults)
    except (ValueError, cgen.BuildError) as exc:
        raise UsageError(f"--engine {args.engine}: {exc}") from None
    check_reachable(server, wl, min(timeout, REACH_BUDGET_S, wl.client.rrq_budget_s()))
    res = run_storm(server, wl, clients, engine=engine, files=files, deadline_s=timeout,
                    faults=faults)
    rec = {"server": f"{server[0]}:{server[1]}", **res.summary(), "timeout_s": timeout,
           "verified": "bytes" if args.root else "tsize-and-completion"}
    if args.json:
        print(json.dumps(rec))
    else:
        print(f"workload {wl.name} ({wl.source}), engine {res.engine}, timeout {timeout:g} s, "
              f"checked: {rec['verified']}")
        print(report.client_table(rec))
    return EXIT_OK if res.ok == clients and res.n_failed == 0 else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"tftpd-storm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkloadError as exc:
        print(f"tftpd-storm: workload: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
