"""A TFTP client: read with any options (windowed too), probe, write; and `tftp-get`.

Blocking and simple on purpose: tests and scripts use it to check the server byte for
byte, so it is strict where a server could cheat (options it did not ask for in an
OACK, a blksize above the request, packets from a second TID).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from tftpd import packet as P
from tftpd.transfer import Receiver


class TftpError(Exception):
    """The server answered with ERROR, or broke the protocol."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"TFTP error {code}: {message}")
        self.code = code
        self.message = message


class TftpTimeout(TftpError):
    def __init__(self, message: str) -> None:
        super().__init__(-1, message)


@dataclass(slots=True)
class Result:
    data: bytes = b""
    oack: dict[str, str] = field(default_factory=dict)
    server: tuple = ()  # the server's transfer address (its TID)
    local: tuple = ()  # this client's own address, as the server's log names it
    retransmits: int = 0  # requests or ACKs this client sent again
    first_answer: float = 0.0  # seconds from the request to the first answer
    foreign: int = 0  # datagrams from another TID, answered with ERROR 5


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    return info[0], info[4]


class _Conn:
    def __init__(self, host: str, port: int, timeout: float, local: str | None = None) -> None:
        self.family, self.server = _resolve(host, port)
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        wildcard = "::" if self.family == socket.AF_INET6 else "0.0.0.0"
        self.sock.bind((local or wildcard, 0))
        # Room for a whole window of the largest blocks: a window that overflows the
        # receive buffer is lost at its tail every time.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.timeout = timeout
        self.tid: tuple | None = None
        self.result = Result(local=self.sock.getsockname())

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.tid or self.server)

    def recv(self, deadline: float) -> P.Packet | None:
        """The next packet from the server's TID, or None at the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, src = self.sock.recvfrom(P.MAX_DATAGRAM)
            except TimeoutError:
                return None
            if src[0] != self.server[0]:
                continue  # not even the server's host: ignore
            if self.tid is None:
                if src[1] == self.server[1]:
                    # RFC 1350: the server answers from a new port (TID); an answer
                    # from the request port is a protocol error we refuse to accept.
                    raise TftpError(-2, "server answered from its listen port")
                self.tid = src
            elif src != self.tid:
                self.result.foreign += 1
                self.sock.sendto(P.encode_error(P.E_UNKNOWN_TID, "Unknown transfer ID"), src)
                continue
            try:
                return P.parse(data)
            except P.PacketError:
                continue


def _check_oack(asked: dict[str, str], oack: dict[str, str]) -> None:
    for name, value in oack.items():
        if name not in asked:
            raise TftpError(P.E_OPTIONS, f"OACK carries {name!r}, which was not asked")
        if name == "blksize" and int(value) > int(asked[name]):
            raise TftpError(P.E_OPTIONS, f"OACK blksize {value} above the {asked[name]} asked")
        if name == "windowsize" and int(value) > int(asked[name]):
            raise TftpError(P.E_OPTIONS, "OACK windowsize above the request")
        if name == "timeout" and value != asked[name]:
            raise TftpError(P.E_OPTIONS, "OACK timeout differs from the request")


def get(host: str, port: int, filename: str | bytes, *, options: dict[str, str] | None = None,
        mode: str = "octet", timeout: float = 1.0, retries: int = 5,
        probe: bool = False, abort_code: int = P.E_OPTIONS, rollover: int = 0,
        local: str | None = None) -> Result:
    """Read a file. With `probe`, stop after the OACK with ERROR `abort_code`.
    `rollover` is the server's block number after 65535 (tftpd --rollover): 0 or 1.
    `local`: the address to ask from (the server sees it as the client's)."""
    asked = {k.lower(): str(v) for k, v in (options or {}).items()}
    conn = _Conn(host, port, timeout, local)
    res = conn.result
    try:
        request = P.encode_rrq(filename, mode, asked)
        started = time.monotonic()
        conn.send(request)
        rx = Receiver(rollover=rollover)  # the block rules, as the server's uploads
        chunks: list[bytes] = []
        last_sent: bytes = request
        tries = 0
        while True:
            pkt = conn.recv(time.monotonic() + timeout)
            if pkt is None:
                tries += 1
                if tries > retries:
                    raise TftpTimeout(f"no answer after {retries} retries")
                res.retransmits += 1
                conn.sock.sendto(last_sent, conn.tid or conn.server)
                rx.timed_out()
                continue
            if not res.first_answer:
                res.first_answer = time.monotonic() - started
            if isinstance(pkt, P.Error):
                raise TftpError(pkt.code, pkt.message)
            if isinstance(pkt, P.OAck):
                if rx.received:
                    continue  # a late duplicate OACK
                _check_oack(asked, pkt.options)
                res.oack = dict(pkt.options)
                if probe:
                    conn.send(P.encode_error(abort_code, "probe done"))
                    return res
                rx = Receiver(int(pkt.options.get("blksize", 512)),
                              int(pkt.options.get("windowsize", 1)), rollover)
                last_sent = P.encode_ack(0)
                conn.send(last_sent)
                tries = 0
                continue
            if not isinstance(pkt, P.Data):
                continue
            if probe and not rx.received and not res.oack:
                # The server ignored our options and started sending: abort as a probe.
                conn.send(P.encode_error(abort_code, "probe done"))
                return res
            if not rx.is_next(pkt.block):
                ack = rx.stray()  # out of order or a repeat: say where we are
                if ack is not None:
                    last_sent = P.encode_ack(ack)
                    conn.send(last_sent)
                continue
            if len(pkt.payload) > rx.blksize:
                raise TftpError(-3, f"DATA {pkt.block} larger than blksize {rx.blksize}")
            chunks.append(pkt.payload)
            tries = 0
            ack = rx.take(len(pkt.payload))
            if ack is not None:
                last_sent = P.encode_ack(ack)
                conn.send(last_sent)
            if rx.finished:
                res.data = b"".join(chunks)
                res.server = conn.tid or ()
                return res
    finally:
        conn.close()


def probe(host: str, port: int, filename: str | bytes, *, options: dict[str, str] | None = None,
          timeout: float = 1.0, retries: int = 5, abort_code: int = P.E_OPTIONS) -> Result:
    """RRQ with tsize=0 (plus `options`), read the OACK, abort: an existence probe."""
    opts = {"tsize": "0", **(options or {})}
    return get(host, port, filename, options=opts, timeout=timeout, retries=retries,
               probe=True, abort_code=abort_code)


def put(host: str, port: int, filename: str | bytes, data: bytes, *,
        options: dict[str, str] | None = None, mode: str = "octet", timeout: float = 1.0,
        retries: int = 5) -> Result:
    """Write a file in lock-step (windowsize is not offered by this client)."""
    asked = {k.lower(): str(v) for k, v in (options or {}).items()}
    conn = _Conn(host, port, timeout)
    res = conn.result
    try:
        last_sent = P.encode_wrq(filename, mode, asked)
        conn.send(last_sent)
        blksize = 512
        acked: int | None = None  # absolute block acknowledged; 0 once the WRQ is
        tries = 0
        while True:
            pkt = conn.recv(time.monotonic() + timeout)
            if pkt is None:
                tries += 1
                if tries > retries:
                    raise TftpTimeout(f"no answer after {retries} retries")
                res.retransmits += 1
                conn.sock.sendto(last_sent, conn.tid or conn.server)
                continue
            if isinstance(pkt, P.Error):
                raise TftpError(pkt.code, pkt.message)
            if acked is None and isinstance(pkt, P.OAck):
                _check_oack(asked, pkt.options)
                res.oack = dict(pkt.options)
                blksize = int(pkt.options.get("blksize", 512))
                acked = 0
            elif acked is None and isinstance(pkt, P.Ack) and pkt.block == 0:
                acked = 0
            elif acked is not None and isinstance(pkt, P.Ack) \
                    and pkt.block == (acked + 1) & 0xFFFF:
                acked += 1
            else:
                continue  # duplicates and strays: only our timer resends
            tries = 0
            if acked == len(data) // blksize + 1:
                return res
            offset = acked * blksize
            last_sent = P.encode_data((acked + 1) & 0xFFFF, data[offset:offset + blksize])
            conn.send(last_sent)
    finally:
        conn.close()


def _hostport(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 69
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 69


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tftp-get", description="Fetch (or probe, or put) a "
                                 "file over TFTP. HOST may be HOST:PORT or [V6]:PORT.")
    ap.add_argument("host")
    ap.add_argument("file", help="remote file name")
    ap.add_argument("-o", "--output", help="where to write (default: stdout; '-' stdout)")
    ap.add_argument("-b", "--blksize", type=int, help="ask for this block size (RFC 2348)")
    ap.add_argument("-w", "--windowsize", type=int, help="ask for this window (RFC 7440)")
    ap.add_argument("-t", "--tsize", action="store_true", help="ask for the size (RFC 2349)")
    ap.add_argument("--timeout", type=int, help="ask for this timeout option, seconds")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="any other option; repeatable")
    ap.add_argument("--mode", default="octet", choices=["octet", "netascii"])
    ap.add_argument("--probe", action="store_true",
                    help="only probe: print the size from the OACK, then abort (ERROR 8)")
    ap.add_argument("--put", metavar="LOCAL", help="upload LOCAL as FILE instead")
    ap.add_argument("--wait", type=float, default=1.0, help="seconds before a resend")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--rollover", type=int, choices=[0, 1], default=0,
                    help="the server's block number after 65535 (default 0)")
    ns = ap.parse_args(argv)
    host, port = _hostport(ns.host)
    opts: dict[str, str] = {}
    if ns.blksize:
        opts["blksize"] = str(ns.blksize)
    if ns.windowsize:
        opts["windowsize"] = str(ns.windowsize)
    if ns.tsize:
        opts["tsize"] = "0"
    if ns.timeout:
        opts["timeout"] = str(ns.timeout)
    for item in ns.option:
        name, _, value = item.partition("=")
        opts[name] = value
    try:
        if ns.put:
            with open(ns.put, "rb") as f:
                put(host, port, ns.file, f.read(), options=opts, mode=ns.mode, timeout=ns.wait,
                    retries=ns.retries)
            return 0
        if ns.probe:
            res = probe(host, port, ns.file, options=opts, timeout=ns.wait, retries=ns.retries)
            print(res.oack.get("tsize", "unknown"))
            return 0
        res = get(host, port, ns.file, options=opts, mode=ns.mode, timeout=ns.wait,
                  retries=ns.retries, rollover=ns.rollover)
    except TftpError as err:
        print(f"tftp-get: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"tftp-get: {err}", file=sys.stderr)
        return 1
    if ns.output and ns.output != "-":
        tmp = ns.output + ".part"
        with open(tmp, "wb") as f:
            f.write(res.data)
        os.replace(tmp, ns.output)
    else:
        sys.stdout.buffer.write(res.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
