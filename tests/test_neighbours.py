"""Client MACs from the kernel's neighbour table, and the names they give directories."""

from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import scaled
from hypothesis import given, settings
from hypothesis import strategies as st

from tftpd.neighbours import ClientRoots, NeighbourCache, mac_prefix, normal_mac, plain_ip

WAIT = 10.0  # s: bound on waiting for the kernel to learn a neighbour


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=20)


def test_the_mac_of_a_client_in_another_namespace() -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace and a veth pair needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip(8) is not installed")
    tag = f"{os.getpid() % 100000}"
    ns, host_if, peer_if = f"tftpd-nb-{tag}", f"tnbh{tag}", f"tnbp{tag}"
    net = random.Random(os.getpid()).randrange(0, 255)
    host_ip, peer_ip = f"10.251.{net}.1", f"10.251.{net}.2"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{peer_ip}/24", "dev", peer_if)
        _ip("-n", ns, "link", "set", peer_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        peer_mac = _ip("-n", ns, "-o", "link", "show", peer_if).stdout
        m = re.search(r"link/ether ([0-9a-f:]{17})", peer_mac)
        assert m, peer_mac
        expected = m.group(1)
        cache = NeighbourCache(miss_ttl=0.0, refresh=0.0)
        assert cache.mac(peer_ip) is None  # nothing has been said yet
        # One UDP datagram from the namespace: its ARP request for the host's address
        # tells the host's kernel the peer's MAC.
        send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                f"s.sendto(b'hello', ('{host_ip}', 9))")
        deadline = time.monotonic() + WAIT
        found = None
        for _ in range(50):
            subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send],
                           check=True, timeout=20, capture_output=True)
            found = cache.mac(peer_ip)
            if found is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # between datagrams: the loop sends at most 50
        assert found == expected
        assert cache.mac(f"::ffff:{peer_ip}") == expected  # a mapped address is the same
        assert ClientRoots("mac", cache).prefixes(peer_ip) == \
            ["01-" + expected.replace(":", "-")]
        # One dump remembers the whole table: the host's own neighbours come with it.
        asked = cache.lookups
        assert cache.mac(peer_ip) == expected and cache.lookups == asked
        cache.close()
    finally:
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_cached_misses_briefly_and_the_cache_is_bounded() -> None:
    table: dict[str, str] = {}
    asked: list[str] = []

    def lookup(ip: str) -> str | None:
        asked.append(ip)
        return table.get(ip)

    clock = FakeClock()
    cache = NeighbourCache(size=3, ttl=60.0, miss_ttl=3.0, clock=clock, lookup=lookup)
    assert cache.mac("10.0.0.1") is None
    table["10.0.0.1"] = "52:54:00:00:00:01"
    assert cache.mac("10.0.0.1") is None and asked == ["10.0.0.1"]  # the miss, cached
    clock.now += 3.1
    assert cache.mac("10.0.0.1") == "52:54:00:00:00:01"  # asked again after miss_ttl
    clock.now += 59
    table["10.0.0.1"] = "52:54:00:00:00:99"
    assert cache.mac("10.0.0.1") == "52:54:00:00:00:01" and len(asked) == 2
    for i in range(2, 8):
        cache.mac(f"10.0.0.{i}")
        assert len(cache) <= 3
    assert len(cache) == 3 and len(asked) == 8
    cache.mac("10.0.0.1")  # pushed out by the others: asked again
    assert len(asked) == 9


def test_the_table_is_read_whole_and_not_more_than_once_per_refresh() -> None:
    clock = FakeClock()
    cache = NeighbourCache(refresh=0.5, miss_ttl=3.0, clock=clock)
    dumps: list[float] = []
    table = {"10.0.0.1": "52:54:00:00:00:01", "10.0.0.2": "52:54:00:00:00:02"}

    def dump() -> dict[str, str]:
        dumps.append(clock.now)
        return dict(table)

    cache._dump = dump  # type: ignore[method-assign]
    assert cache.mac("10.0.0.1") == "52:54:00:00:00:01"
    assert cache.mac("10.0.0.2") == "52:54:00:00:00:02" and len(dumps) == 1
    assert cache.mac("10.0.0.3") is None and len(dumps) == 1  # within refresh: no dump
    table["10.0.0.3"] = "52:54:00:00:00:03"
    clock.now += 0.6  # the miss was kept only until the next dump was allowed
    assert cache.mac("10.0.0.3") == "52:54:00:00:00:03" and len(dumps) == 2


def test_a_failing_lookup_is_a_miss() -> None:
    def lookup(ip: str) -> str | None:
        raise OSError("netlink went away")

    assert NeighbourCache(lookup=lookup).mac("10.0.0.1") is None


# -- names -----------------------------------------------------------------------------------

@settings(max_examples=scaled(200))
@given(st.integers(0, 2**32 - 1), st.integers(0, 65535))
def test_mapped_addresses_are_plain_ipv4(n: int, _port: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    assert plain_ip(f"::ffff:{v4}") == str(v4)
    assert plain_ip(str(v4)) == str(v4)
    assert ClientRoots("ip", NeighbourCache(lookup=lambda ip: None)).prefixes(
        f"::ffff:{v4}") == [str(v4)]


@settings(max_examples=scaled(200))
@given(st.integers(0, 2**128 - 1))
def test_ipv6_is_shown_short_and_without_a_scope(n: int) -> None:
    v6 = ipaddress.IPv6Address(n)
    if v6.ipv4_mapped is not None:
        return
    assert plain_ip(v6.exploded + "%eth0") == str(v6)
    (prefix,) = ClientRoots("ip", NeighbourCache(lookup=lambda ip: None)).prefixes(v6.exploded)
    assert "/" not in prefix and prefix not in (".", "..")


@settings(max_examples=scaled(200))
@given(st.binary(min_size=6, max_size=6))
def test_mac_prefixes_as_pxelinux_writes_them(raw: bytes) -> None:
    mac = ":".join(f"{b:02X}" for b in raw)
    normal = normal_mac(mac)
    if raw == bytes(6):
        assert normal is None  # a NOARP device's address is no client's
        return
    assert normal == mac.lower()
    prefix = mac_prefix(normal)
    assert re.fullmatch(r"01(-[0-9a-f]{2}){6}", prefix)
    assert bytes.fromhex(prefix[3:].replace("-", "")) == raw
    roots = ClientRoots("mac", NeighbourCache(lookup=lambda ip: normal))
    assert roots.prefixes("10.0.0.1") == [prefix]


@given(st.text(max_size=30))
def test_anything_else_is_no_mac(text: str) -> None:
    if re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        return
    assert normal_mac(text) is None


def test_no_directory_for_what_is_not_an_address() -> None:
    roots = ClientRoots("ip", NeighbourCache(lookup=lambda ip: None))
    assert roots.prefixes("../etc") == [] and roots.prefixes("") == []
    assert ClientRoots("mac", NeighbourCache(lookup=lambda ip: None)).prefixes("10.0.0.1") == []
    with pytest.raises(ValueError):
        ClientRoots("uuid", NeighbourCache())
