"""Coverage-guided fuzzing of the packet parser and the request reader (atheris).

    pip install atheris
    PYTHONPATH=. python3 tests/atheris_requests.py -max_total_time=300 [corpus_dir]

Not part of CI (it runs until stopped or its time is up). Each input is one datagram:

- `packet.parse` decodes it or raises `PacketError`, nothing else; what it decodes
  encodes back to a datagram that parses to the same packet (an ERROR's message cut to
  200 characters, as the encoder does); a request's options go
  through `options.negotiate` without an exception and within the policy;
- with the C extension built, the datagram goes through C's request reader
  (`tftpd_requests`) and the pure-Python twin over loopback, with the datagram itself
  and a near miss as known answers: both report the same kind and the same answer.

A crash, an unexpected exception or a difference stops the fuzzer with the input that
caused it (libFuzzer writes it to crash-<sha1>).
"""

from __future__ import annotations

import select
import socket
import sys
import time
from typing import Any

import atheris

with atheris.instrument_imports():
    from tftpd import options as O
    from tftpd import packet as P
    from tftpd.datapath import KnownAnswers, dir_identity, ext_error, get_datapath

POLICY = O.Policy()
HERE = "/"


def check_parser(data: bytes) -> None:
    try:
        pkt = P.parse(data)
    except P.PacketError:
        return
    again = P.parse(P.encode(pkt))
    if isinstance(pkt, P.Error):  # our encoder keeps a message to 200 characters
        assert isinstance(again, P.Error) and again.code == pkt.code
        assert again.message == pkt.message[:200], (data, pkt, again)
    else:
        assert again == pkt, (data, pkt, again)
    if isinstance(pkt, P.Request):
        try:
            got = O.negotiate(pkt.options, POLICY, size=len(data), is_write=pkt.is_write)
        except O.OptionRefused:
            assert pkt.is_write
            return
        assert set(got.oack) <= set(pkt.options)
        assert 8 <= got.blksize <= POLICY.max_blksize
        assert 1 <= got.windowsize <= POLICY.max_windowsize


class Readers:
    """A listen socket, an error socket and a client per data path, as the worker has."""

    def __init__(self) -> None:
        from tftpd.worker import enable_pktinfo

        self.paths = {name: get_datapath(name) for name in ("c", "python")}
        self.socks: dict[str, tuple[socket.socket, socket.socket, socket.socket]] = {}
        for name in self.paths:
            lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            lsock.bind(("127.0.0.1", 0))
            enable_pktinfo(lsock)
            err = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            err.bind(("127.0.0.1", 0))
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("127.0.0.1", 0))
            client.settimeout(2.0)
            self.socks[name] = (lsock, err, client)

    def read(self, name: str, data: bytes) -> tuple[Any, ...]:
        dp = self.paths[name]
        lsock, err, client = self.socks[name]
        refusals = KnownAnswers(dp)
        now = time.monotonic()
        refusals.put(data, P.encode_error(1, "known"), now + 60, HERE, dir_identity(HERE), 1)
        refusals.put(data + b"x", P.encode_error(1, "near"), now + 60, HERE,
                     dir_identity(HERE), 2)
        client.sendto(data, lsock.getsockname())
        assert select.select([lsock], [], [], 2.0)[0], "the datagram never arrived"
        got = dp.requests(lsock, err, True, refusals, now, 1)
        assert len(got) == 1, got
        kind, r, e, datagram, _src, dst, _ifindex, _arrival, _answered = got[0]
        reply = client.recv(70000) if r is not None and e == 0 else None
        return kind, r.note if r is not None else None, e, bytes(datagram), dst, reply


READERS: Readers | None = None


def check_readers(data: bytes) -> None:
    if READERS is None or len(data) > 65507:
        return
    c = READERS.read("c", data)
    py = READERS.read("python", data)
    assert c == py, (data, c, py)


def one_input(data: bytes) -> None:
    check_parser(data)
    check_readers(data)


def main() -> None:
    global READERS
    if ext_error() is None:
        READERS = Readers()
    else:
        print(f"C data path not built ({ext_error()}): fuzzing the parser only",
              file=sys.stderr)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
