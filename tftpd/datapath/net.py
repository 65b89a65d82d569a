"""Network helpers of the data path: raw socket addresses, ancillary data.

Each function that has a C twin says so; tests/test_twins.py holds them equal.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

__all__ = [
    "ANC_SIZE",
    "IP_PKTINFO",
    "IPV6_PKTINFO",
    "IPV6_RECVPKTINFO",
    "SOCKADDR_STORAGE",
    "SO_TIMESTAMPNS",
    "decode_sockaddr",
    "drained",
    "encode_sockaddr",
    "from_ancillary",
    "pktinfo_cmsg",
]

# struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr} (Linux ip(7))
_PKTINFO4 = struct.Struct("=i4s4s")
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SO_TIMESTAMPNS = 35  # == SCM_TIMESTAMPNS (Linux asm-generic/socket.h)
_TIMESPEC = struct.Struct("=qq")
ANC_SIZE = socket.CMSG_SPACE(32) + socket.CMSG_SPACE(_TIMESPEC.size)

_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port, address
_SOCKADDR_IN6 = struct.Struct("=H2s4s16sI")  # family, port, flowinfo, address, scope
SOCKADDR_STORAGE = 128

# What a recv on a spare socket may return for an ICMP error its last client caused:
# cleared by that recv, and the socket is still good.
_STALE_ICMP = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
DRAIN_MAX = 64  # datagrams read from a spare before it counts as flooded


def encode_sockaddr(addr: tuple[Any, ...]) -> bytes:
    """The raw ``struct sockaddr_in``/``sockaddr_in6`` for a socket-module address.

    ``addr`` is what ``recvfrom`` gives: ``(host, port)`` for IPv4 or
    ``(host, port, flowinfo, scope_id)`` for IPv6 (a 2-tuple with an IPv6 host is
    taken with flowinfo and scope_id 0).  Hosts are numeric.  Workers encode a
    client's address once per transfer and keep the bytes.
    """
    if not isinstance(addr, tuple) or not 2 <= len(addr) <= 4:
        raise ValueError(f"not a socket address: {addr!r}")
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"not a socket address: {addr!r}")
    port_be = port.to_bytes(2, "big")
    if ":" not in host:
        if len(addr) != 2:
            raise ValueError(f"an IPv4 address is a 2-tuple: {addr!r}")
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            raise ValueError(f"not a numeric IPv4 address: {host!r}") from None
        return _SOCKADDR_IN.pack(socket.AF_INET, port_be, packed)
    flowinfo = addr[2] if len(addr) > 2 else 0
    scope_id = addr[3] if len(addr) > 3 else 0
    if not isinstance(flowinfo, int) or not 0 <= flowinfo < 1 << 20:
        raise ValueError(f"bad IPv6 flowinfo in {addr!r}")
    if not isinstance(scope_id, int) or not 0 <= scope_id < 1 << 32:
        raise ValueError(f"bad IPv6 scope id in {addr!r}")
    # recvfrom names link-local peers "fe80::1%eth0"; the scope is in scope_id.
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        raise ValueError(f"not a numeric IPv6 address: {host!r}") from None
    # The kernel keeps sin6_flowinfo in network order, sin6_scope_id in host order.
    return _SOCKADDR_IN6.pack(socket.AF_INET6, port_be, flowinfo.to_bytes(4, "big"), packed,
                              scope_id)


def decode_sockaddr(raw: bytes) -> tuple[Any, ...] | None:
    """The socket-module address of a raw struct sockaddr_in / sockaddr_in6; None
    for anything else (no address at all, another family, too short)."""
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6:
        if len(raw) < 28:
            return None
        flowinfo, = struct.unpack_from("!I", raw, 4)
        scope, = struct.unpack_from("=I", raw, 24)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope)
    if family != socket.AF_INET:
        return None
    return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def from_ancillary(family: int, anc: list) -> tuple[str | None, int, float]:
    """The request's destination address, arrival interface and arrival time.
    C twin: tftpd_ancillary (_ext/tftpd_requests.c)."""
    dst, ifindex, arrival = None, 0, 0.0
    for level, kind, data in anc:
        if family == socket.AF_INET and level == socket.IPPROTO_IP and kind == IP_PKTINFO \
                and len(data) >= _PKTINFO4.size:
            ifindex, _, addr = _PKTINFO4.unpack_from(data)
            dst = socket.inet_ntop(socket.AF_INET, addr)
        elif family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 \
                and kind == IPV6_PKTINFO and len(data) >= 20:
            dst = socket.inet_ntop(socket.AF_INET6, data[:16])
            ifindex = struct.unpack_from("=I", data, 16)[0]
        elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS \
                and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            arrival = sec + nsec / 1e9
    return dst, ifindex, arrival


def pktinfo_cmsg(family: int, local: str) -> tuple[int, int, bytes]:
    """The ancillary data that makes a reply leave from `local`.
    C twin: tftpd_reply_cmsg (_ext/tftpd_requests.c)."""
    if family == socket.AF_INET6:
        return (socket.IPPROTO_IPV6, IPV6_PKTINFO,
                socket.inet_pton(socket.AF_INET6, local) + struct.pack("=I", 0))
    return (socket.IPPROTO_IP, IP_PKTINFO,
            _PKTINFO4.pack(0, socket.inet_pton(socket.AF_INET, local), bytes(4)))


def drained(sock: socket.socket) -> bool:
    """Empty a spare socket of what strangers sent to its port while it waited;
    False if it keeps receiving (someone is flooding that port: take another) or
    fails. A pending ICMP error from its last client is returned, and cleared, by
    a recv like a datagram is. C twin: tftpd_drain (_ext/tftpd_requests.c)."""
    for _ in range(DRAIN_MAX):
        try:
            sock.recv(1, socket.MSG_DONTWAIT)  # a UDP recv drops the whole datagram
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno not in _STALE_ICMP:
                return False
    return False
