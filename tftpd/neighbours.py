"""Who a client is, beyond its address: its MAC from the kernel's neighbour table,
and the per-client directories (--root-per-client) tried before the root.

A boot client asks from the address DHCP just gave it, on a link the server shares,
so the kernel has just resolved it (ARP or NDP): the neighbour table knows its MAC.
The table is read through netlink (pyroute2), whole, at most twice a second, and
what it says is cached: bounded in size, and a missing entry only for a few seconds,
since it may appear a moment later.

pyroute2 is imported by load_netlink(), not at import (it costs half a second); it
must have been called before any chroot (-s) when the settings need MACs, or the
first lookup imports it (outside a chroot). Without pyroute2 every lookup answers
None.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_netlink: list[Any] = []  # [IPRoute] once load_netlink() found pyroute2, [None] if not


def load_netlink() -> bool:
    """Import pyroute2 (slow: about half a second) if that has not been tried yet;
    whether it is there. Call it before any chroot when the settings need MACs; a
    process that cannot import it answers None for every MAC."""
    if not _netlink:
        try:
            from pyroute2 import IPRoute
        except ImportError:
            IPRoute = None  # noqa: N806 - the class, or its absence
        _netlink.append(IPRoute)
    return _netlink[0] is not None


# Neighbour states (linux/neighbour.h) whose link-layer address is not worth using.
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
_UNUSABLE = NUD_INCOMPLETE | NUD_FAILED
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


_PLAIN_MAX = 4096  # addresses whose plain form is remembered (cleared when full)
_plain: dict[str, str] = {}


def plain_ip(host: str) -> str:
    """The client's address as logs, prefixes and hooks show it: an IPv4-mapped IPv6
    address (::ffff:10.0.0.5, from a dual-stack socket) as plain IPv4, an IPv6 address
    in its short form without a scope (%eth0). Anything unparsable is returned as is.
    Remembered: a storm's request path asks the same few addresses again and again."""
    known = _plain.get(host)
    if known is None:
        if len(_plain) >= _PLAIN_MAX:
            _plain.clear()
        known = _plain[host] = _plain_ip(host)
    return known


def _plain_ip(host: str) -> str:
    text = host.partition("%")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def mac_prefix(mac: str) -> str:
    """A MAC as PXELINUX names a per-host file: ARP type 1 (Ethernet), then the bytes
    in lower-case hex joined by dashes: aa:bb:cc:dd:ee:ff -> 01-aa-bb-cc-dd-ee-ff."""
    return "01-" + mac.lower().replace(":", "-")


def normal_mac(lladdr: object) -> str | None:
    """An Ethernet address as "aa:bb:cc:dd:ee:ff", None for anything else (another
    link type, the all-zero address of a NOARP device)."""
    if not isinstance(lladdr, str):
        return None
    mac = lladdr.lower()
    if not _MAC.fullmatch(mac) or mac == "00:00:00:00:00:00":
        return None
    return mac


class NeighbourCache:
    """MAC by client address, from the kernel's neighbour table, cached.

    Safe to share between threads. Found MACs are kept `ttl` seconds, misses
    `miss_ttl` seconds; at most `size` addresses are kept (the least recently asked
    go first). The kernel is asked for its whole table at once, at most once per
    `refresh` seconds, and every entry is remembered: a storm of a thousand new
    clients costs a few dumps, not a dump per client. `lookup(ip)`, if given,
    answers one address instead (tests).
    """

    def __init__(self, *, size: int = 65536, ttl: float = 300.0, miss_ttl: float = 3.0,
                 refresh: float = 0.5, clock: Callable[[], float] = time.monotonic,
                 lookup: Callable[[str], str | None] | None = None) -> None:
        self.size = size
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self.refresh = refresh
        self.clock = clock
        self._lookup = lookup
        self._known: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._ipr: Any = None
        self._next_dump = 0.0
        self.lookups = 0  # questions asked of the kernel (or of `lookup`)

    def mac(self, ip: str) -> str | None:
        ip = plain_ip(ip)
        now = self.clock()
        with self._lock:
            hit = self._known.get(ip)
            if hit is not None and hit[0] > now:
                self._known.move_to_end(ip)
                return hit[1]
            if self._lookup is not None:
                self.lookups += 1
                try:
                    mac = self._lookup(ip)
                except Exception:  # noqa: BLE001 - no answer is an answer: no MAC
                    mac = None
                miss_until = now + self.miss_ttl
            elif now >= self._next_dump:
                self.lookups += 1
                self._next_dump = now + self.refresh
                try:
                    table = self._dump()
                except Exception:  # noqa: BLE001
                    table = {}
                for addr, found in table.items():
                    self._put(addr, now + self.ttl, found)
                mac = table.get(ip)
                miss_until = now + self.miss_ttl
            else:
                mac = None  # asked moments ago; the next dump may know
                miss_until = self._next_dump
            self._put(ip, now + self.ttl if mac is not None else miss_until, mac)
            return mac

    def _put(self, ip: str, expires: float, mac: str | None) -> None:
        self._known[ip] = (expires, mac)
        self._known.move_to_end(ip)
        while len(self._known) > self.size:
            self._known.popitem(last=False)

    def __len__(self) -> int:
        return len(self._known)

    def _dump(self) -> dict[str, str]:
        """Every usable entry of the kernel's neighbour tables (ARP and NDP)."""
        if not load_netlink():
            return {}
        if self._ipr is None:
            self._ipr = _netlink[0]()
        try:
            entries = list(self._ipr.neigh("dump"))
        except Exception:
            self.close()  # a socket that went bad is opened afresh next time
            raise
        table = {}
        for entry in entries:
            if entry.get("state", 0) & _UNUSABLE:
                continue
            mac = normal_mac(entry.get("NDA_LLADDR"))
            dst = entry.get("NDA_DST")
            if mac is not None and isinstance(dst, str):
                table[plain_ip(dst)] = mac
        return table

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            try:
                ipr.close()
            except Exception:  # noqa: BLE001 - closing must not fail the caller
                pass


ROOT_KINDS = ("ip", "mac")


class ClientRoots:
    """--root-per-client ip|mac: the directory under the root tried first for a client.

    "ip": ROOT/10.0.0.5/NAME (IPv6 in its short form, ROOT/fd00::5/NAME); "mac":
    ROOT/01-aa-bb-cc-dd-ee-ff/NAME, as PXELINUX writes MACs. A client whose MAC the
    neighbour table does not know has no such directory; ROOT/NAME serves it.
    """

    def __init__(self, kind: str, neighbours: NeighbourCache) -> None:
        if kind not in ROOT_KINDS:
            raise ValueError(f"root per client by {kind!r}: want one of {ROOT_KINDS}")
        self.kind = kind
        self.neighbours = neighbours

    def prefixes(self, client_ip: str) -> list[str]:
        ip = plain_ip(client_ip)
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return []  # not an IP address (a test's socket pair): no directory of its own
        if self.kind == "ip":
            return [ip]
        mac = self.neighbours.mac(ip)
        return [mac_prefix(mac)] if mac is not None else []
